"""How the layer's cost grows: time against B and n with fitted exponents, peak memory per point.

    python benchmarks/bench_scaling.py [--quick] [--backends native,torch]

Time: forward and forward+backward, median of repeats, float64 CPU (or --device cuda), for each
forward solver (``backend`` of ``solve_pnp``). The exponent is the
slope of log(time) against log(size) over the upper half of each sweep (where fixed per-call
overhead no longer dominates) and over the whole sweep. Memory: the peak resident memory of a
fresh process during one forward+backward (Linux VmHWM, reset just before) minus its resident
memory before it, per point.
Prints markdown tables and writes benchmarks/results/bench_scaling.json.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import torch
from common import machine, timeit, write_json

import bpnp
from bpnp.solvers.native import native_available
from bpnp.synthetic import random_problems

_MEMORY_PROBE = r"""
import sys, torch, bpnp
from bpnp.synthetic import random_problems
torch.set_num_threads(int(sys.argv[3]))
B, n, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4]

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

p = random_problems(B, n, seed=0)
x2d = p.x2d.clone().requires_grad_()
bpnp.solve_pnp(p.x2d[:1], p.x3d[:1], p.K[:1], backend=backend)  # imports, first-call allocations
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident size (VmHWM) to the current one
before = status("VmRSS")
bpnp.solve_pnp(x2d, p.x3d, p.K, p.weights, warn=False, backend=backend).pose.sum().backward()
print(status("VmHWM") - before)
"""


def slope(xs, ys):
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def times(B, n, device, repeat, backend):
    """(forward, forward+backward) median seconds."""
    p = random_problems(B, n, seed=B + n, device=device)
    x2d = p.x2d.clone().requires_grad_()

    def fwd():
        bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, warn=False, backend=backend)

    def fwd_bwd():
        bpnp.solve_pnp(x2d, p.x3d, p.K, p.weights, warn=False, backend=backend).pose.sum().backward()

    sync = device.startswith("cuda")
    return timeit(fwd, repeat=repeat, sync=sync), timeit(fwd_bwd, repeat=repeat, sync=sync)


def sweep(backend: str, device: str, quick: bool) -> dict:
    Bs = [1, 4, 16, 64, 256, 1024] if quick else [1, 4, 16, 64, 256, 1024, 4096, 16384]
    ns = [4, 16, 64, 256, 1000] if quick else [4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000]
    by_B = []
    for B in Bs:
        tf, t = times(B, 50, device, 5 if B <= 1024 else 1, backend)
        by_B.append({"B": B, "n": 50, "fwd_ms": 1e3 * tf, "fwd_bwd_ms": 1e3 * t, "us_per_problem": 1e6 * t / B})
        print(backend, by_B[-1], flush=True)
    by_n = []
    for n in ns:
        tf, t = times(128, n, device, 5 if n <= 500 else 1, backend)
        by_n.append({"B": 128, "n": n, "fwd_ms": 1e3 * tf, "fwd_bwd_ms": 1e3 * t, "ns_per_point": 1e9 * t / (128 * n)})
        print(backend, by_n[-1], flush=True)
    half_B, half_n = by_B[len(by_B) // 2 :], by_n[len(by_n) // 2 :]
    exps = {
        "B_upper": slope([r["B"] for r in half_B], [r["fwd_bwd_ms"] for r in half_B]),
        "B_all": slope([r["B"] for r in by_B], [r["fwd_bwd_ms"] for r in by_B]),
        "n_upper": slope([r["n"] for r in half_n], [r["fwd_bwd_ms"] for r in half_n]),
        "n_all": slope([r["n"] for r in by_n], [r["fwd_bwd_ms"] for r in by_n]),
    }
    memory = []
    if device == "cpu":
        for B, n in [(1024, 50), (4096, 50)] if quick else [(1024, 50), (4096, 50), (16384, 50), (128, 2000)]:
            out = subprocess.run(
                [sys.executable, "-c", _MEMORY_PROBE, str(B), str(n), str(torch.get_num_threads()), backend],
                capture_output=True,
                text=True,
                check=True,
            )
            peak = int(out.stdout.strip().splitlines()[-1])
            memory.append({"B": B, "n": n, "peak_extra_bytes": peak, "bytes_per_point": peak / (B * n)})
            print(backend, memory[-1], flush=True)
    print(f"\n{backend}\n| B (n = 50) | fwd (ms) | fwd+bwd (ms) | per problem (us) |\n|---|---|---|---|")
    for r in by_B:
        print(f"| {r['B']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['us_per_problem']:.0f} |")
    print("\n| n (B = 128) | fwd (ms) | fwd+bwd (ms) | per point (ns) |\n|---|---|---|---|")
    for r in by_n:
        print(f"| {r['n']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['ns_per_point']:.0f} |")
    print("\nfitted exponents (time ~ size^k):", {k: round(v, 3) for k, v in exps.items()})
    if memory:
        print("\n| B | n | peak extra memory (MB) | bytes per point |\n|---|---|---|---|")
        for r in memory:
            print(f"| {r['B']} | {r['n']} | {r['peak_extra_bytes'] / 2**20:.0f} | {r['bytes_per_point']:.0f} |")
    return {"by_B": by_B, "by_n": by_n, "exponents": exps, "memory": memory}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default=None, help="comma-separated (default: native,torch on CPU)")
    args = ap.parse_args()
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = (["native"] if args.device == "cpu" and native_available() else []) + ["torch"]
    results = {b: sweep(b, args.device, args.quick) for b in backends}
    out = write_json("bench_scaling", {"machine": machine(), "device": args.device, "backends": results})
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
