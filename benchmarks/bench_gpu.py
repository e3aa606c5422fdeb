"""The GPU target of the performance issue, as one prepared run.

    python benchmarks/bench_gpu.py [--B 65536] [--n 50] [--device cuda] [--check-every 1 4 8]

Solves B random problems in float32 on the device with the torch solver (the one that runs on
GPUs), forward and forward+backward, for each ``check_every`` (how often the solver loop asks
the device whether it is done: each ask is a host-device synchronisation), and compares every
answer's cost with the float64 optimum of the same (float32-rounded) problems (the native CPU
solver when it is available, else the torch solver in float64). Pixel noise 0.5-3 px, so that
relative cost differences are not divisions by a near-zero optimum. Target: forward+backward < 30 ms at B = 65536,
n = 50 on one H100, cost within 1e-6 relative of the float64 optimum.
Prints a table and writes benchmarks/results/bench_gpu.json. ``--device cpu --B 256`` runs the
same code path on the CPU (a smoke test of the script; no GPU figures).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine, timeit, write_json

import bpnp
from bpnp.cost import cost_only
from bpnp.solvers.native import native_available
from bpnp.synthetic import random_problems


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=65536)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--check-every", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a smoke test")
    sync = args.device.startswith("cuda")
    p32 = random_problems(args.B, args.n, seed=0, noise=(0.5, 3.0), dtype=torch.float32)
    p64 = p32._replace(**{k: getattr(p32, k).double() for k in ("x2d", "x3d", "K", "weights", "pose")})
    t0 = time.perf_counter()
    ref = bpnp.solve_pnp(
        p64.x2d, p64.x3d, p64.K, p64.weights, warn=False, backend="native" if native_available() else "torch"
    )
    print(f"float64 optimum of {args.B} problems in {time.perf_counter() - t0:.1f} s", flush=True)
    p = [x.to(device=args.device) for x in (p32.x2d, p32.x3d, p32.K, p32.weights)]
    x2d = p[0].clone().requires_grad_()
    rows = []
    for k in args.check_every:

        def fwd(k=k):
            return bpnp.solve_pnp(
                p[0], p[1], p[2], p[3], warn=False, backend="torch", options=bpnp.SolverOptions(check_every=k)
            )

        def fwd_bwd(k=k):
            bpnp.solve_pnp(
                x2d, p[1], p[2], p[3], warn=False, backend="torch", options=bpnp.SolverOptions(check_every=k)
            ).pose.sum().backward()

        res = fwd()
        # The float32 answer's cost, evaluated in float64 on the float64 problem.
        pose = res.pose.detach().double().cpu()
        cost = cost_only(bpnp.rvec_to_rotmat(pose[:, :3]), pose[:, 3:], p64.x2d, p64.x3d, p64.K, p64.weights)
        rel = (cost - ref.cost) / ref.cost.clamp_min(1e-300)
        row = {
            "check_every": k,
            "fwd_ms": 1e3 * timeit(fwd, args.repeat, warmup=2, sync=sync),
            "fwd_bwd_ms": 1e3 * timeit(fwd_bwd, args.repeat, warmup=2, sync=sync),
            "max_rel_cost_excess": float(rel.max()),
            "median_rel_cost_excess": float(rel.median()),
            "converged_fraction": float(res.converged.float().mean()),
            "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if sync else None,
        }
        rows.append(row)
        print(row, flush=True)
    print(
        "\n| B | n | check_every | fwd (ms) | fwd+bwd (ms) | max cost excess over float64 optimum |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {args.B} | {args.n} | {r['check_every']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
            f"{r['max_rel_cost_excess']:.2e} |"
        )
    out = write_json(
        "bench_gpu" if sync else "bench_gpu_cpu_smoke",
        {"machine": machine(), "device": args.device, "B": args.B, "n": args.n, "rows": rows},
    )
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
