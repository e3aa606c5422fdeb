"""bpnp against its peers on the same problems: time, forward+backward time, accuracy.

    python benchmarks/bench_peers.py [--B 128] [--n 50]
    BPNP_ORIGINAL=/path/to/BPnP.py python benchmarks/bench_peers.py   # include the original

Peers: OpenCV solvePnP loops (SQPNP, ITERATIVE, EPNP), kornia's batched solve_pnp_dlt, and
the original BPnP (Chen et al.) when its file is given (never committed here). Accuracy is the
rotation error against the truth and the cost of each answer over bpnp's (the optimum).
Prints a markdown table and writes benchmarks/results/bench_peers.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import traceback

import torch
from common import machine, timeit, write_json

import bpnp
from bpnp.cost import cost_only
from bpnp.geometry import rvec_to_rotmat
from bpnp.metrics import rotation_angle_deg
from bpnp.solvers.native import native_available
from bpnp.synthetic import random_problems


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=128)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--noise", type=float, default=1.0)
    args = ap.parse_args()
    p = random_problems(args.B, args.n, noise=args.noise, weighted=False, seed=7)
    K0 = p.K  # per-item intrinsics
    R_true = rvec_to_rotmat(p.pose[:, :3])
    ones = torch.ones(args.B, args.n, dtype=torch.float64)
    ref = bpnp.solve_pnp(p.x2d, p.x3d, K0)
    optimum = ref.cost
    results = []

    def record(name, fwd_s, fwd_bwd_s, R, t, note=""):
        cost = cost_only(R, t, p.x2d, p.x3d, K0, ones)
        results.append(
            {
                "method": name,
                "fwd_ms": 1e3 * fwd_s if fwd_s is not None else None,
                "fwd_bwd_ms": 1e3 * fwd_bwd_s if fwd_bwd_s is not None else None,
                "median_rot_err_deg": float(rotation_angle_deg(R, R_true).median()),
                "median_cost_over_optimum": float((cost / optimum).median()),
                "max_cost_over_optimum": float((cost / optimum).max()),
                "note": note,
            }
        )
        print(results[-1], flush=True)

    # bpnp: the default backend (native on CPU when a compiler is available) and the torch solver
    x2d = p.x2d.clone().requires_grad_()
    backends = ["native", "torch"] if native_available() else ["torch"]
    for backend in backends:

        def bpnp_fwd(backend=backend):
            return bpnp.solve_pnp(p.x2d, p.x3d, K0, backend=backend)

        def bpnp_fb(backend=backend):
            bpnp.solve_pnp(x2d, p.x3d, K0, backend=backend).pose.sum().backward()

        r = bpnp_fwd()
        record(
            f"bpnp (float64, {backend} solver)",
            timeit(bpnp_fwd),
            timeit(bpnp_fb),
            r.R,
            r.t,
            "compiled C per problem, threads over the batch"
            if backend == "native"
            else "batched tensor ops (the GPU path)",
        )
    p32 = [t.float() for t in (p.x2d, p.x3d, K0)]
    r32 = bpnp.solve_pnp(*p32)
    record("bpnp (float32 in/out)", timeit(lambda: bpnp.solve_pnp(*p32)), None, r32.R.double(), r32.t.double())

    # OpenCV loops
    try:
        from bpnp.solvers.opencv import opencv_poses

        for flag in ("SQPNP", "ITERATIVE", "EPNP"):
            rv, t = opencv_poses(p.x2d, p.x3d, K0, flag)
            record(
                f"OpenCV {flag} loop",
                timeit(lambda: opencv_poses(p.x2d, p.x3d, K0, flag)),
                None,
                rvec_to_rotmat(torch.nan_to_num(rv)),
                torch.nan_to_num(t),
                "forward only, per-item loop",
            )
    except ImportError:
        print("OpenCV not installed: skipped")

    # kornia
    try:
        from kornia.geometry.calibration import solve_pnp_dlt

        def kornia_fwd(x):
            return solve_pnp_dlt(p.x3d, x, K0)

        Rt = kornia_fwd(p.x2d)
        xk = p.x2d.clone().requires_grad_()

        def kornia_fb():
            kornia_fwd(xk).sum().backward()

        record(
            f"kornia {__import__('kornia').__version__} solve_pnp_dlt",
            timeit(lambda: kornia_fwd(p.x2d)),
            timeit(kornia_fb),
            Rt[:, :, :3],
            Rt[:, :, 3],
            "DLT, no refinement; backward through SVD",
        )
    except ImportError:
        print("kornia not installed: skipped")

    # The original BPnP, from a file the user points at. It takes one K and shared 3D points, so
    # it gets its own problems of that kind (our layer solves the same ones for the comparison).
    path = os.environ.get("BPNP_ORIGINAL")
    if path:
        try:
            import kornia

            # The original calls kornia.angle_axis_to_rotation_matrix, which moved in kornia 0.7.
            if not hasattr(kornia, "angle_axis_to_rotation_matrix"):
                kornia.angle_axis_to_rotation_matrix = kornia.geometry.conversions.angle_axis_to_rotation_matrix
            spec = importlib.util.spec_from_file_location("bpnp_original", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            x3s, Ks = p.x3d[0], K0[0]
            x2s = bpnp.project(x3s, p.pose, Ks) + args.noise * torch.randn(
                p.x2d.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
            )
            v = torch.randn(args.B, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            xs = x2s.clone().requires_grad_()
            ours = bpnp.solve_pnp(xs, x3s, Ks)
            (g_ours,) = torch.autograd.grad((ours.pose * v).sum(), xs)
            for cls in ("BPnP", "BPnP_fast"):
                fn = getattr(mod, cls).apply
                x2 = x2s.float().contiguous()
                x3, Kf = x3s.float().contiguous(), Ks.float().contiguous()
                fwd_s = timeit(lambda: fn(x2, x3, Kf), repeat=1)
                xo = x2.clone().requires_grad_()
                note = "float32; per-item OpenCV forward, per-item autograd backward"
                fb_s, grad_err = None, None
                try:

                    def orig_fb():
                        xo.grad = None
                        (fn(xo, x3, Kf) * v.float()).sum().backward()

                    fb_s = timeit(orig_fb, repeat=1, warmup=0)
                    per_item = (xo.grad.double() - g_ours).flatten(1).norm(dim=1) / g_ours.flatten(1).norm(dim=1)
                    grad_err = float(per_item.median())
                    note += f"; its d pose/d x2d is {100 * grad_err:.2g}% off ours (median over items)"
                except Exception as err:  # its backward fails on some PyTorch versions
                    note = f"backward failed: {type(err).__name__}: {str(err)[:80]}"
                pose = fn(x2, x3, Kf).detach().double()
                R, t = rvec_to_rotmat(pose[:, :3]), pose[:, 3:]
                cost = cost_only(R, t, x2s, x3s[None], Ks[None], ones)
                results.append(
                    {
                        "method": f"original {cls}",
                        "fwd_ms": 1e3 * fwd_s,
                        "fwd_bwd_ms": None if fb_s is None else 1e3 * fb_s,
                        "median_rot_err_deg": float(rotation_angle_deg(R, R_true).median()),
                        "median_cost_over_optimum": float((cost / ours.cost).median()),
                        "max_cost_over_optimum": float((cost / ours.cost).max()),
                        "grad_rel_err_vs_bpnp": grad_err,
                        "note": note,
                    }
                )
                print(results[-1], flush=True)
        except Exception:
            traceback.print_exc()
    header = [
        "method",
        "fwd (ms)",
        "fwd+bwd (ms)",
        "median rot. err (deg)",
        "median cost / optimum",
        "max cost / optimum",
        "note",
    ]
    print(f"\nB = {args.B}, n = {args.n}, noise {args.noise} px, unweighted\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in results:
        print(
            "| "
            + " | ".join(
                fmt(r[k])
                for k in (
                    "method",
                    "fwd_ms",
                    "fwd_bwd_ms",
                    "median_rot_err_deg",
                    "median_cost_over_optimum",
                    "max_cost_over_optimum",
                    "note",
                )
            )
            + " |"
        )
    out = write_json(
        "bench_peers", {"machine": machine(), "B": args.B, "n": args.n, "noise": args.noise, "results": results}
    )
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
