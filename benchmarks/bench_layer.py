"""Forward and forward+backward time of the layer next to OpenCV solvePnP loops.

    python benchmarks/bench_layer.py [--quick] [--device cpu|cuda]

Prints a markdown table and writes benchmarks/results/bench_layer.json.
"""
from __future__ import annotations

import argparse

import torch

import bpnp
from bpnp.synthetic import random_problems

from common import machine, timeit, write_json


def opencv_loop(p, flag: str):
    import cv2

    x3 = p.x3d.cpu().numpy()
    x2 = p.x2d.cpu().numpy()
    K = p.K.cpu().numpy()
    f = getattr(cv2, f"SOLVEPNP_{flag}")

    def run():
        for i in range(x2.shape[0]):
            cv2.solvePnP(x3[i], x2[i], K[i], None, flags=f)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller grid")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = ap.parse_args()
    Bs = [1, 16, 128] if args.quick else [1, 16, 128, 1024]
    ns = [8, 50] if args.quick else [8, 50, 500]
    dtype = getattr(torch, args.dtype)
    sync = args.device.startswith("cuda")
    rows = []
    for n in ns:
        for B in Bs:
            p = random_problems(B, n, seed=B + n, dtype=dtype, device=args.device)
            rep = 7 if B * n <= 128 * 50 else (3 if B * n <= 1024 * 50 else 1)

            def fwd():
                return bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, warn=False)

            x2d = p.x2d.clone().requires_grad_()

            def fwd_bwd():
                r = bpnp.solve_pnp(x2d, p.x3d, p.K, p.weights, warn=False)
                r.pose.sum().backward()

            # Training-loop mode: warm start from nearby poses, local refinement only.
            near = fwd().pose.detach() + 1e-3

            def warm_fwd_bwd():
                r = bpnp.solve_pnp(x2d, p.x3d, p.K, p.weights, init_pose=near, global_search=False, warn=False)
                r.pose.sum().backward()

            row = {
                "B": B, "n": n,
                "bpnp_fwd_ms": 1e3 * timeit(fwd, rep, sync=sync),
                "bpnp_fwd_bwd_ms": 1e3 * timeit(fwd_bwd, rep, sync=sync),
                "bpnp_warm_fwd_bwd_ms": 1e3 * timeit(warm_fwd_bwd, rep, sync=sync),
            }
            try:
                row["cv_sqpnp_ms"] = 1e3 * timeit(opencv_loop(p, "SQPNP"), rep)
                row["cv_iterative_ms"] = 1e3 * timeit(opencv_loop(p, "ITERATIVE"), rep)
            except ImportError:
                row["cv_sqpnp_ms"] = row["cv_iterative_ms"] = float("nan")
            row["fwd_bwd_over_sqpnp"] = row["bpnp_fwd_bwd_ms"] / row["cv_sqpnp_ms"]
            rows.append(row)
            print(row, flush=True)
    header = ["B", "n", "bpnp fwd (ms)", "bpnp fwd+bwd (ms)", "warm-start local fwd+bwd (ms)",
              "OpenCV SQPNP loop (ms)", "OpenCV ITERATIVE loop (ms)", "fwd+bwd / SQPNP", "fwd / SQPNP per problem"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['B']} | {r['n']} | {r['bpnp_fwd_ms']:.2f} | {r['bpnp_fwd_bwd_ms']:.2f} | "
              f"{r['bpnp_warm_fwd_bwd_ms']:.2f} | {r['cv_sqpnp_ms']:.2f} | {r['cv_iterative_ms']:.2f} | "
              f"{r['fwd_bwd_over_sqpnp']:.1f} | {r['bpnp_fwd_ms'] / r['cv_sqpnp_ms']:.1f} |")
    out = write_json("bench_layer", {"machine": machine(), "device": args.device,
                                     "dtype": args.dtype, "rows": rows})
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
