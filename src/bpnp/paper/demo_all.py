"""``bpnp demo all``: the paper's experiments and the calibration demo, one report."""

from __future__ import annotations

from ..reporting import markdown_table, output_dir, write_json


def run(out: str | None = None, seed: int = 0, device: str = "cpu", quiet: bool = False) -> dict:
    from . import learn_intrinsics, learn_pose, learn_structure, synthetic_boards

    root = output_dir(out, "all")
    results = {
        "pose": learn_pose.run(str(root / "pose"), seed=seed, device=device, quiet=quiet),
        "sfm": learn_structure.run(str(root / "sfm"), seed=seed, device=device, quiet=quiet),
        "calib": learn_intrinsics.run(str(root / "calib"), seed=seed, device=device, quiet=quiet),
        "calibrate": synthetic_boards.run_synthetic(str(root / "calibrate"), seed=seed, quiet=quiet),
    }
    rows = [
        (
            "pose",
            "rotation error < 0.1 deg; translation error < 0.1%",
            f"{results['pose']['rotation_error_deg']:.2g} deg; {100 * results['pose']['translation_error_rel']:.2g}%",
            all(results["pose"]["acceptance"].values()),
            results["pose"]["seconds"],
        ),
        (
            "sfm",
            "aligned RMS < 1% of size",
            f"{100 * results['sfm']['rms_error_rel_to_size']:.2g}%",
            all(results["sfm"]["acceptance"].values()),
            results["sfm"]["seconds"],
        ),
        (
            "calib",
            "fx, fy, cx, cy within 0.1%",
            f"max {100 * results['calib']['max_error_rel']:.2g}%",
            all(results["calib"]["acceptance"].values()),
            results["calib"]["seconds"],
        ),
        (
            "calibrate (25 rendered photos)",
            "fx, fy, cx, cy vs truth; vs OpenCV",
            f"max {100 * results['calibrate']['max_error_rel_to_truth']:.2g}% vs truth, "
            f"max {100 * max(abs(v) for v in results['calibrate']['relative_to_opencv'].values()):.2g}% vs OpenCV",
            results["calibrate"]["max_error_rel_to_truth"] < 1e-3,
            results["calibrate"]["seconds"],
        ),
    ]
    table = markdown_table(["experiment", "acceptance", "result", "passed", "time (s)"], rows)
    sections = []
    for name in ("pose", "sfm", "calib", "calibrate"):
        text = (root / name / "report.md").read_text()
        # Re-root the figure links of each experiment's report.
        text = text.replace("](", f"]({name}/").replace("# ", "## ", 1)
        sections.append(text)
    report = "# bpnp demos\n\n" + table + "\n\n" + "\n".join(sections)
    (root / "report.md").write_text(report)
    summary = {
        name: {k: v for k, v in res.items() if not isinstance(v, dict) or k == "acceptance"}
        for name, res in results.items()
    }
    write_json(
        root / "metrics.json",
        {
            "summary": [dict(zip(["experiment", "acceptance", "result", "passed", "seconds"], r)) for r in rows],
            "experiments": summary,
        },
    )
    if not quiet:
        print("\n" + table + f"\n\nreport: {root / 'report.md'}")
    return results
