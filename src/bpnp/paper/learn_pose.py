"""Experiment 1 of the paper: learn 2D keypoints whose PnP pose is a target pose.

A model (free keypoints) outputs the 8 cube corners in the image; the layer turns them into a
pose; the loss compares the cube projected with that pose to the cube projected with the
target pose ``poses[0]`` (K: f = 300, c = 128). Gradients reach the keypoints only through
the layer.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .. import plots
from ..geometry import project
from ..layer import solve_pnp
from ..metrics import rotation_error_deg, translation_error_rel
from ..options import SolverOptions
from ..progress import progress
from ..reporting import finish_experiment, markdown_table, output_dir
from ..synthetic import random_rotations
from . import demo_data


def run(
    out: str | None = None,
    iters: int = 300,
    seed: int = 0,
    device: str = "cpu",
    lr: float = 4.0,
    min_lr_ratio: float = 1e-4,
    quiet: bool = False,
) -> dict:
    """Run the pose experiment; writes metrics.json, plots and report.md into ``out``."""
    torch.manual_seed(seed)
    path = output_dir(out, "pose")
    dev = torch.device(device)
    z = demo_data.cube().to(dev)
    K = demo_data.camera_matrix(300.0, 300.0, 128.0, 128.0).to(dev)
    target_pose = demo_data.poses()[0].to(dev)
    target = project(z, target_pose, K)
    # Start: the cube seen from a random other pose (same distance), so keypoints start far.
    g = torch.Generator().manual_seed(seed)
    start_pose = torch.cat([random_rotations(1, g)[0] * 0.5, target_pose[3:] * 1.2]).to(dev)
    keypoints = torch.nn.Parameter(project(z, start_pose, K).clone())
    opt = torch.optim.Adam([keypoints], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters, eta_min=lr * min_lr_ratio)
    losses, traj, rot_err, trans_err = [], [keypoints.detach().cpu().numpy().copy()], [], []
    pose = None
    t0 = time.perf_counter()
    for _ in progress(range(iters), desc="pose", disable=quiet):
        # Warm start from the last pose: the keypoints move little per step.
        res = solve_pnp(
            keypoints,
            z,
            K,
            init_pose=None if pose is None else pose.detach(),
            warn=False,
            options=SolverOptions(global_search=pose is None),
        )
        pose = res.pose
        loss = (project(z, pose, K) - target).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        traj.append(keypoints.detach().cpu().numpy().copy())
        rot_err.append(float(rotation_error_deg(pose.detach(), target_pose)))
        trans_err.append(float(translation_error_rel(pose.detach(), target_pose)))
    seconds = time.perf_counter() - t0
    final = solve_pnp(keypoints.detach(), z, K).pose
    metrics = {
        "experiment": "pose",
        "rotation_error_deg": float(rotation_error_deg(final, target_pose)),
        "translation_error_rel": float(translation_error_rel(final, target_pose)),
        "final_loss_px2": losses[-1],
        "target_pose": target_pose.tolist(),
        "learned_pose": final.tolist(),
        "K": K.tolist(),
        "iterations": iters,
        "seconds": seconds,
        "device": str(dev),
        "seed": seed,
        "acceptance": {"rotation_error_deg < 0.1": None, "translation_error_rel < 1e-3": None},
    }
    metrics["acceptance"] = {
        "rotation_error_deg < 0.1": metrics["rotation_error_deg"] < 0.1,
        "translation_error_rel < 1e-3": metrics["translation_error_rel"] < 1e-3,
    }
    plots.loss_curve(path / "loss.png", losses, "pose: reprojection loss", "loss (px^2)")
    plots.keypoint_trajectories(
        path / "keypoints.png", np.stack(traj), target.cpu().numpy(), "keypoints during training"
    )
    plots.loss_curve(path / "pose_error.png", rot_err, "pose: rotation error", "rotation error (deg)")
    table = markdown_table(
        ["rotation error (deg)", "translation error (rel.)", "iterations", "time (s)"],
        [(metrics["rotation_error_deg"], metrics["translation_error_rel"], iters, seconds)],
    )
    report = (
        "# Pose experiment\n\nKeypoints of the cube learned through the PnP layer so that the "
        "pose it returns is `poses[0]` (K: f = 300, c = 128).\n\n"
        + table
        + "\n\n![loss](loss.png) ![keypoints](keypoints.png) ![rotation error](pose_error.png)\n"
    )
    return finish_experiment(path, report, metrics, table, quiet)
