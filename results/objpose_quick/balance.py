"""The BPnP ADD loss at balance 0.3 (the default), 0.1 and a fixed beta 0.5, against heatmap-only.

Reads the run folders of ``bpnp experiment ... --out runs/objpose_quick`` (the command in this
folder's README; ``<mesh>/bpnp-add_seed<k>`` at balance 0.3,
``<mesh>/bpnp-add-balance0.1_seed<k>``, ``<mesh>/bpnp-add-beta0.5_seed<k>``,
``<mesh>/bpnp-add-beta0.5-learned-weights_seed<k>`` (beta 0.5, and the loss trains the PnP
weights too), ``<mesh>/bpnp-add-beta0.5-weight-head_seed<k>`` (beta 0.5, the PnP weights' factors
from a head of their own), and the heatmap-only
run each continued from its warm-up snapshot, named by its ``config.json``), prints a markdown
table of the paired differences (per seed: bootstrap over the test images; per mesh: t-interval
over the seeds) and writes ``docs/figures/objpose_balance.png``: each run's difference to
heatmap-only against its beta. Usage, from the repository root:
``python results/objpose_quick/balance.py [--runs runs/objpose_quick] [--figure PATH]``. The
table it printed for the runs of 2026-12-05/06 is ``tables.md`` beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bpnp.pose.study import paired_interval

HERE = Path(__file__).resolve().parent
RUNS_DIR = Path("runs") / "objpose_quick"  # where the experiment writes its run folders
MESHES = {"spot": "add", "cow": "add", "teapot": "adds"}  # the teapot is rotationally symmetric: ADD-S
# beta set by the balance (0.3: the default) or fixed
RUNS = {
    "balance 0.3": "bpnp-add_seed{}",
    "balance 0.1": "bpnp-add-balance0.1_seed{}",
    "beta 0.5": "bpnp-add-beta0.5_seed{}",
    "beta 0.5, learned weights": "bpnp-add-beta0.5-learned-weights_seed{}",
    "beta 0.5, weight head": "bpnp-add-beta0.5-weight-head_seed{}",
}
# the settings that differ in beta alone (the figure joins each seed's runs of these)
JOINED = ("balance 0.3", "balance 0.1", "beta 0.5")
# column: (per-image key, scale, label)
COLUMNS = {
    "kp": ("kp_error_px", 1.0, "keypoint error (px)"),
    "proj": ("proj2d_5px", 100.0, "2D projection < 5 px (points)"),
    "add01": ("{}_0.1d", 100.0, "ADD(-S)-0.1d (points)"),
    "add_mm": ("{}_mm", 1.0, "mean ADD(-S) (mm)"),
}


def _read(run: Path) -> tuple[dict[str, np.ndarray], float | None]:
    per = np.load(run / "eval" / "per_image.npz")
    beta = json.loads((run / "train_summary.json").read_text()).get("beta")
    return {k: per[k] for k in per.files}, beta


def _fmt(mean: float, lo: float, hi: float) -> str:
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def differences(run: Path, base_dir: Path, add: str) -> tuple[float | None, dict[str, np.ndarray]]:
    """``run``'s beta and its per-image differences to ``base_dir`` for each of ``COLUMNS``."""
    base, _ = _read(base_dir)
    per, beta = _read(run)
    if not np.array_equal(per["ids"], base["ids"]):
        raise ValueError(f"{run}: not the test images of {base_dir}")
    diffs = {}
    for col, (key, scale, _) in COLUMNS.items():
        key = key.format(add)
        diffs[col] = (per[key].astype(np.float64) - base[key].astype(np.float64)) * scale
    return beta, diffs


def collect(root: Path = RUNS_DIR) -> dict:
    """Per mesh, setting (``RUNS``) and seed: beta and the per-image differences to heatmap-only."""
    found: dict = {}
    for mesh, add in MESHES.items():
        for seed in range(3):
            for setting, name in RUNS.items():
                run = root / mesh / name.format(seed)
                if not (run / "eval" / "per_image.npz").is_file():
                    continue
                # The baseline is the heatmap-only run whose warm-up this run continued: the pair
                # shares every step before the pose loss starts.
                warm_start = json.loads((run / "config.json").read_text())["warm_start"]
                base_dir = root / mesh / Path(warm_start).parent.name
                beta, diffs = differences(run, base_dir, add)
                found.setdefault(mesh, {}).setdefault(setting, {})[seed] = {"beta": beta, "diffs": diffs}
    return found


def table(found: dict) -> str:
    head = "| mesh | loss weight | seed | beta | " + " | ".join(label for _, _, label in COLUMNS.values()) + " |"
    lines = [head, "|" + "---|" * (4 + len(COLUMNS))]
    for mesh, by_setting in found.items():
        for setting, by_seed in by_setting.items():
            for seed, run in sorted(by_seed.items()):
                cells = [_fmt(*paired_interval([run["diffs"][c]])) for c in COLUMNS]
                lines.append(f"| {mesh} | {setting} | {seed} | {run['beta']:.2f} | " + " | ".join(cells) + " |")
            if len(by_seed) >= 2:
                cells = [_fmt(*paired_interval([r["diffs"][c] for r in by_seed.values()])) for c in COLUMNS]
                betas = ", ".join(f"{r['beta']:.2f}" for _, r in sorted(by_seed.items()))
                lines.append(f"| **{mesh}** | **{setting}** | **all** | {betas} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(found: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"spot": "tab:blue", "cow": "tab:orange", "teapot": "tab:green"}
    markers = {
        "balance 0.3": "o",
        "balance 0.1": "^",
        "beta 0.5": "s",
        "beta 0.5, learned weights": "x",
        "beta 0.5, weight head": "+",
    }
    panels = ("add01", "proj", "kp")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.8, 3.6))
    for ax, col in zip(axes, panels):
        for mesh, by_setting in found.items():
            for setting, by_seed in by_setting.items():
                betas = [r["beta"] for r in by_seed.values()]
                means = [r["diffs"][col].mean() for r in by_seed.values()]
                ax.scatter(betas, means, c=colours[mesh], marker=markers[setting], s=45)
            # The same mesh and seed under each setting with its own beta, joined in the order of beta.
            settings = [b for b in by_setting if b in JOINED]
            for seed in set.intersection(*(set(by_setting[b]) for b in settings)):
                pair = sorted((by_setting[b][seed] for b in settings), key=lambda r: r["beta"])
                ax.plot([r["beta"] for r in pair], [r["diffs"][col].mean() for r in pair], c=colours[mesh], lw=0.8)
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_xlabel("beta")
        ax.set_title(f"{COLUMNS[col][2]}\nvs heatmap-only", fontsize=9)
    handles = [plt.Line2D([], [], ls="", marker="D", c=c, label=m) for m, c in colours.items()]
    handles += [plt.Line2D([], [], ls="", marker=mk, c="0.3", label=b) for b, mk in markers.items()]
    # Beside the panels: inside, it hid runs of the first.
    axes[-1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", type=Path, default=HERE.parents[1] / "docs" / "figures" / "objpose_balance.png")
    parser.add_argument("--runs", type=Path, default=RUNS_DIR, help="the experiment's --out folder")
    args = parser.parse_args()
    found = collect(args.runs)
    print(table(found))
    figure(found, args.figure)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
