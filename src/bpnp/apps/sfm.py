"""Experiment 2 of the paper: learn 3D structure through the PnP layer (structure from motion).

A model (free 3D points) outputs the 1000 duck points; each of 12 views (``poses[:12]``) sees
one half of the points (split at the median of x, y or z); the layer gives every view's pose
from the current points and that view's observations; the loss is the reprojection error of
the visible points. Zero weights hide the other half from the layer. Units follow the paper's
demo: points scaled by 5.86e-6, f = 5e-4, cx = cy = 0.
"""

from __future__ import annotations

import time

import torch

from ..geometry import project
from ..layer import solve_pnp
from ..options import SolverOptions
from . import data, plots
from .common import finish_experiment, markdown_table, output_dir, progress
from .metrics_util import similarity_align

SCALE = 5.86e-6
FOCAL = 5e-4


def visibility(points: torch.Tensor, views: int) -> torch.Tensor:
    """``(views, n)`` masks: view i sees the half ``i % 6`` (axis ``(i % 6) // 2``, below or
    above the median)."""
    med = points.median(0).values
    masks = []
    for i in range(views):
        h = i % 6
        below = points[:, h // 2] < med[h // 2]
        masks.append(below if h % 2 == 0 else ~below)
    return torch.stack(masks)


def run(
    out: str | None = None,
    iters: int = 20,
    seed: int = 0,
    device: str = "cpu",
    init_noise: float = 0.5,
    quiet: bool = False,
) -> dict:
    """Run the SfM experiment; writes metrics.json, plots and report.md into ``out``.

    Args:
        iters: L-BFGS steps (each up to 20 evaluations of loss and gradient through the layer).
        init_noise: the start is the truth plus Gaussian noise of this many object sizes (std).
            Bundle adjustment is not convex: from a cloud unrelated to the truth it stalls in a
            local minimum; with noise 1.0 (the shape buried under noise three times its spread)
            it still converges.
    """
    torch.manual_seed(seed)
    path = output_dir(out, "sfm")
    dev = torch.device(device)
    truth = (data.duck()[:1000] * SCALE).to(dev)
    views = 12
    poses = data.poses()[:views].to(dev)
    K = data.camera_matrix(FOCAL, FOCAL, 0.0, 0.0).to(dev)
    weights = visibility(truth, views).to(torch.float64)
    x2d = project(truth, poses, K)  # 12x1000x2, the observations
    size = float(torch.cdist(truth, truth).max())
    g = torch.Generator().manual_seed(seed)
    start = truth + init_noise * size * torch.randn(truth.shape, generator=g, dtype=torch.float64).to(dev)
    u = torch.nn.Parameter(start / size)  # points in units of the object size
    opt = torch.optim.LBFGS(
        [u],
        lr=1.0,
        max_iter=20,
        history_size=50,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-20,
        tolerance_change=1e-30,
    )
    losses, rms_hist = [], []
    state = {"pose": None}

    def rms_rel(points):
        return float((similarity_align(points, truth) - truth).pow(2).sum(-1).mean().sqrt()) / size

    def closure():
        opt.zero_grad()
        points = u * size
        first = state["pose"] is None
        # Warm start from the last poses; a global solve every 20 evaluations re-checks them.
        global_search = first or len(losses) % 20 == 0
        res = solve_pnp(
            x2d,
            points,
            K,
            weights,
            init_pose=state["pose"],
            warn=False,
            options=SolverOptions(global_search=global_search),
        )
        state["pose"] = res.pose.detach()
        err = (project(points, res.pose, K) - x2d).pow(2).sum(-1)
        loss = (err * weights).sum() / weights.sum() / FOCAL**2  # normalised image units
        loss.backward()
        u.grad = u.grad.contiguous()  # L-BFGS views the gradient as flat
        losses.append(float(loss.detach()))
        rms_hist.append(rms_rel(points.detach()))
        return loss

    t0 = time.perf_counter()
    for _ in progress(range(iters), desc="sfm", disable=quiet):
        opt.step(closure)
        if losses[-1] < 1e-26:
            break
    seconds = time.perf_counter() - t0
    points = (u * size).detach()
    aligned = similarity_align(points, truth)
    rms = rms_rel(points)
    start_rms = rms_rel(start)
    metrics = {
        "experiment": "sfm",
        "rms_error_rel_to_size": rms,
        "start_rms_error_rel_to_size": start_rms,
        "init_noise_in_sizes": init_noise,
        "object_size": size,
        "object_size_definition": "largest distance between two true points",
        "final_loss": losses[-1],
        "views": views,
        "points": truth.shape[0],
        "evaluations": len(losses),
        "seconds": seconds,
        "device": str(dev),
        "seed": seed,
        "acceptance": {"rms after similarity alignment < 1% of size": rms < 0.01},
    }
    plots.loss_curve(path / "loss.png", losses, "sfm: reprojection loss", "loss (normalised image units^2)")
    plots.loss_curve(path / "rms.png", rms_hist, "sfm: aligned RMS error / object size", "RMS / size")
    plots.points_3d(
        path / "points.png",
        [start.cpu().numpy(), aligned.cpu().numpy(), truth.cpu().numpy()],
        ["start", "learned (aligned)", "truth"],
        "sfm: 3D points",
    )
    table = markdown_table(
        ["RMS / size (start)", "RMS / size (learned)", "views", "points", "evaluations", "time (s)"],
        [(start_rms, rms, views, truth.shape[0], len(losses), seconds)],
    )
    report = (
        "# Structure-from-motion experiment\n\n1000 duck points learned through the PnP layer (L-BFGS) "
        "from 12 views that each see half of them (zero weights hide the rest from the layer); the start "
        f"is the truth under Gaussian noise of {init_noise} object sizes. Errors after a similarity "
        "alignment to the truth.\n\n" + table + "\n\n![loss](loss.png) ![rms](rms.png)\n\n![points](points.png)\n"
    )
    return finish_experiment(path, report, metrics, table, quiet)
