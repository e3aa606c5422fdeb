"""The speed targets of the performance issue, each measured as the issue defines it.

    python benchmarks/bench_latency.py [--rounds 15]

- B = 1, n = 50, one thread: forward and forward+backward of the layer against one
  ``cv2.solvePnP(SOLVEPNP_SQPNP)`` call (goal: fwd+bwd <= 3x);
- B = 128, n = 50, one thread: forward+backward against an SQPnP loop over the batch (<= 1.0x);
- ``dist=`` B = 1 forward against the same solve without ``dist`` (<= 3x);
- B = 1024, n = 50, two threads: forward against the SQPnP loop (<= 0.5x);
- the kernel launches and host syncs of one forward+backward (:func:`bpnp.testing.count_launches`)
  of each backend at B = 1, 128 and 1024 (n = 50, 30% planar, 0.5-2 px noise), the torch solver
  with the CPU's and with CUDA's default LM host-check interval (``check_every`` 1 and 4).

Times are medians over interleaved rounds; in a round every contender runs a fixed number of
back-to-back calls (warm caches, as in a training loop) and the per-call mean is recorded, so
slow phases of a shared machine hit all of them alike. Prints a table and writes
benchmarks/results/bench_latency.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine, write_json

import bpnp
from bpnp.synthetic import random_problems
from bpnp.testing import count_launches

DIST = torch.tensor([-0.2, 0.05, 0.001, -0.002, 0.01], dtype=torch.float64)


def per_call(fns: dict, rounds: int, calls: int) -> dict[str, float]:
    """Median over interleaved rounds of the mean time (s) of ``calls`` back-to-back calls."""
    for fn in fns.values():
        for _ in range(max(3, calls // 4)):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[key].append((time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def sqpnp_loop(x2d: torch.Tensor, x3d: torch.Tensor, K: torch.Tensor):
    import cv2

    x2, x3, k = x2d.numpy(), x3d.numpy(), K.numpy()

    def run():
        for b in range(x2.shape[0]):
            cv2.solvePnP(x3[b], x2[b], k[b], None, flags=cv2.SOLVEPNP_SQPNP)

    return run


def layer_calls(x2d: torch.Tensor, x3d: torch.Tensor, K: torch.Tensor, **kw) -> dict:
    leaf = x2d.clone().requires_grad_()

    def fwd():
        bpnp.solve_pnp(x2d, x3d, K, warn=False, **kw)

    def fwd_bwd():
        bpnp.solve_pnp(leaf, x3d, K, warn=False, **kw).pose.sum().backward()
        leaf.grad = None

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def mixed_problems(B: int, seed: int):
    """n = 50, 30% planar, 0.5-2 px noise (the issue's launch-count problems)."""
    planar = int(round(0.3 * B))
    parts = [random_problems(B - planar, 50, noise=(0.5, 2.0), seed=seed)]
    if planar:
        parts.append(random_problems(planar, 50, planar=True, noise=(0.5, 2.0), seed=seed + 1))
    return [torch.cat([getattr(q, k) for q in parts]) for k in ("x2d", "x3d", "K", "weights")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    import cv2

    cv2.setNumThreads(1)
    threads = torch.get_num_threads()
    rows = []
    torch.set_num_threads(1)
    p1 = random_problems(1, 50, seed=1)
    x2d_dist = bpnp.project(p1.x3d, p1.pose, p1.K, DIST) + 0.5 * torch.randn(
        1, 50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    single = {f"layer_{k}": f for k, f in layer_calls(p1.x2d, p1.x3d, p1.K).items()}
    single.update({f"dist_{k}": f for k, f in layer_calls(x2d_dist, p1.x3d, p1.K, dist=DIST).items()})
    single["sqpnp"] = sqpnp_loop(p1.x2d, p1.x3d, p1.K)
    t = per_call(single, args.rounds, 200)
    rows.append(("B=1 n=50 fwd+bwd / one SQPnP call (1 thread)", t["layer_fwd_bwd"], t["sqpnp"], 3.0))
    rows.append(("B=1 n=50 fwd / one SQPnP call (1 thread)", t["layer_fwd"], t["sqpnp"], None))
    rows.append(("dist B=1 fwd / the same fwd without dist (1 thread)", t["dist_fwd"], t["layer_fwd"], 3.0))
    rows.append(("dist B=1 fwd+bwd / fwd+bwd without dist (1 thread)", t["dist_fwd_bwd"], t["layer_fwd_bwd"], None))
    p128 = random_problems(128, 50, seed=3)
    batch = {f"layer_{k}": f for k, f in layer_calls(p128.x2d, p128.x3d, p128.K).items()}
    batch["sqpnp"] = sqpnp_loop(p128.x2d, p128.x3d, p128.K)
    t = per_call(batch, args.rounds, 5)
    rows.append(("B=128 n=50 fwd+bwd / SQPnP loop (1 thread)", t["layer_fwd_bwd"], t["sqpnp"], 1.0))
    torch.set_num_threads(min(2, threads))
    p1024 = random_problems(1024, 50, seed=4)
    big = {"layer_fwd": layer_calls(p1024.x2d, p1024.x3d, p1024.K)["fwd"]}
    big["sqpnp"] = sqpnp_loop(p1024.x2d, p1024.x3d, p1024.K)
    t = per_call(big, max(5, args.rounds // 2), 1)
    label = f"B=1024 n=50 fwd / SQPnP loop ({torch.get_num_threads()} threads)"
    rows.append((label, t["layer_fwd"], t["sqpnp"], 0.5))
    torch.set_num_threads(threads)

    counts = []
    # check_every: the CPU default (1) and the CUDA one (4: a host check every 4th LM iteration)
    for backend, check_every in (("native", 1), ("torch", 1), ("torch", 4)):
        options = bpnp.SolverOptions(check_every=check_every)
        for B in (1, 128, 1024):
            x2d, x3d, K, w = mixed_problems(B, seed=5)
            leaf = x2d.clone().requires_grad_()

            def step(leaf=leaf, x3d=x3d, K=K, w=w, backend=backend, options=options):
                bpnp.solve_pnp(leaf, x3d, K, w, warn=False, backend=backend, options=options).pose.sum().backward()

            launches, syncs = count_launches(step)
            row = {"backend": backend, "check_every": check_every, "B": B, "launches": launches, "syncs": syncs}
            counts.append(row)

    print("| what | ours (ms) | reference (ms) | ratio | goal |\n|---|---|---|---|---|")
    table = []
    for label, ours, ref, goal in rows:
        table.append(
            {"what": label, "ours_ms": 1e3 * ours, "reference_ms": 1e3 * ref, "ratio": ours / ref, "goal": goal}
        )
        print(
            f"| {label} | {1e3 * ours:.3f} | {1e3 * ref:.3f} | {ours / ref:.2f} | {'<= ' + str(goal) if goal else '-'} |"
        )
    print("\n| backend | check_every | B | kernel launches (fwd+bwd) | host syncs |\n|---|---|---|---|---|")
    for c in counts:
        print(f"| {c['backend']} | {c['check_every']} | {c['B']} | {c['launches']} | {c['syncs']} |")
    out = write_json("bench_latency", {"machine": machine(), "rows": table, "launches": counts})
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
