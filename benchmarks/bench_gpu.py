"""The GPU targets of the performance issue, as one prepared run.

    python benchmarks/bench_gpu.py [--B 1 16 128 1024 8192 65536] [--n 50] [--device cuda]
                                   [--dtypes float32 float64] [--backends torch native]
                                   [--check-every 4]

For every B, dtype and backend: forward and forward+backward time on the device (the torch
solver; ``native``: the C solver on a host copy of the device tensors, backward on the device),
the kernel launches and host syncs of one forward+backward (:func:`bpnp.testing.count_launches`,
B <= 1024), and every answer's cost against the float64 optimum of the same (rounded) problems
(the native CPU solver when it is available). Pixel noise 0.5-3 px, so that relative cost
differences are not divisions by a near-zero optimum. Target: forward+backward < 30 ms at
B = 65536, n = 50, float32, on one H100. Prints a table and writes
benchmarks/results/bench_gpu.json. ``--device cpu --B 256`` runs the same code on the CPU (a
smoke test of the script, written to bench_gpu_cpu_smoke.json; no GPU figures).
"""

from __future__ import annotations

import argparse

import torch
from common import machine, timeit, write_json

import bpnp
from bpnp.cost import cost_only
from bpnp.solvers.native import native_available
from bpnp.synthetic import random_problems
from bpnp.testing import count_launches


def one_cell(B: int, n: int, dtype: torch.dtype, backend: str, device: str, check_every: int, repeat: int) -> dict:
    sync = device.startswith("cuda")
    prob = random_problems(B, n, seed=0, noise=(0.5, 3.0), dtype=dtype)
    p64 = [getattr(prob, k).double() for k in ("x2d", "x3d", "K", "weights")]
    ref = bpnp.solve_pnp(*p64, warn=False, backend="native" if native_available() else "torch")
    p = [getattr(prob, k).to(device) for k in ("x2d", "x3d", "K", "weights")]
    x2d = p[0].clone().requires_grad_()
    options = bpnp.SolverOptions(check_every=check_every)

    def fwd():
        return bpnp.solve_pnp(p[0], p[1], p[2], p[3], warn=False, backend=backend, options=options)

    def fwd_bwd():
        bpnp.solve_pnp(x2d, p[1], p[2], p[3], warn=False, backend=backend, options=options).pose.sum().backward()
        x2d.grad = None

    res = fwd()
    # The answer's cost, evaluated in float64 on the float64 problem.
    pose = res.pose.detach().double().cpu()
    cost = cost_only(bpnp.rvec_to_rotmat(pose[:, :3]), pose[:, 3:], *p64)
    rel = (cost - ref.cost) / ref.cost.clamp_min(1e-300)
    launches, syncs = count_launches(fwd_bwd) if B <= 1024 else (None, None)
    if sync:
        torch.cuda.reset_peak_memory_stats()
    return {
        "B": B,
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "fwd_ms": 1e3 * timeit(fwd, repeat, warmup=2, sync=sync),
        "fwd_bwd_ms": 1e3 * timeit(fwd_bwd, repeat, warmup=2, sync=sync),
        "launches": launches,
        "syncs": syncs,
        "max_rel_cost_excess": float(rel.max()),
        "median_rel_cost_excess": float(rel.median()),
        "converged_fraction": float(res.converged.float().mean()),
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if sync else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, nargs="*", default=[1, 16, 128, 1024, 8192, 65536])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--backends", nargs="*", default=["torch", "native"])
    ap.add_argument("--check-every", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --B 256 for a smoke test")
    rows = []
    for backend in args.backends:
        if backend == "native" and not native_available():
            continue
        for name in args.dtypes:
            for B in args.B:
                row = one_cell(B, args.n, getattr(torch, name), backend, args.device, args.check_every, args.repeat)
                rows.append(row)
                print(row, flush=True)
    print(
        "\n| backend | dtype | B | fwd (ms) | fwd+bwd (ms) | launches | syncs | max cost excess over float64 optimum |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['backend']} | {r['dtype']} | {r['B']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
            f"{r['launches'] if r['launches'] is not None else '-'} | {r['syncs'] if r['syncs'] is not None else '-'} | "
            f"{r['max_rel_cost_excess']:.2e} |"
        )
    sync = args.device.startswith("cuda")
    out = write_json(
        "bench_gpu" if sync else "bench_gpu_cpu_smoke",
        {"machine": machine(), "device": args.device, "n": args.n, "rows": rows},
    )
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
