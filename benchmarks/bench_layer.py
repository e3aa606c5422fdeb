"""Forward and forward+backward time of the layer next to OpenCV solvePnP loops.

    python benchmarks/bench_layer.py [--quick] [--device cpu|cuda] [--dtype float32|float64]

Both forward solvers are timed: the compiled CPU one (``backend="native"``, the default on CPU
when a C compiler is available) and the batched torch one (``backend="torch"``, the one that
runs on GPUs). All timings of one (B, n) cell are interleaved round by round with the OpenCV
loops on the same problems, so their ratios are measured under the same machine load.
Prints a markdown table and writes benchmarks/results/bench_layer.json.
"""

from __future__ import annotations

import argparse

import torch
from common import machine, paired, write_json

import bpnp
from bpnp.solvers.native import native_available
from bpnp.synthetic import random_problems


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


def layer_runs(p, backend: str) -> dict:
    """fwd, fwd+bwd and warm-start fwd+bwd closures for one backend."""
    x2d = p.x2d.clone().requires_grad_()

    def fwd():
        return bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, warn=False, backend=backend)

    def fwd_bwd():
        bpnp.solve_pnp(x2d, p.x3d, p.K, p.weights, warn=False, backend=backend).pose.sum().backward()

    # Training-loop mode: warm start from nearby poses, local refinement only.
    near = fwd().pose.detach() + 1e-3
    local = bpnp.SolverOptions(global_search=False)

    def warm_fwd_bwd():
        bpnp.solve_pnp(
            x2d, p.x3d, p.K, p.weights, init_pose=near, warn=False, backend=backend, options=local
        ).pose.sum().backward()

    return {f"{backend}_fwd": fwd, f"{backend}_fwd_bwd": fwd_bwd, f"{backend}_warm_fwd_bwd": warm_fwd_bwd}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller grid")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--B", type=int, nargs="*", help="batch sizes (default: 1 16 128 1024)")
    ap.add_argument("--n", type=int, nargs="*", help="point counts (default: 8 50 500)")
    ap.add_argument("--repeats", type=int, help="interleaved rounds per cell (default: 9/5/3 by size)")
    ap.add_argument("--out", default="bench_layer", help="name of the JSON file in results/")
    args = ap.parse_args()
    Bs = args.B or ([1, 16, 128] if args.quick else [1, 16, 128, 1024])
    ns = args.n or ([8, 50] if args.quick else [8, 50, 500])
    dtype = getattr(torch, args.dtype)
    sync = args.device.startswith("cuda")
    backends = ["torch"] + (["native"] if args.device == "cpu" and native_available() else [])
    rows = []
    for n in ns:
        for B in Bs:
            p = random_problems(B, n, seed=B + n, dtype=dtype, device=args.device)
            rep = args.repeats or (9 if B * n <= 128 * 50 else (5 if B * n <= 1024 * 50 else 3))
            fns = {}
            for backend in backends:
                fns.update(layer_runs(p, backend))
            try:
                fns["cv_sqpnp"] = opencv_loop(p, "SQPNP")
                fns["cv_iterative"] = opencv_loop(p, "ITERATIVE")
            except ImportError:
                pass
            t = paired(fns, rep, sync=sync)
            row = {"B": B, "n": n, "repeats": rep, **{f"{k}_ms": 1e3 * v for k, v in t.items()}}
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    best = "native" if "native" in backends else "torch"
    header = [
        "B",
        "n",
        f"{best} fwd (ms)",
        f"{best} fwd+bwd (ms)",
        f"{best} warm fwd+bwd (ms)",
        "torch fwd (ms)",
        "torch fwd+bwd (ms)",
        "SQPNP loop (ms)",
        "ITERATIVE loop (ms)",
        "fwd+bwd / SQPNP",
        "fwd / SQPNP",
    ]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        sq = r.get("cv_sqpnp_ms", float("nan"))
        print(
            f"| {r['B']} | {r['n']} | {r[f'{best}_fwd_ms']:.2f} | {r[f'{best}_fwd_bwd_ms']:.2f} | "
            f"{r[f'{best}_warm_fwd_bwd_ms']:.2f} | {r['torch_fwd_ms']:.2f} | {r['torch_fwd_bwd_ms']:.2f} | "
            f"{sq:.2f} | {r.get('cv_iterative_ms', float('nan')):.2f} | {r[f'{best}_fwd_bwd_ms'] / sq:.2f} | "
            f"{r[f'{best}_fwd_ms'] / sq:.2f} |"
        )
    out = write_json(
        args.out, {"machine": machine(), "device": args.device, "dtype": args.dtype, "backends": backends, "rows": rows}
    )
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
