"""Outliers: bpnp's RANSAC and robust costs against least squares, the true-inlier bound and OpenCV.

The setting of issue #8: n = 50 points, 1 px noise, 30% planar objects, focal 500-1500 px,
640 x 480 image, outliers = image points replaced by uniform random points of the image
(``bpnp.synthetic.outlier_problems``), one thread. Success: rotation error < 1 deg and
translation error < 1% of the distance. bpnp rows solve the whole batch in one call; OpenCV rows
loop over the problems (``solvePnPRansac`` then ``solvePnPRefineLM`` on its inliers, 4 px,
confidence 0.999). Times per problem; ratios to the least-squares bpnp solve of the same
problems (same run).

    python benchmarks/bench_robust.py [--problems 1000] [--ratios 0 0.1 0.3 0.5]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

import bpnp
from bpnp.geometry import rvec_to_rotmat
from bpnp.progress import progress
from bpnp.synthetic import outlier_problems

try:
    from common import QUIET_S, machine, write_json
except ImportError:  # run as a module
    from .common import QUIET_S, machine, write_json


def errors(pose: torch.Tensor, true: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    R1, R2 = rvec_to_rotmat(pose[:, :3].double()), rvec_to_rotmat(true[:, :3])
    c = ((R1.transpose(-1, -2) @ R2).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    rot = torch.rad2deg(torch.arccos(c.clamp(-1, 1)))
    trans = (pose[:, 3:].double() - true[:, 3:]).norm(dim=-1) / true[:, 3:].norm(dim=-1)
    rot = torch.nan_to_num(rot, nan=180.0)
    trans = torch.nan_to_num(trans, nan=float("inf"))
    return rot.numpy(), trans.numpy()


def opencv_rows(p, flag_name: str) -> torch.Tensor:
    import cv2

    flag = getattr(cv2, flag_name)
    out = torch.full((p.x2d.shape[0], 6), float("nan"), dtype=torch.float64)
    for b in range(p.x2d.shape[0]):
        obj, img, K = p.x3d[b].numpy(), p.x2d[b].numpy(), p.K[b].numpy()
        ok, rvec, tvec, inl = cv2.solvePnPRansac(
            obj, img, K, None, reprojectionError=4.0, confidence=0.999, iterationsCount=1000, flags=flag
        )
        if not ok or inl is None or len(inl) < 4:
            continue
        idx = inl[:, 0]
        rvec, tvec = cv2.solvePnPRefineLM(obj[idx], img[idx], K, None, rvec, tvec)
        out[b, :3] = torch.from_numpy(rvec[:, 0])
        out[b, 3:] = torch.from_numpy(tvec[:, 0])
    return out


def timed(fn):
    time.sleep(QUIET_S)
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-opencv", action="store_true", help="skip the OpenCV rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", bpnp.PnPConvergenceWarning)
    B = args.problems
    methods = {
        "bpnp least squares": lambda p, inl: bpnp.solve_pnp(p.x2d, p.x3d, p.K).pose,
        "bpnp given the true inliers (bound)": lambda p, inl: bpnp.solve_pnp(p.x2d, p.x3d, p.K, inl.double()).pose,
        "bpnp ransac=True": lambda p, inl: bpnp.solve_pnp(p.x2d, p.x3d, p.K, ransac=True).pose,
        "bpnp ransac=True, loss='huber' (2 px)": lambda p, inl: (
            bpnp.solve_pnp(p.x2d, p.x3d, p.K, ransac=True, loss="huber", loss_scale=2.0).pose
        ),
        "bpnp loss='cauchy' (2 px), no RANSAC": lambda p, inl: (
            bpnp.solve_pnp(p.x2d, p.x3d, p.K, loss="cauchy", loss_scale=2.0).pose
        ),
        "bpnp ransac=True, torch solver": lambda p, inl: (
            bpnp.solve_pnp(p.x2d, p.x3d, p.K, ransac=True, backend="torch").pose
        ),
    }
    if not args.no_opencv:
        methods["OpenCV USAC_MAGSAC 4 px + RefineLM"] = lambda p, inl: opencv_rows(p, "USAC_MAGSAC")
        methods["OpenCV solvePnPRansac SQPNP 4 px + RefineLM"] = lambda p, inl: opencv_rows(p, "SOLVEPNP_SQPNP")
    rows = []
    for ratio in progress(args.ratios, desc="outlier ratios"):
        p, inl = outlier_problems(B, 50, ratio, seed=args.seed)
        planar = p.x3d[:, :, 2].abs().amax(-1) == 0
        base = None
        for name, fn in methods.items():
            pose, seconds = timed(lambda: fn(p, inl))
            rot, trans = errors(pose, p.pose)
            ok = (rot < 1.0) & (trans < 0.01)
            if base is None:
                base = seconds
            rows.append(
                {
                    "method": name,
                    "outlier_ratio": ratio,
                    "success": float(ok.mean()),
                    "success_planar": float(ok[planar.numpy()].mean()),
                    "success_nonplanar": float(ok[~planar.numpy()].mean()),
                    "median_rotation_error_deg": float(np.median(rot)),
                    "time_per_problem_us": seconds / B * 1e6,
                    "time_vs_least_squares": seconds / base,
                }
            )
    print(f"{B} problems per outlier ratio, n = 50, 1 px noise, 30% planar, one thread\n")
    print("| method | outliers | success | planar | non-planar | median rot. err (deg) | us / problem | vs LS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['outlier_ratio']:.0%} | {r['success']:.1%} | {r['success_planar']:.1%} | "
            f"{r['success_nonplanar']:.1%} | {r['median_rotation_error_deg']:.4f} | "
            f"{r['time_per_problem_us']:.0f} | {r['time_vs_least_squares']:.2f}x |"
        )
    path = write_json("robust", {"machine": machine(), "problems": B, "seed": args.seed, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
