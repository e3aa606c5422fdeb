"""Sim-to-real on a chessboard: train on photo-like renders of a board, evaluate on photographs.

``bpnp board-experiment --photos left*.jpg --seeds 0 1 2 --out runs/board``: writes the textured
board mesh, renders the training split (:mod:`bpnp.pose.photo` effects, views within 70 degrees of
the board's normal, the board's corners as keypoints), turns the photographs into a BOP test split
(:mod:`bpnp.pose.board_split`: each pose from its detected corners), trains each variant and seed
(heatmap-only and the BPnP ADD loss by default) and evaluates it on the photographs, then reports
each run and the paired difference to heatmap-only (t-interval over the seeds; with one seed a
bootstrap over the photographs). Finished runs are read back, not trained again, so the command
continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..reporting import markdown_table

__all__ = ["run"]

#: The renders the photographs are compared against (a change makes another experiment).
RENDER = {"count": 4000, "size": 128, "seed": 0, "view_cone": 70.0, "occluder_prob": 0.3, "margin": 1.0}
#: Per-image columns: (key, scale, label); ``photo_`` keys are scored in the photographs' own
#: pixels (``bpnp score``), the others in the network's crop (``bpnp evaluate``).
COLUMNS = (
    ("add_0.1d", 100.0, "ADD-0.1d (%)"),
    ("photo_proj2d_5px", 100.0, "2D projection < 5 px, photo pixels (%)"),
    ("proj2d_5px", 100.0, "2D projection < 5 px, crop pixels (%)"),
    ("kp_error_px", 1.0, "keypoint error, crop (px)"),
)


def run(
    photos: Sequence[str | Path],
    out: str | Path,
    seeds: Sequence[int] = (0,),
    variants: Sequence[str] = ("heatmap", "bpnp-add"),
    steps: int = 3200,
    board: tuple[int, int] = (9, 6),
    square_mm: float = 25.0,
    camera: str | Path | None = None,
    quiet: bool = False,
    render: dict | None = None,
    size: int | None = None,
    distortion: bool = False,
) -> dict:
    """Render, split the photographs, train and evaluate every variant and seed, report
    (``out/report.md``, ``out/metrics.json``); returns the metrics. ``render`` replaces entries of
    :data:`RENDER` (tests make tiny experiments with it); ``size`` the network's input size.
    When the camera has a lens model (given, or calibrated with ``distortion``), the renders are
    windows of that lens (:class:`~bpnp.pose.config.RenderSettings` ``lens``) up to 80% of the way
    to the photographs' corners, and evaluation solves PnP through it."""
    out = Path(out)
    settings = {**RENDER, **(render or {})}
    train_split, test_split = _prepare(photos, out, board, square_mm, camera, quiet, settings, distortion)
    found: dict[str, dict[int, dict]] = {v: {} for v in variants}
    for seed in seeds:
        for variant in variants:
            run_dir = out / f"{variant}_seed{seed}"
            found[variant][seed] = _train_and_evaluate(
                run_dir, train_split, test_split, variant, seed, steps, quiet, size or settings["size"]
            )
    return _report(out, found, variants, seeds, quiet, settings)


def _prepare(photos, out: Path, board, square_mm: float, camera, quiet: bool, r: dict, distortion: bool):
    """The photographs' split (first: the renders take its lens), then the training renders."""
    from .board_split import board_split
    from .config import RenderSettings
    from .synthesis import render_dataset
    from .targets import board_keypoints, write_chessboard

    test_split = out / "real" / "test"
    if not (test_split / "board_split.json").is_file():
        board_split(photos, out / "real", board, square_mm, r["margin"], camera, quiet=quiet, distortion=distortion)
    real = json.loads((test_split / "board_split.json").read_text())
    train_split = out / "data" / "train"
    if not (train_split / "render_settings.json").is_file():
        mesh = write_chessboard(out / "mesh", *board, square_mm, margin=r["margin"])
        settings = RenderSettings(
            size=r["size"], occluder_prob=r["occluder_prob"], view_cone=r["view_cone"], photo=True, **_lens_of(real)
        )
        render_dataset(
            mesh, out / "data", r["count"], settings, seed=r["seed"], split="train", diameter_mm=None,
            keypoints=board_keypoints(*board, square_mm),
        )  # fmt: skip
    return train_split, test_split


def _lens_of(real: dict) -> dict:
    """``RenderSettings`` entries for the photographs' lens: none for a pinhole camera; else the
    lens, its windows up to 80% of the way to the farthest image corner (normalised, distorted)."""
    if not real.get("dist") or not any(real["dist"]):
        return {}
    K, (w, h) = np.asarray(real["K"]), real.get("image_size", (2 * real["K"][0][2], 2 * real["K"][1][2]))
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=np.float64)
    normalised = (corners - K[:2, 2]) / np.diag(K)[:2]
    return {"lens": tuple(real["dist"]), "lens_field": float(0.8 * np.linalg.norm(normalised, axis=1).max())}


def _train_and_evaluate(run_dir: Path, train_split: Path, test_split: Path, variant, seed, steps, quiet, size) -> dict:
    from .config import TrainConfig
    from .data import crop_margin_for
    from .evaluate import evaluate, score_predictions
    from .train import train

    metrics_file = run_dir / "eval" / "metrics.json"
    if not metrics_file.is_file():
        cfg = TrainConfig(
            data=str(train_split), test_data=str(test_split), variant=variant, steps=steps, seed=seed,
            out=str(run_dir), progress=not quiet, size=size, log_every=min(10, steps), checkpoint_every=min(100, steps),
        )  # fmt: skip
        train(cfg, resume=(run_dir / "checkpoint.pt").is_file())
        # The renders' framing (also recorded in the checkpoint; given here for runs that predate it).
        margin = crop_margin_for(train_split)
        evaluate(run_dir / "model.pt", test_split, run_dir / "eval", quiet=True, crop_margin=margin)
    if not (run_dir / "score" / "per_image.npz").is_file():
        score_predictions(run_dir / "eval" / "predictions.csv", test_split, run_dir / "score", quiet=True)
    per = dict(np.load(run_dir / "eval" / "per_image.npz"))
    photo = np.load(run_dir / "score" / "per_image.npz")
    per.update({f"photo_{k}": photo[k] for k in photo.files})
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {"metrics": json.loads(metrics_file.read_text()), "per": per, "train": summary}


def _report(out: Path, found: dict, variants: Sequence[str], seeds: Sequence[int], quiet: bool, r: dict) -> dict:
    from .study import paired_interval

    rows, metrics = [], {"seeds": list(seeds), "variants": {}}
    base = variants[0]
    for variant in variants:
        entry = {}
        for key, scale, _ in COLUMNS:
            values = [float(found[variant][s]["per"][key].mean()) * scale for s in seeds]
            entry[key] = {"per_seed": values, "mean": float(np.mean(values))}
            if variant != base:
                diffs = [
                    (found[variant][s]["per"][key].astype(float) - found[base][s]["per"][key].astype(float)) * scale
                    for s in seeds
                ]
                entry[key]["difference"] = paired_interval(diffs)
        entry["train_seconds"] = [found[variant][s]["train"]["seconds"] for s in seeds]
        metrics["variants"][variant] = entry
        for i, s in enumerate(seeds):
            rows.append([variant, s] + [f"{entry[k]['per_seed'][i]:.1f}" for k, _, _ in COLUMNS])
        cells = []
        for key, _, _ in COLUMNS:
            d = entry[key].get("difference")
            cells.append(
                f"{entry[key]['mean']:.1f}" + ("" if d is None else f" ({d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}])")
            )
        rows.append([f"**{variant}**", "mean"] + cells)
    images = int(len(found[base][seeds[0]]["per"]["kp_error_px"]))
    table = markdown_table(["variant", "seed"] + [label for _, _, label in COLUMNS], rows)
    overlays = "\n".join(f"![{v} seed {seeds[0]}]({v}_seed{seeds[0]}/eval/overlays.png)" for v in variants)
    report = (
        f"# Sim-to-real on a chessboard\n\nTrained on {_render_line(r)}; evaluated on {images} photographs "
        f"(ground truth from their corners, `real/test/board_split.json`). Brackets: difference to {base}, "
        f"mean [95% interval; over the seeds when there are several].\n\n{table}\n\n{overlays}\n"
    )
    (out / "report.md").write_text(report)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if not quiet:
        print(table)
    return metrics


def _render_line(r: dict) -> str:
    return (
        f"{r['count']} photo-like renders of {r['size']} px (views within {r['view_cone']:g} deg of the board's "
        f"normal, {r['occluder_prob']:.0%} occluded)"
    )
