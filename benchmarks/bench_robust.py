"""Outliers: bpnp's RANSAC and robust costs against least squares, the true-inlier bound and OpenCV.

The setting of issue #8: n = 50 points, 1 px noise, 30% planar objects, focal 500-1500 px,
640 x 480 image, outliers = image points replaced by uniform random points of the image
(``bpnp.synthetic.outlier_problems``), one thread. Success: rotation error < 1 deg and
translation error < 1% of the distance. bpnp rows solve the whole batch in one call; OpenCV rows
loop over the problems (``solvePnPRansac`` then ``solvePnPRefineLM`` on its inliers, 4 px,
confidence 0.999). Times per problem; ratios to the least-squares bpnp solve of the same
problems (same run).

    python benchmarks/bench_robust.py [--problems 1000] [--ratios 0 0.1 0.3 0.5]

Where real matches take RANSAC (``--sets few competing independence coverage``, each writes its
own JSON): few points with gross outliers (``few_point_problems``: n = 6-10, 1-3 outliers, at
least 5 true inliers), a competing structure (``competing_problems``: 45% of the matches from a
second copy of the object), batch and order independence (items alone, in a batch, shuffled;
with and without ``dist``; both backends), and the coverage of ``res.covariance`` for l2, huber
and cauchy (1,000 re-solves of one problem per setting).

    python benchmarks/bench_robust.py --sets few competing independence coverage --problems 500
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


def success_of(pose: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    rot, trans = errors(pose, true)
    return (rot < 1.0) & (trans < 0.01)


def opencv_ransac_refined(p, i: int, flag_name: str = "SOLVEPNP_SQPNP") -> np.ndarray:
    """OpenCV's RANSAC + RefineLM on problem ``i`` (its points of positive weight): a pose, or NaN."""
    import cv2

    keep = p.weights[i].numpy() > 0
    obj, img, K = p.x3d[i].numpy()[keep], p.x2d[i].numpy()[keep], p.K[i].numpy()
    ok, rvec, tvec, inl = cv2.solvePnPRansac(
        obj, img, K, None, reprojectionError=4.0, confidence=0.999, iterationsCount=1000, flags=getattr(cv2, flag_name)
    )
    if not ok or inl is None or len(inl) < 4:
        return np.full(6, np.nan)
    idx = inl[:, 0]
    rvec, tvec = cv2.solvePnPRefineLM(obj[idx], img[idx], K, None, rvec, tvec)
    return np.r_[rvec[:, 0], tvec[:, 0]]


def few_points_set(B: int, seed: int, opencv: bool) -> dict:
    from bpnp.synthetic import few_point_problems

    p, truth = few_point_problems(B, seed=seed)
    out = {}
    for backend in ("native", "torch"):
        res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, ransac=True, backend=backend, warn=False)
        out[f"bpnp ransac=True ({backend})"] = float(success_of(res.pose, p.pose).mean())
    bound = bpnp.solve_pnp(p.x2d, p.x3d, p.K, truth.double(), warn=False)
    out["bpnp given the true inliers (bound)"] = float(success_of(bound.pose, p.pose).mean())
    if opencv:
        poses = torch.tensor(np.stack([opencv_ransac_refined(p, i) for i in range(B)]))
        out["OpenCV solvePnPRansac SQPNP + RefineLM"] = float(success_of(poses, p.pose).mean())
    return out


def msac_scores(pose: torch.Tensor, p) -> torch.Tensor:
    e = (bpnp.project(p.x3d, pose, p.K) - p.x2d).pow(2).sum(-1)
    return (p.weights * e.clamp(max=16.0)).sum(-1)


def competing_set(B: int, seed: int, opencv: bool) -> dict:
    from bpnp.synthetic import competing_problems

    p, truth = competing_problems(B, seed=seed)
    on_truth = bpnp.solve_pnp(p.x2d, p.x3d, p.K, truth.double(), warn=False).pose
    best = msac_scores(on_truth, p)
    out = {}
    candidates = {}
    for backend in ("native", "torch"):
        candidates[f"bpnp ransac=True ({backend})"] = bpnp.solve_pnp(
            p.x2d, p.x3d, p.K, ransac=True, backend=backend, warn=False
        ).pose
    if opencv:
        candidates["OpenCV solvePnPRansac SQPNP + RefineLM"] = torch.tensor(
            np.stack([opencv_ransac_refined(p, i) for i in range(B)])
        )
    for name, pose in candidates.items():
        score = msac_scores(torch.nan_to_num(pose, nan=0.0), p)
        # another structure, not a slightly different fit of this one: 5% above the true pose's score
        worse = ~(score <= best * 1.05)
        out[name] = {"success": float(success_of(pose, p.pose).mean()), "worse_scoring_structure": int(worse.sum())}
    return out


def independence_set(B: int, seed: int) -> dict:
    from bpnp.synthetic import competing_problems, outlier_problems

    a, _ = competing_problems(B // 2, n=40, seed=seed)
    b, _ = outlier_problems(B - B // 2, 40, 0.4, seed=seed + 1)
    x2d, x3d, K = torch.cat([a.x2d, b.x2d]), torch.cat([a.x3d, b.x3d]), torch.cat([a.K, b.K])
    pose_true = torch.cat([a.pose, b.pose])
    out = {}
    for with_dist in (False, True):
        dist = torch.tensor([-0.1, 0.02, 0.001, -0.001, 0.0], dtype=torch.float64) if with_dist else None
        xs = x2d if dist is None else x2d + bpnp.project(x3d, pose_true, K, dist) - bpnp.project(x3d, pose_true, K)
        for backend in ("native", "torch"):
            kw = dict(ransac=True, backend=backend, warn=False, dist=dist)
            full = bpnp.solve_pnp(xs, x3d, K, **kw)
            perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
            shuffled = bpnp.solve_pnp(xs[perm], x3d[perm], K[perm], **kw)
            inv = perm.argsort()
            changed = (shuffled.inliers[inv] != full.inliers).any(-1) | (
                (shuffled.pose[inv] - full.pose).abs().amax(-1) > 1e-12
            )
            alone = torch.zeros(B, dtype=torch.bool)
            for i in range(B):
                one = bpnp.solve_pnp(xs[i], x3d[i], K[i], **kw)
                alone[i] = (
                    bool((one.inliers != full.inliers[i]).any()) or float((one.pose - full.pose[i]).abs().max()) > 1e-12
                )
            out[f"{backend}, {'dist' if with_dist else 'no dist'}"] = {
                "items": B,
                "changed_when_shuffled": int(changed.sum()),
                "changed_alone": int(alone.sum()),
            }
    return out


def coverage_set(resolves: int, seed: int) -> dict:
    from bpnp.synthetic import random_problems

    p = random_problems(1, 50, noise=0.0, seed=seed + 4, weighted=False)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for gross in (False, True):
        z = torch.randn(resolves, 50, 2, generator=g, dtype=torch.float64)
        if gross:
            z = torch.where(torch.rand(resolves, 50, 1, generator=g, dtype=torch.float64) < 0.1, 5.0 * z, z)
        x2d = p.x2d.expand(resolves, 50, 2) + z
        settings = [("l2", 1.0)] + [(loss, s) for loss in ("huber", "cauchy") for s in (0.5, 1.0, 2.0)]
        for loss, scale in settings:
            res = bpnp.solve_pnp(x2d, p.x3d[0], p.K[0], loss=loss, loss_scale=scale, warn=False)
            d = res.pose - p.pose
            m = (d[:, None, :] @ torch.linalg.solve(res.covariance, d[..., None]))[:, 0, 0]
            name = f"{loss} {scale:g} px, {'10% at 5x the noise' if gross else 'unit noise'}"
            out[name] = float((m <= 12.592).double().mean())
    return out


def run_sets(sets: list[str], B: int, seed: int, opencv: bool) -> None:
    for name in sets:
        t0 = time.perf_counter()
        if name == "few":
            result = few_points_set(B, seed, opencv)
        elif name == "competing":
            result = competing_set(B, seed, opencv)
        elif name == "independence":
            result = independence_set(min(B, 300), seed)
        else:
            result = coverage_set(1000, seed)
        print(f"## {name} ({time.perf_counter() - t0:.0f} s)")
        for key, value in result.items():
            print(f"- {key}: {value}")
        path = write_json(f"robust_{name}", {"machine": machine(), "problems": B, "seed": seed, "result": result})
        print(f"wrote {path}\n")


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
    ap.add_argument(
        "--sets", nargs="+", choices=["few", "competing", "independence", "coverage"], help="these sets instead"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", bpnp.PnPConvergenceWarning)
    if args.sets:
        run_sets(args.sets, args.problems, args.seed, not args.no_opencv)
        return
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
