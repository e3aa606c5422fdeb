"""PnP weights from a head of their own (``--weight-head``), against heatmap-only.

Reads the run folders of ``bpnp experiment ... --out runs/objpose_quick`` (this folder's README):
``<mesh>/bpnp-add-beta0.5-weight-head_seed<k>`` (the ADD
loss at beta 0.5; seeds 0-2) and ``<mesh>/bpnp-weight-head_seed<k>`` (the paper's reprojection
loss, beta by the balance rule; seeds 0-2 trained on 2026-12-05, 3-5 on 2026-12-06), each
continuing a heatmap-only warm-up snapshot. Their baseline is that warm-up's own heatmap-only run,
``<mesh>/heatmap-again_seed<k>`` (the same steps before the pose loss starts), where it was run;
otherwise the seed's older heatmap-only record (``heatmap_seed<k>``; spot:
``heatmap-threads1_seed<k>``), whose warm-up differs from the first steps on (another machine's
floating-point sums), so that such a pair holds the training noise too. Prints a markdown table of
the differences (per seed: bootstrap over the test images; per mesh: t-interval over the seeds)
and draws them in ``docs/figures/objpose_weight_head.png``. Usage, from the repository root:
``python results/objpose_quick/weight_head.py [--runs runs/objpose_quick] [--figure PATH]``.
The table it printed for the runs of 2026-12-05/06 is ``tables.md`` beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from balance import COLUMNS, HERE, MESHES, RUNS_DIR, _fmt, differences  # noqa: E402

from bpnp.pose.study import paired_interval  # noqa: E402

FIGURE = HERE.parents[1] / "docs" / "figures" / "objpose_weight_head.png"
SETTINGS = {
    "ADD loss, beta 0.5, weight head": "bpnp-add-beta0.5-weight-head_seed{}",
    "reprojection loss, weight head": "bpnp-weight-head_seed{}",
}


def baseline(mesh: str, seed: int, root: Path = RUNS_DIR) -> tuple[Path, bool]:
    """The heatmap-only run to compare with, and whether it shares the warm-up."""
    again = root / mesh / f"heatmap-again_seed{seed}"
    if (again / "eval" / "per_image.npz").is_file():
        return again, True
    return root / mesh / (("heatmap-threads1" if mesh == "spot" else "heatmap") + f"_seed{seed}"), False


def seeds(mesh_dir: Path) -> list[int]:
    """The seeds of the weight-head runs under ``mesh_dir``."""
    found = {int(d.name.rsplit("_seed", 1)[1]) for d in mesh_dir.glob("*-weight-head_seed*") if d.is_dir()}
    return sorted(found)


def collect(root: Path = RUNS_DIR) -> dict:
    """Per mesh, setting and seed: the per-image differences to heatmap-only, beta, pairing."""
    found: dict = {}
    for mesh, add in MESHES.items():
        for seed in seeds(root / mesh):
            base_dir, shared = baseline(mesh, seed, root)
            for setting, name in SETTINGS.items():
                run = root / mesh / name.format(seed)
                if not (run / "eval" / "per_image.npz").is_file():
                    continue
                beta, diffs = differences(run, base_dir, add)
                entry = {"beta": beta, "diffs": diffs, "shared_warmup": shared, "baseline": base_dir.name}
                found.setdefault(mesh, {}).setdefault(setting, {})[seed] = entry
    return found


def table(found: dict) -> str:
    head = "| mesh | setting | seed | beta | baseline | " + " | ".join(label for _, _, label in COLUMNS.values()) + " |"
    lines = [head, "|" + "---|" * (5 + len(COLUMNS))]
    for mesh, by_setting in found.items():
        for setting, by_seed in by_setting.items():
            for seed, run in sorted(by_seed.items()):
                cells = [_fmt(*paired_interval([run["diffs"][c]])) for c in COLUMNS]
                pairing = run["baseline"] + ("" if run["shared_warmup"] else " (own warm-up)")
                lines.append(
                    f"| {mesh} | {setting} | {seed} | {run['beta']:.3g} | {pairing} | " + " | ".join(cells) + " |"
                )
            if len(by_seed) >= 2:
                cells = [_fmt(*paired_interval([r["diffs"][c] for r in by_seed.values()])) for c in COLUMNS]
                lines.append(f"| **{mesh}** | **{setting}** | **all** | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(found: dict, path: Path) -> None:
    """Each run's difference to heatmap-only (dot, with its images' bootstrap interval) and each
    mesh's mean over the seeds (bar, with its t-interval), for the 2D projection and ADD(-S)-0.1d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(SETTINGS, ("tab:orange", "tab:blue")))
    panels = ("proj", "add01")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.2, 3.8))
    meshes = [m for m in MESHES if m in found]
    width = 0.8 / len(SETTINGS)
    for ax, col in zip(axes, panels):
        for i, mesh in enumerate(meshes):
            for j, setting in enumerate(SETTINGS):
                by_seed = found[mesh].get(setting, {})
                if not by_seed:
                    continue
                x = i + (j - (len(SETTINGS) - 1) / 2) * width
                if len(by_seed) >= 2:
                    mean, lo, hi = paired_interval([r["diffs"][col] for r in by_seed.values()])
                    ax.bar(x, mean, width * 0.9, color=colours[setting], alpha=0.35)
                    ax.errorbar(
                        x - 0.3 * width, mean, [[mean - lo], [hi - mean]], color=colours[setting], capsize=5, lw=2
                    )
                offsets = np.linspace(-0.1, 0.35, len(by_seed)) * width
                for dx, (_, run) in zip(offsets, sorted(by_seed.items())):
                    m, lo, hi = paired_interval([run["diffs"][col]])
                    ax.errorbar(x + dx, m, [[m - lo], [hi - m]], fmt="o", ms=3, color="0.25", lw=0.8)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xticks(range(len(meshes)), [m + (" (ADD-S)" if MESHES[m] == "adds" else "") for m in meshes])
        ax.set_title(f"{COLUMNS[col][2]} vs heatmap-only", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.5, label=s) for s, c in colours.items()]
    handles.append(plt.Line2D([], [], ls="", marker="o", c="0.25", label="one seed (bootstrap 95%)"))
    axes[-1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("PnP weights from a head of their own: bars = mean over seeds, 95% t-interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--figure", type=Path, default=FIGURE, help="where to write the figure")
    parser.add_argument("--runs", type=Path, default=RUNS_DIR, help="the experiment's --out folder")
    args = parser.parse_args()
    found = collect(args.runs)
    print(table(found))
    figure(found, args.figure)
    print(f"wrote {args.figure}")
