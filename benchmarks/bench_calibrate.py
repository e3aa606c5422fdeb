"""Camera calibration through the layer against OpenCV's ``calibrateCamera``, same detections.

    python benchmarks/bench_calibrate.py [--photos ../shared/data/chessboard] [--rounds 5]

Sets: the shared 9x6 chessboard photographs (OpenCV's samples, 640x480), pinhole and with
distortion; and 8 boards rendered through a wide-angle (barrel, k1 = -0.28) lens with distortion.
Times the learning only (corner detection is shared and not timed), median of interleaved rounds,
after one warm-up run (the first run of a process also imports ``torch._dynamo`` through
``torch.optim``: about a second, once). Prints a table; writes benchmarks/results/bench_calibrate.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, write_json

from bpnp import calibration as calib
from bpnp.paper.synthetic_boards import render_views

BARREL = ({"fx": 450.0, "fy": 455.0, "cx": 330.0, "cy": 230.0}, (-0.28, 0.09, 0.001, -0.0008, -0.01))


def one_set(name: str, images: list[np.ndarray], distortion: bool, rounds: int) -> dict:
    board = (9, 6)
    found = [c for c in calib.detect_corners(images, board) if c is not None]
    h, w = images[0].shape[:2]
    obj = calib.board_points(board)
    x2d, x3d = torch.from_numpy(np.stack(found)), torch.from_numpy(obj)
    start = calib.zhang_start(obj, found, (w, h))
    calib.fit_camera(x2d, x3d, start, distortion, quiet=True)  # warm-up
    ours, theirs = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fit = calib.fit_camera(x2d, x3d, start, distortion, quiet=True)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = calib.opencv_calibration(obj, found, (w, h), distortion)
        theirs.append(time.perf_counter() - t0)
    fx_rel = float(fit.params[0]) / ref["fx"] - 1
    return {
        "set": name,
        "images": len(found),
        "distortion": distortion,
        "evaluations": fit.evaluations,
        "bpnp_s": float(np.median(ours)),
        "opencv_s": float(np.median(theirs)),
        "fx_relative_to_opencv": fx_rel,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "chessboard"))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows = []
    paths = sorted(Path(args.photos).glob("left*.jpg"))
    if paths:
        photos = calib.load_images(paths)
        rows.append(one_set(f"{len(paths)} shared photographs", photos, False, args.rounds))
        rows.append(one_set(f"{len(paths)} shared photographs", photos, True, args.rounds))
    camera, lens = BARREL
    K = np.array([[camera["fx"], 0, camera["cx"]], [0, camera["fy"], camera["cy"]], [0, 0, 1.0]])
    rendered, _ = render_views(K, 8, seed=0, dist=np.asarray(lens, dtype=np.float64))
    rows.append(one_set("8 rendered, wide-angle lens", rendered, True, args.rounds))
    print(
        "| set | distortion | evaluations | bpnp (s) | OpenCV (s) | ratio | fx vs OpenCV |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['set']} | {'yes' if r['distortion'] else 'no'} | {r['evaluations']} | {r['bpnp_s']:.3f} | "
            f"{r['opencv_s']:.4f} | {r['bpnp_s'] / r['opencv_s']:.1f} | {r['fx_relative_to_opencv']:.1e} |"
        )
    out = write_json("bench_calibrate", {"machine": machine(), "rows": rows})
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
