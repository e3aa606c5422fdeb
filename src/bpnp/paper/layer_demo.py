"""Demo of the layer: solve a batch, compare with OpenCV, check gradients by finite differences."""

from __future__ import annotations

from pathlib import Path

import torch

from ..layer import solve_pnp
from ..metrics import rotation_error_deg
from ..reporting import Timer, markdown_table, output_dir, write_json
from ..synthetic import random_problems
from ..testing import analytic_gradient, fd_gradient, loss_weights


def run(
    out: str | None = None, batch: int = 256, n: int = 20, seed: int = 0, device: str = "cpu", quiet: bool = False
) -> dict:
    """Solve ``batch`` random problems, compare with OpenCV, check every input's gradient.

    Writes ``metrics.json`` and ``report.md`` into ``out`` and returns the metrics.
    """
    path = output_dir(out, "layer")
    p = random_problems(batch, n, seed=seed, device=device)
    solve_pnp(p.x2d[:2], p.x3d[:2], p.K[:2], p.weights[:2])  # warm-up
    with Timer() as timer:
        res = solve_pnp(p.x2d, p.x3d, p.K, p.weights)
    R_err = rotation_error_deg(res.pose, p.pose)
    metrics: dict = {
        "batch": batch,
        "n": n,
        "device": str(device),
        "solve_seconds": timer.seconds,
        "converged": int(res.converged.sum()),
        "median_rotation_error_deg": float(R_err.median()),
        "median_cost_px2": float(res.cost.median()),
    }
    try:
        from ..solvers.opencv import solve_pnp_opencv

        cpu = [x.cpu() for x in (p.x2d, p.x3d, p.K, p.weights)]
        ref = solve_pnp_opencv(*cpu)
        metrics["cost_over_opencv_max"] = float((res.cost.cpu() / ref.cost.clamp_min(1e-300)).max())
    except ImportError:
        metrics["cost_over_opencv_max"] = None
    small = {"x2d": p.x2d[:2].cpu(), "x3d": p.x3d[0].cpu(), "K": p.K[0].cpu(), "weights": p.weights[:2].cpu()}
    v = loss_weights(2)
    rows = []
    for name in ("x2d", "x3d", "K", "weights"):
        mask = None
        if name == "K":
            mask = torch.tensor([[1.0, 1, 1], [0, 1, 1], [0, 0, 0]], dtype=torch.float64)
        g = analytic_gradient(small, name, v)
        g = g if mask is None else g * mask
        g_fd = fd_gradient(small, name, v, mask)
        rel = float((g - g_fd).norm() / g_fd.norm())
        rows.append((name, tuple(small[name].shape), rel))
    metrics["gradient_check"] = {r[0]: r[2] for r in rows}
    table = markdown_table(["input", "shape", "rel. error vs central FD"], rows)
    summary = markdown_table(
        ["problems", "points", "solve time (s)", "converged", "median rot. error (deg)", "max cost / OpenCV+LM"],
        [
            (
                batch,
                n,
                timer.seconds,
                f"{metrics['converged']}/{batch}",
                metrics["median_rotation_error_deg"],
                metrics["cost_over_opencv_max"] if metrics["cost_over_opencv_max"] is not None else "n/a",
            )
        ],
    )
    report = f"# bpnp layer demo\n\n## Forward\n\n{summary}\n\n## Backward (float64)\n\n{table}\n"
    (Path(path) / "report.md").write_text(report)
    write_json(Path(path) / "metrics.json", metrics)
    if not quiet:
        print(report)
        print(f"written: {path}/report.md, {path}/metrics.json")
    return metrics
