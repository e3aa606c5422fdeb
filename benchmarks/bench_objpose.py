"""Object-pose pipeline speed: rendering, one training step, and the PnP layer's share of it.

Prints a table and writes ``benchmarks/results/bench_objpose.json``. Usage:
``python benchmarks/bench_objpose.py [--size 128] [--batch 32] [--renders 300] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, paired, write_json

import bpnp
from bpnp.losses import BPnPADDLoss, BPnPReprojectionLoss
from bpnp.pose.config import RenderSettings
from bpnp.pose.data import load_split
from bpnp.pose.model import KeypointHeatmapNet, heatmap_loss, soft_argmax
from bpnp.pose.study import spot_mesh
from bpnp.pose.synthesis import render_dataset
from bpnp.pose.train import normalise_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--renders", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        render_dataset(spot_mesh(), tmp, args.renders, RenderSettings(size=args.size), seed=0)
        render_s = time.perf_counter() - t0  # includes the context, mesh load and PNG writing
        data = load_split(Path(tmp) / "train", size=args.size)
    rows.append(
        ("render + write BOP (per image)", 1e3 * render_s / args.renders, f"{args.renders / render_s:.0f} images/s")
    )
    net = KeypointHeatmapNet(len(data.keypoints3d)).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    idx = np.arange(args.batch) % len(data)
    images = normalise_images(torch.from_numpy(data.images[idx]).to(device))
    kp = torch.from_numpy(data.keypoints2d[idx]).to(device)
    K = torch.from_numpy(data.K[idx]).to(device)
    pose = torch.from_numpy(data.pose[idx]).to(device)
    kp3d = torch.from_numpy(data.keypoints3d).to(device)
    reprojection, add_loss = BPnPReprojectionLoss(), BPnPADDLoss(scale=100.0)
    sync = device.type == "cuda"

    def step(pnp_loss: str | None):
        logits = net(images)
        coords, _ = soft_argmax(logits, net.stride, 3)
        loss = heatmap_loss(logits, kp.float())
        if pnp_loss == "reprojection":
            loss = loss + 1e-3 * reprojection(coords.double(), kp3d, K, kp).float()
        elif pnp_loss == "add":
            loss = loss + 0.3 * add_loss(coords.double(), kp3d, K, pose).float()
        opt.zero_grad()
        loss.backward()
        opt.step()

    noisy = (kp + torch.randn_like(kp)).double().requires_grad_()

    def layer_only():
        res = bpnp.solve_pnp(noisy, kp3d, K, warn=False)
        res.pose.sum().backward()

    fns = {
        "heat": lambda: step(None),
        "full": lambda: step("reprojection"),
        "add": lambda: step("add"),
        "layer": layer_only,
    }
    t = paired(fns, repeat=9, warmup=2, sync=sync)
    heat, full, add, layer = t["heat"], t["full"], t["add"], t["layer"]
    rows.append((f"train step, heatmap loss (B={args.batch})", 1e3 * heat, f"{args.batch / heat:.0f} images/s"))
    rows.append((f"train step, + BPnP loss (B={args.batch})", 1e3 * full, f"{args.batch / full:.0f} images/s"))
    rows.append((f"train step, + BPnP ADD loss (B={args.batch})", 1e3 * add, f"{args.batch / add:.0f} images/s"))
    rows.append(("PnP layer alone: solve + backward", 1e3 * layer, f"{100 * layer / full:.1f}% of a step"))
    print(f"{'what':48s} {'ms':>9s}  note")
    for name, ms, note in rows:
        print(f"{name:48s} {ms:9.2f}  {note}")
    result = {"machine": machine(), "size": args.size, "batch": args.batch, "device": str(device)}
    result["rows"] = [{"what": n, "ms": m, "note": t} for n, m, t in rows]
    print(f"written: {write_json('bench_objpose', result)}")


if __name__ == "__main__":
    main()
