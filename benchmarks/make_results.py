"""Write benchmarks/RESULTS.md from the JSON files the benchmark scripts leave in results/."""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def load(name: str) -> dict:
    return json.loads((HERE / "results" / f"{name}.json").read_text())


def fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def main() -> None:
    bl, bp, bs = load("bench_layer"), load("bench_peers"), load("bench_scaling")
    m = bl["machine"]
    L = ["# Benchmark results\n"]
    L.append(
        f"Machine: {m['cores']} CPU cores ({m['cpu']}), torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}; GPU: {m['cuda'] or 'none lent to this session, so no GPU figures yet'}. float64, "
        "random non-planar problems (`bpnp.synthetic.random_problems`, noise 0-3 px, random weights), median of 3 "
        "runs (layer table: 7 runs up to B x n = 6,400 points, 3 up to 51,200, else 1; others 3). Wall times on this shared machine vary by 10-20% between runs. Regenerate with "
        "the scripts named in each heading, then `python benchmarks/make_results.py`; `results/*.json` hold every number.\n")
    L.append("## Layer against OpenCV loops (`python benchmarks/bench_layer.py`)\n")
    L.append("Global solve (default) and warm-start local refinement (`init_pose=...`, `global_search=False`, the "
             "training-loop mode), forward+backward of `pose.sum()`; the OpenCV `solvePnP` loops are forward only, "
             "same problems, same process.\n")
    L.append("| B | n | bpnp fwd (ms) | bpnp fwd+bwd (ms) | warm-start fwd+bwd (ms) | OpenCV SQPNP loop (ms) | "
             "OpenCV ITERATIVE loop (ms) | fwd+bwd / SQPNP | warm fwd+bwd / SQPNP |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in bl["rows"]:
        L.append(f"| {r['B']} | {r['n']} | {r['bpnp_fwd_ms']:.1f} | {r['bpnp_fwd_bwd_ms']:.1f} | "
                 f"{r['bpnp_warm_fwd_bwd_ms']:.1f} | {r['cv_sqpnp_ms']:.2f} | {r['cv_iterative_ms']:.2f} | "
                 f"{r['fwd_bwd_over_sqpnp']:.1f} | {r['bpnp_warm_fwd_bwd_ms'] / r['cv_sqpnp_ms']:.1f} |")
    big = [r for r in bl["rows"] if r["n"] == 500]
    if len(big) == 4:
        per = [r["bpnp_fwd_ms"] / r["B"] for r in big]
        L.append(f"\nAt n = 500 the time per problem goes from {per[2]:.1f} ms (B = 128) to {per[3]:.1f} ms "
                 "(B = 1024): half a million points in one batch make gigabytes of float64 temporaries that no "
                 "cache holds; chunking such batches is left for later.\n")
    L.append(f"## Peers on the same problems (`python benchmarks/bench_peers.py`, B = {bp['B']}, n = {bp['n']}, "
             f"{bp['noise']} px noise, unweighted)\n")
    L.append("| method | fwd (ms) | fwd+bwd (ms) | median rot. err (deg) | median cost / optimum | max cost / optimum | note |")
    L.append("|---|---|---|---|---|---|---|")
    for r in bp["results"]:
        L.append(f"| {r['method']} | {fmt(r['fwd_ms'])} | {fmt(r['fwd_bwd_ms'])} | {fmt(r['median_rot_err_deg'])} | "
                 f"{fmt(r['median_cost_over_optimum'])} | {fmt(r['max_cost_over_optimum'])} | {r['note']} |")
    if any(r["method"].startswith("original") for r in bp["results"]):
        L.append("\nThe original BPnP ran from its file (`BPNP_ORIGINAL=/path/to/BPnP.py`, not in this repository; "
                 "the script aliases `kornia.angle_axis_to_rotation_matrix`, which moved in kornia 0.7). Its API "
                 "takes one K and points shared by the batch, so its rows use such problems (same poses, same noise "
                 "level); its cost is compared with our optimum of the same problems, and its gradient "
                 "d pose/d x2d with ours, which matches central finite differences to ~1e-9.")
    L.append("\n## Scaling (`python benchmarks/bench_scaling.py`)\n")
    L.append("| B (n = 50) | fwd+bwd (ms) | per problem (us) |\n|---|---|---|")
    for r in bs["by_B"]:
        L.append(f"| {r['B']} | {r['fwd_bwd_ms']:.1f} | {r['us_per_problem']:.0f} |")
    L.append("\n| n (B = 128) | fwd+bwd (ms) | per point (ns) |\n|---|---|---|")
    for r in bs["by_n"]:
        L.append(f"| {r['n']} | {r['fwd_bwd_ms']:.1f} | {r['ns_per_point']:.0f} |")
    e = bs["exponents"]
    bu = bs["by_B"][len(bs["by_B"]) // 2]["B"]
    nu = bs["by_n"][len(bs["by_n"]) // 2]["n"]
    L.append(f"\nFitted exponents (time ~ size^k): over B from {bu} up, k = {e['B_upper']:.3f} (whole sweep "
             f"{e['B_all']:.3f}); over n from {nu} up, k = {e['n_upper']:.3f} (whole sweep {e['n_all']:.3f}). "
             "Below B ~ 64 the ~30-40 ms per-call overhead of eager dispatch dominates.\n")
    L.append("| B | n | peak extra memory (MB) | bytes per point |\n|---|---|---|---|")
    for r in bs["memory"]:
        L.append(f"| {r['B']} | {r['n']} | {r['peak_extra_bytes'] / 2**20:.0f} | {r['bytes_per_point']:.0f} |")
    L.append("\nPeak memory (forward+backward, float64) grows linearly with B x n, 2.5-3.7 KB per point (about "
             "three candidates per problem during screening); there are no B x n x n terms and no per-item graphs.\n")
    L.append("## Against the targets of the performance issue\n")
    r128 = next(r for r in bl["rows"] if r["B"] == 128 and r["n"] == 50)
    r1024 = next(r for r in bl["rows"] if r["B"] == 1024 and r["n"] == 50)
    L.append(f"- CPU, B = 128, n = 50, fwd+bwd <= 8x an OpenCV SQPnP loop: global mode {r128['fwd_bwd_over_sqpnp']:.1f}x "
             f"(not met); warm-start local mode {r128['bpnp_warm_fwd_bwd_ms'] / r128['cv_sqpnp_ms']:.1f}x (no global "
             "guarantee in that mode).")
    L.append(f"- CPU, B = 1024, n = 50, forward per problem <= SQPnP per call: {1e3 * r1024['bpnp_fwd_ms'] / 1024:.0f} us "
             f"against {1e3 * r1024['cv_sqpnp_ms'] / 1024:.0f} us ({r1024['bpnp_fwd_ms'] / r1024['cv_sqpnp_ms']:.1f}x, not met).")
    L.append(f"- Linear growth: exponent {e['B_upper']:.2f} in B and {e['n_upper']:.2f} in n above the overhead regime "
             "(<= 1.1); memory linear in points.")
    L.append("- GPU (B = 65536, float32, < 30 ms on one H100): not measured, no GPU was lent to this session.")
    L.append("\nWhat was tried, predicted and measured on the way is in [NOTES.md](NOTES.md).")
    (HERE / "RESULTS.md").write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
