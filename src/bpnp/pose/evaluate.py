"""Evaluating a trained keypoint network: keypoints -> PnP pose -> the field's metrics.

Metrics (per image, saved in ``per_image.npz`` for paired comparisons; summarised in
``metrics.json``): keypoint error (px), 2D projection error of the model's vertices (px) and its
accuracy at 5 px, ADD and ADD-S (mm) and their accuracy at 10% of the diameter (ADD-0.1d;
``add_or_adds_0.1d`` uses ADD-S for symmetric objects), 5 cm 5 deg, the ADD(-S) AUC up to 10 cm, PnP
convergence, and the mean error of each keypoint. Predictions are also written as a BOP result CSV.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics as M
from ..geometry import project, rvec_to_rotmat
from ..layer import solve_pnp
from . import bop
from .data import COVERED, HIDDEN_BY_OBJECT, INTERIOR, VISIBLE, PoseData, keypoint_visibility, load_split
from .model import heatmap_confidence, soft_argmax
from .train import load_checkpoint, normalise_images

__all__ = ["predict", "evaluate", "pose_metrics", "draw_overlays", "model_points"]


def model_points(split_dir: str | Path, obj_id: int, count: int = 1000) -> tuple[np.ndarray, dict]:
    """``(m, 3)`` vertices of the object's model (at most ``count``, evenly strided) and its
    ``models_info.json`` entry."""
    import trimesh

    models = bop.find_models_dir(split_dir)
    info = bop.read_models_info(models)[obj_id]
    verts = np.asarray(trimesh.load(str(models / f"obj_{obj_id:06d}.ply"), process=False).vertices, dtype=np.float64)
    return verts[:: max(1, len(verts) // count)], info


@torch.no_grad()
def predict(
    net: torch.nn.Module,
    data: PoseData,
    keypoints3d: np.ndarray,
    batch_size: int = 64,
    device: str = "cpu",
    confidence_weights: bool = False,
    window: int | None = 3,
) -> dict[str, np.ndarray]:
    """Keypoints and PnP poses for every image of ``data`` (``window``: the soft-argmax readout,
    see :func:`~bpnp.pose.model.soft_argmax`).

    Returns:
        ``kp2d (N, k, 2)``, ``confidence (N, k)``, ``pose (N, 6)`` (mm), ``converged (N,)``,
        ``seconds (N,)`` per image (network + PnP, amortised over the batch).
    """
    kp3d = torch.from_numpy(keypoints3d)
    out: dict[str, list] = {"kp2d": [], "confidence": [], "pose": [], "converged": [], "seconds": []}
    for start in range(0, len(data), batch_size):
        t0 = time.perf_counter()
        images = torch.from_numpy(data.images[start : start + batch_size]).to(device)
        logits = net(normalise_images(images))
        coords, probs = soft_argmax(logits, net.stride, window)
        conf = heatmap_confidence(probs, coords, net.stride)
        K = torch.from_numpy(data.K[start : start + batch_size])
        w = conf.double().cpu() if confidence_weights else None
        res = solve_pnp(coords.double().cpu(), kp3d, K, w, warn=False)
        dt = (time.perf_counter() - t0) / len(images)
        out["kp2d"].append(coords.cpu().double().numpy())
        out["confidence"].append(conf.cpu().double().numpy())
        out["pose"].append(res.pose.numpy())
        out["converged"].append(res.converged.numpy())
        out["seconds"].append(np.full(len(images), dt))
    return {k: np.concatenate(v) for k, v in out.items()}


def pose_metrics(
    pred_pose: np.ndarray,
    true_pose: np.ndarray,
    K: np.ndarray,
    points: np.ndarray,
    diameter: float,
    symmetric: bool,
) -> dict[str, np.ndarray]:
    """Per-image metrics ``(N,)`` of predicted against true poses (mm) for model ``points (m, 3)``."""
    pred, true = torch.from_numpy(pred_pose), torch.from_numpy(true_pose)
    pts, Kt = torch.from_numpy(points), torch.from_numpy(K)
    add = M.add(pred, true, pts).numpy()
    adds = M.add_s(pred, true, pts).numpy()
    proj = M.projection_error(pred, true, pts, Kt).numpy()
    add_or = adds if symmetric else add
    depth, lateral = M.depth_and_lateral_error(pred, true)
    return {
        "add_mm": add,
        "adds_mm": adds,
        "proj2d_px": proj,
        "add_0.1d": add < 0.1 * diameter,
        "adds_0.1d": adds < 0.1 * diameter,
        "add_or_adds_0.1d": add_or < 0.1 * diameter,
        "proj2d_5px": proj < 5.0,
        "5cm5deg": M.cm_deg_accuracy(pred, true, 5.0, 5.0, unit_per_cm=10.0).numpy(),
        "rotation_error_deg": M.rotation_error_deg(pred, true).numpy(),
        "translation_error_mm": M.translation_error(pred, true).numpy(),
        # ADD is mostly the depth error: the split says which part a variant moves.
        "depth_error_mm": depth.numpy(),
        "lateral_error_mm": lateral.numpy(),
    }


def evaluate(
    checkpoint: str | Path,
    data_dir: str | Path,
    out: str | Path,
    obj_id: int | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    limit: int | None = None,
    overlays: int = 16,
    quiet: bool = True,
    confidence_weights: bool = True,
    visibility: bool = True,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the BOP split ``data_dir``; write ``metrics.json``,
    ``per_image.npz``, ``predictions.csv`` (BOP result format), ``overlays.png`` and
    ``report.md`` into ``out``. Returns the metrics.

    The test-time PnP is the same for every variant: weighted by the heatmaps' confidences
    (``confidence_weights``; on spot it raised the 2D-projection accuracy of every model by 3-5
    points over unweighted PnP), whatever the model was trained with.

    ``visibility``: also say which keypoints could be seen (:func:`~bpnp.pose.data.keypoint_visibility`,
    ``kp_visibility (N, k)`` in ``per_image.npz``) and report the keypoint error of the visible,
    the self-occluded and the covered ones apart (ray casting: a few seconds per 1,000 images)."""
    net, ckpt = load_checkpoint(checkpoint, device)
    cfg = ckpt["config"]
    obj_id = cfg["obj_id"] if obj_id is None else obj_id
    data = load_split(data_dir, obj_id=obj_id, size=cfg["size"], limit=limit)
    kp3d = np.asarray(ckpt["keypoints3d"], dtype=np.float64)
    if not np.allclose(kp3d, data.keypoints3d):
        # The network predicts its own keypoints: ground truth for them comes from the pose.
        data.keypoints2d = project(
            torch.from_numpy(kp3d), torch.from_numpy(data.pose), torch.from_numpy(data.K)
        ).numpy()
    points, info = model_points(data_dir, obj_id)
    symmetric = bool(info.get("symmetries_continuous") or info.get("symmetries_discrete"))
    pred = predict(net, data, kp3d, batch_size, device, confidence_weights, cfg.get("window"))
    per = pose_metrics(pred["pose"], data.pose, data.K, points, float(info["diameter"]), symmetric)
    kp_errors = np.linalg.norm(pred["kp2d"] - data.keypoints2d, axis=-1)  # NxK
    per["kp_error_px"] = kp_errors.mean(-1)
    per["kp_error_px_each"] = kp_errors
    if visibility:
        per["kp_visibility"] = keypoint_visibility(data_dir, kp3d, obj_id, limit=limit)
    per["converged"] = pred["converged"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "per_image.npz", ids=data.ids, **per)
    errors = torch.from_numpy(per["adds_mm"] if symmetric else per["add_mm"])
    summary = {
        "images": len(data),
        "variant": cfg["variant"],
        "pnp_weights": "confidence" if confidence_weights else "none",
        "symmetric": symmetric,
        "diameter_mm": float(info["diameter"]),
        "kp_error_px_mean": float(per["kp_error_px"].mean()),
        "kp_error_px_median": float(np.median(per["kp_error_px"])),
        # Which keypoints the network cannot place (e.g. the look-alikes of a symmetric object).
        "kp_error_px_per_keypoint": [round(float(e), 3) for e in kp_errors.mean(0)],
        **(_visibility_summary(per["kp_visibility"], kp_errors) if visibility else {}),
        "proj2d_px_median": float(np.median(per["proj2d_px"])),
        "proj2d_5px": float(per["proj2d_5px"].mean()),
        "add_0.1d": float(per["add_0.1d"].mean()),
        "adds_0.1d": float(per["adds_0.1d"].mean()),
        "add_or_adds_0.1d": float(per["add_or_adds_0.1d"].mean()),
        "5cm5deg": float(per["5cm5deg"].mean()),
        "add_auc_10cm": M.auc(errors, 100.0),
        "rotation_error_deg_median": float(np.median(per["rotation_error_deg"])),
        "translation_error_mm_median": float(np.median(per["translation_error_mm"])),
        "depth_error_mm_mean": float(per["depth_error_mm"].mean()),
        "lateral_error_mm_mean": float(per["lateral_error_mm"].mean()),
        "pnp_converged": float(pred["converged"].mean()),
        "seconds_per_image": float(pred["seconds"].mean()),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    R = rvec_to_rotmat(torch.from_numpy(pred["pose"][:, :3])).numpy()
    rows = [
        {
            "scene_id": int(s),
            "im_id": int(i),
            "obj_id": int(o),
            "score": float(pred["confidence"][j].mean()),
            "R": R[j],
            "t": pred["pose"][j, 3:],
            "time": float(pred["seconds"][j]),
        }
        for j, (s, i, o) in enumerate(data.ids)
    ]
    bop.write_results_csv(out / "predictions.csv", rows)
    if overlays:
        draw_overlays(data, pred["pose"], points, out / "overlays.png", count=overlays)
    lines = [f"# Evaluation of {Path(checkpoint)} on {data_dir}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "![predicted (red) vs true (green) pose](overlays.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    if not quiet:
        print("\n".join(lines[2:-2]))
    return summary


def _visibility_summary(codes: np.ndarray, kp_errors: np.ndarray) -> dict[str, Any]:
    """Keypoint error (px) by whether the keypoint could be seen; None where there is none."""

    def mean_where(mask: np.ndarray) -> float | None:
        return round(float(kp_errors[mask].mean()), 3) if mask.any() else None

    return {
        "kp_hidden_fraction": round(float((codes == HIDDEN_BY_OBJECT).mean()), 4),
        "kp_covered_fraction": round(float((codes == COVERED).mean()), 4),
        "kp_error_px_visible": mean_where(codes == VISIBLE),
        "kp_error_px_hidden": mean_where(codes == HIDDEN_BY_OBJECT),
        "kp_error_px_covered": mean_where(codes == COVERED),
        # Per keypoint, the share of images where it cannot be seen (1 for the centre).
        "kp_unseen_fraction_per_keypoint": [
            round(float(f), 3) for f in np.isin(codes, (HIDDEN_BY_OBJECT, COVERED, INTERIOR)).mean(0)
        ],
    }


def _box_corners(points: np.ndarray) -> np.ndarray:
    lo, hi = points.min(0), points.max(0)
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


_EDGES = [(0, 1), (0, 2), (0, 4), (1, 3), (1, 5), (2, 3), (2, 6), (3, 7), (4, 5), (4, 6), (5, 7), (6, 7)]


def draw_overlays(data: PoseData, pred_pose: np.ndarray, points: np.ndarray, path: str | Path, count: int = 16) -> None:
    """A grid of the first ``count`` images with the model's 3D box under the true pose (green)
    and the predicted pose (red)."""
    import cv2

    count = min(count, len(data))
    corners = torch.from_numpy(_box_corners(points))
    K = torch.from_numpy(data.K[:count])
    true_uv = project(corners, torch.from_numpy(data.pose[:count]), K).numpy()
    pred_uv = project(corners, torch.from_numpy(pred_pose[:count]), K).numpy()
    S = data.images.shape[1]
    scale = max(1, 256 // S)
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    grid = np.zeros((rows * S * scale, cols * S * scale, 3), np.uint8)
    for j in range(count):
        img = cv2.resize(data.images[j][..., ::-1], (S * scale, S * scale), interpolation=cv2.INTER_NEAREST).copy()
        for uv, colour in ((true_uv[j], (0, 200, 0)), (pred_uv[j], (0, 0, 255))):
            p = np.round((uv + 0.5) * scale - 0.5).astype(np.int64)
            if not np.isfinite(uv).all() or np.abs(p).max() > 1e5:
                continue
            for a, b in _EDGES:
                cv2.line(img, tuple(int(v) for v in p[a]), tuple(int(v) for v in p[b]), colour, 1, cv2.LINE_AA)
        r, c = divmod(j, cols)
        grid[r * S * scale : (r + 1) * S * scale, c * S * scale : (c + 1) * S * scale] = img
    cv2.imwrite(str(path), grid)
