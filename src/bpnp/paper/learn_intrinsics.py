"""Experiment 3 of the paper: learn the camera intrinsics through the PnP layer.

The cube is seen at ``poses[0]`` by a camera with fx = 800, fy = 700, cx = 400, cy = 300. Starting
from intrinsics more than 20% off, the loss is the reprojection error of the cube with the pose
that the layer finds for the current intrinsics; its gradient reaches K both directly (through
the projection) and through the layer.
"""

from __future__ import annotations

import time

import torch

from .. import plots
from ..calibration import camera_from_params, learn_camera
from ..geometry import project
from ..reporting import finish_experiment, markdown_table, output_dir
from . import demo_data

TRUE_K = (800.0, 700.0, 400.0, 300.0)
NAMES = ("fx", "fy", "cx", "cy")


def run(out: str | None = None, iters: int = 40, seed: int = 0, device: str = "cpu", quiet: bool = False) -> dict:
    """Run the calibration experiment; writes metrics.json, plots and report.md into ``out``."""
    path = output_dir(out, "calib")
    dev = torch.device(device)
    z = demo_data.cube().to(dev)
    truth = torch.tensor(TRUE_K, dtype=torch.float64, device=dev)
    target = project(z, demo_data.poses()[0].to(dev), camera_from_params(truth))[None]  # 1x8x2
    g = torch.Generator().manual_seed(seed)
    # Each intrinsic 20-40% off, up or down at random.
    off = 0.2 + 0.2 * torch.rand(4, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(4, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    start = (truth.cpu() * (1 + sign * off)).to(dev)
    t0 = time.perf_counter()
    fit = learn_camera(target, z, start, iters=iters, quiet=quiet, desc="calib", loss_floor=1e-16)
    params, history, losses = fit.params, fit.history, fit.losses
    seconds = time.perf_counter() - t0
    rel = (params / truth - 1).abs()
    metrics = {
        "experiment": "calib",
        "learned": dict(zip(NAMES, params.tolist())),
        "truth": dict(zip(NAMES, truth.tolist())),
        "start": dict(zip(NAMES, start.tolist())),
        "start_error_rel": dict(zip(NAMES, (start / truth - 1).abs().tolist())),
        "error_rel": dict(zip(NAMES, rel.tolist())),
        "max_error_rel": float(rel.max()),
        "final_loss_px2": losses[-1],
        "iterations": len(losses) - 1,
        "evaluations": fit.evaluations,
        "seconds": seconds,
        "device": str(dev),
        "seed": seed,
    }
    metrics["acceptance"] = {"each intrinsic within 0.1%": bool(rel.max() < 1e-3)}
    plots.loss_curve(path / "loss.png", losses, "calib: reprojection loss", "loss (px^2)")
    plots.parameter_trajectories(path / "intrinsics.png", history, TRUE_K, NAMES, "calib: intrinsics")
    rows = [
        (n, metrics["start"][n], metrics["learned"][n], metrics["truth"][n], metrics["error_rel"][n]) for n in NAMES
    ]
    table = markdown_table(["", "start", "learned", "truth", "rel. error"], rows)
    report = (
        "# Calibration experiment\n\nIntrinsics learned through the PnP layer from the cube seen at "
        f"`poses[0]`: {fit.evaluations} solves through the layer (Levenberg-Marquardt on the exact "
        f"Jacobian, the layer's derivatives inside), {seconds:.1f} s.\n\n"
        + table
        + "\n\n![loss](loss.png)\n\n![intrinsics](intrinsics.png)\n"
    )
    return finish_experiment(path, report, metrics, table, quiet)
