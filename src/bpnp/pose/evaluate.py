"""Evaluating a trained keypoint network: keypoints -> PnP pose -> the field's metrics.

Metrics (per image, saved in ``per_image.npz`` for paired comparisons; summarised in
``metrics.json``): keypoint error (px), the keypoint constellation's scale error about the
object's projected centre (< 0: shrunk, which puts the pose too far), 2D projection error of the
model's vertices (px) and its accuracy at 5 px, ADD and ADD-S (mm) and their accuracy at 10% of
the diameter (ADD-0.1d; ``add_or_adds_0.1d`` uses ADD-S for symmetric objects), 5 cm 5 deg, the
ADD(-S) AUC up to 10 cm, the translation error along the line of sight (signed: the depth bias)
and across it, PnP convergence, and the mean error of each keypoint. Predictions are also written
as a BOP result CSV.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics as M
from ..geometry import rvec_to_rotmat
from ..layer import solve_pnp
from . import bop
from .data import (
    COVERED,
    DEFAULT_CROP_MARGIN,
    HIDDEN_BY_OBJECT,
    INTERIOR,
    VISIBLE,
    PoseData,
    _scenes,
    keypoint_visibility,
    load_split,
)
from .model import heatmap_confidence, learned_weight_factor, soft_argmax, split_outputs
from .train import load_checkpoint, normalise_images

__all__ = ["predict", "evaluate", "score_predictions", "pose_metrics", "draw_overlays", "model_points"]


def model_points(split_dir: str | Path, obj_id: int, count: int = 1000) -> tuple[np.ndarray, dict]:
    """``(m, 3)`` vertices of the object's model (at most ``count``, evenly strided) and its
    ``models_info.json`` entry."""
    import trimesh

    models = bop.find_models_dir(split_dir)
    info = bop.read_models_info(models)[obj_id]
    verts = np.asarray(trimesh.load(str(bop.model_path(models, obj_id)), process=False).vertices, dtype=np.float64)
    return verts[:: max(1, len(verts) // count)], info


def check_same_object(keypoints3d: np.ndarray, split_dir: str | Path, obj_id: int, trained_on: str) -> None:
    """Refuse (``ValueError``) a network whose surface keypoints ``(k + 1, 3)`` (the last is the
    centre) lie off the split's model: it was trained on another object, and its metrics there
    would mean nothing. Off: the median distance to the model's surface above 5% of its diameter."""
    import trimesh
    from scipy.spatial import cKDTree

    from .mesh import sample_surface

    models = bop.find_models_dir(split_dir)
    diameter = float(bop.read_models_info(models)[obj_id]["diameter"])
    mesh = trimesh.load(str(bop.model_path(models, obj_id)), force="mesh", process=False)
    rng = np.random.default_rng(0)
    surface = sample_surface(mesh.vertices, mesh.faces, 20000, rng) if len(mesh.faces) else mesh.vertices
    off = float(np.median(cKDTree(np.asarray(surface)).query(keypoints3d[:-1])[0]))
    if off > 0.05 * diameter:
        raise ValueError(
            f"the network was trained on another object ({trained_on}): its keypoints lie {off:.1f} mm "
            f"({off / diameter:.0%} of the diameter) off the model of {split_dir}, object {obj_id}"
        )


@torch.no_grad()
def predict(
    net: torch.nn.Module,
    data: PoseData,
    keypoints3d: np.ndarray,
    batch_size: int = 64,
    device: str = "cpu",
    confidence_weights: bool = False,
    window: int | None = 3,
    loss: str = "l2",
    ransac: bool = False,
) -> dict[str, np.ndarray]:
    """Keypoints and PnP poses for every image of ``data`` (``window``: the soft-argmax readout,
    see :func:`~bpnp.pose.model.soft_argmax`; ``loss``, ``ransac``: the PnP's, as in
    :func:`~bpnp.solve_pnp`, its threshold in the network's crop pixels).

    Returns:
        ``kp2d (N, k, 2)``, ``confidence (N, k)`` (the heatmaps'; the PnP weights are these, times
        the learned factors of a network with a weight head), ``pose (N, 6)`` (mm), ``converged (N,)``,
        ``seconds (N,)`` per image (network + PnP, amortised over the batch).
    """
    kp3d = torch.from_numpy(keypoints3d)
    out: dict[str, list] = {"kp2d": [], "confidence": [], "pose": [], "converged": [], "seconds": []}
    for start in range(0, len(data), batch_size):
        t0 = time.perf_counter()
        images = torch.from_numpy(data.images[start : start + batch_size]).to(device)
        logits, weight_logits = split_outputs(net(normalise_images(images)))
        coords, probs = soft_argmax(logits, net.stride, window)
        conf = heatmap_confidence(probs, coords, net.stride)
        w = conf
        if weight_logits is not None:
            # A network with a weight head is scored with the PnP weights it was trained with.
            w = conf * learned_weight_factor(weight_logits, probs)
        K = torch.from_numpy(data.K[start : start + batch_size])
        w = w.double().cpu() if confidence_weights else None
        dist = None if data.dist is None else torch.from_numpy(data.dist[start : start + batch_size])
        res = solve_pnp(coords.double().cpu(), kp3d, K, w, dist=dist, loss=loss, ransac=ransac, warn=False)
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
    dist: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-image metrics ``(N,)`` of predicted against true poses (mm) for model ``points (m, 3)``;
    the 2D projection error through ``K (N, 3, 3)`` and, when given, the lens ``dist (N, 5)``."""
    pred, true = torch.from_numpy(pred_pose), torch.from_numpy(true_pose)
    pts, Kt = torch.from_numpy(points), torch.from_numpy(K)
    add = M.add(pred, true, pts).numpy()
    adds = M.add_s(pred, true, pts).numpy()
    proj = M.projection_error(pred, true, pts, Kt, None if dist is None else torch.from_numpy(dist)).numpy()
    add_or = adds if symmetric else add
    depth, lateral = M.depth_and_lateral_error(pred, true, signed=True)
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
        # ADD is mostly the depth error: the split says which part a variant moves, and the signed
        # depth error (> 0: too far) whether it is noise or a bias.
        "depth_error_mm": depth.abs().numpy(),
        "depth_signed_error_mm": depth.numpy(),
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
    loss: str = "l2",
    ransac: bool = False,
    crop_margin: float | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the BOP split ``data_dir``; write ``metrics.json``,
    ``per_image.npz``, ``predictions.csv`` (BOP result format), ``overlays.png`` and
    ``report.md`` into ``out``. Returns the metrics.

    The test-time PnP is the same for every variant: weighted by the heatmaps' confidences
    (``confidence_weights``; on spot it raised the 2D-projection accuracy of every model by 3-5
    points over unweighted PnP), whatever the model was trained with; a network with a weight head
    multiplies them by its learned factors (``pnp_weights: "confidence x learned"``).

    ``visibility``: also say which keypoints could be seen (:func:`~bpnp.pose.data.keypoint_visibility`,
    ``kp_visibility (N, k)`` in ``per_image.npz``) and report the keypoint error of the visible,
    the self-occluded and the covered ones apart (ray casting: a few seconds per 1,000 images).
    ``loss`` (``"huber"``, ``"cauchy"``) and ``ransac`` make the test-time PnP robust to keypoints
    placed far off (recorded as ``pnp_loss``, ``pnp_ransac``). Images larger than the network's
    input (photographs) are cropped around the object's box with ``crop_margin``; default: the
    margin that frames it as the training renders did (recorded in the checkpoint,
    :func:`~bpnp.pose.data.crop_margin_for`)."""
    net, ckpt = load_checkpoint(checkpoint, device)
    cfg = ckpt["config"]
    obj_id = cfg["obj_id"] if obj_id is None else obj_id
    if crop_margin is None:
        crop_margin = ckpt.get("crop_margin", DEFAULT_CROP_MARGIN)
    data = load_split(data_dir, obj_id=obj_id, size=cfg["size"], margin=crop_margin, limit=limit)
    kp3d = np.asarray(ckpt["keypoints3d"], dtype=np.float64)
    if kp3d.shape != data.keypoints3d.shape or not np.allclose(kp3d, data.keypoints3d):
        check_same_object(kp3d, data_dir, obj_id, cfg.get("data", "its training data"))
        # The network predicts its own keypoints: ground truth for them comes from the pose.
        data.keypoints2d = data.project(kp3d)
    points, info = model_points(data_dir, obj_id)
    symmetric = bool(info.get("symmetries_continuous") or info.get("symmetries_discrete"))
    pred = predict(net, data, kp3d, batch_size, device, confidence_weights, cfg.get("window"), loss, ransac)
    per = pose_metrics(pred["pose"], data.pose, data.K, points, float(info["diameter"]), symmetric, data.dist)
    kp_errors = np.linalg.norm(pred["kp2d"] - data.keypoints2d, axis=-1)  # NxK
    per["kp_error_px"] = kp_errors.mean(-1)
    per["kp_error_px_each"] = kp_errors
    # A constellation shrunk towards the object's centre puts the pose too far (the depth bias).
    centre = torch.from_numpy(data.project(np.zeros((1, 3))))
    per["kp_scale_error"] = M.keypoint_scale_error(
        torch.from_numpy(pred["kp2d"]), torch.from_numpy(data.keypoints2d), centre[:, 0]
    ).numpy()
    if visibility:
        per["kp_visibility"] = keypoint_visibility(data_dir, kp3d, obj_id, limit=limit)
    per["converged"] = pred["converged"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "per_image.npz", ids=data.ids, **per)
    summary = {
        "images": len(data),
        "variant": cfg["variant"],
        "pnp_weights": ("confidence x learned" if net.weight_head is not None else "confidence")
        if confidence_weights
        else "none",
        "pnp_loss": loss,
        "pnp_ransac": bool(ransac),
        "crop_margin": crop_margin,
        "symmetric": symmetric,
        "diameter_mm": float(info["diameter"]),
        "kp_error_px_mean": float(per["kp_error_px"].mean()),
        "kp_error_px_median": float(np.median(per["kp_error_px"])),
        # Which keypoints the network cannot place (e.g. the look-alikes of a symmetric object).
        "kp_error_px_per_keypoint": [round(float(e), 3) for e in kp_errors.mean(0)],
        "kp_scale_error_mean": float(per["kp_scale_error"].mean()),
        "kp_scale_error_median": float(np.median(per["kp_scale_error"])),
        **(_visibility_summary(per["kp_visibility"], kp_errors) if visibility else {}),
        **_pose_summary(per, symmetric),
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
    _write_report(out, f"Evaluation of {Path(checkpoint)} on {data_dir}", summary, overlays > 0, quiet)
    return summary


def _pose_summary(per: dict[str, np.ndarray], symmetric: bool) -> dict[str, float]:
    """The pose metrics of ``metrics.json`` from :func:`pose_metrics`' per-image arrays; an
    image without a prediction (NaN errors, failed accuracies) counts as wrong in the accuracies
    and the AUC and is left out of the error statistics."""
    errors = per["adds_mm"] if symmetric else per["add_mm"]

    def finite(key: str) -> np.ndarray:
        values = per[key]
        return values[np.isfinite(values)]

    def median(key: str) -> float:
        values = finite(key)
        return float(np.median(values)) if len(values) else float("nan")

    def mean(key: str) -> float:
        values = finite(key)
        return float(values.mean()) if len(values) else float("nan")

    return {
        "proj2d_px_median": median("proj2d_px"),
        "proj2d_5px": float(per["proj2d_5px"].mean()),
        "add_0.1d": float(per["add_0.1d"].mean()),
        "adds_0.1d": float(per["adds_0.1d"].mean()),
        "add_or_adds_0.1d": float(per["add_or_adds_0.1d"].mean()),
        "5cm5deg": float(per["5cm5deg"].mean()),
        "add_auc_10cm": M.auc(torch.from_numpy(np.nan_to_num(errors, nan=np.inf)), 100.0),
        "rotation_error_deg_median": median("rotation_error_deg"),
        "translation_error_mm_median": median("translation_error_mm"),
        "depth_error_mm_mean": mean("depth_error_mm"),
        # The depth bias: > 0 when the poses lie too far, as a shrunk keypoint constellation puts them.
        "depth_signed_error_mm_mean": mean("depth_signed_error_mm"),
        "depth_signed_error_mm_median": median("depth_signed_error_mm"),
        "lateral_error_mm_mean": mean("lateral_error_mm"),
    }


def _write_report(out: Path, title: str, summary: dict[str, Any], overlays: bool, quiet: bool) -> None:
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    if overlays:
        lines += ["", "![predicted (red) vs true (green) pose](overlays.png)"]
    (out / "report.md").write_text("\n".join(lines + [""]))
    if not quiet:
        print("\n".join(lines[2 : len(lines) - (2 if overlays else 0)]))


def score_predictions(
    predictions: str | Path,
    data_dir: str | Path,
    out: str | Path | None = None,
    obj_id: int | None = None,
    quiet: bool = True,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Score the poses of a BOP result CSV (``scene_id,im_id,obj_id,score,R,t,time``, mm) on the
    BOP split ``data_dir`` with the pose metrics of :func:`evaluate`: predictions of any method,
    or those of a run whose weights are gone.

    Every annotated instance of ``obj_id`` is scored against the row of its image with the
    highest score; an instance without one counts as wrong. The other rows (other images or
    objects, lower-scored duplicates) are counted (``rows_unused``) and otherwise ignored. The 2D projection error is measured with
    the split's cameras, in its images' pixels (:func:`evaluate` measures it in the network's
    crop: the same when the images are not cropped).

    Args:
        predictions: the CSV; data_dir: the split (scenes and ``models/`` beside or above).
        out: when given, ``metrics.json``, ``per_image.npz`` and ``report.md`` are written there.
        obj_id: the object (default: the only one annotated in the split).
    Returns:
        ``(summary, per_image)``: the metrics; per-image arrays ``(N,)`` row for row as
        :func:`~bpnp.pose.data.load_split` reads the split, with ``ids (N, 3)`` and
        ``predicted (N,)``.
    Raises:
        FileNotFoundError: no CSV or no scenes. ValueError: a malformed CSV, several objects and no
            ``obj_id``, no instance of ``obj_id``, or two instances of it in one image.
    """
    from ..geometry import rotmat_to_rvec

    predictions, data_dir = Path(predictions), Path(data_dir)
    if not predictions.is_file():
        raise FileNotFoundError(f"{predictions}: no such file")
    try:
        rows = bop.read_results_csv(predictions)
    except ValueError as err:  # a wrong field count or a number that is not one
        raise ValueError(f"{predictions}: not a BOP result CSV ({err})") from None
    anns = [ann for scene in _scenes(data_dir) for ann in bop.read_scene(scene)]
    if obj_id is None:
        objects = sorted({ann.obj_id for ann in anns})
        if len(objects) != 1:
            raise ValueError(f"{data_dir}: objects {objects} are annotated; say which with obj_id")
        obj_id = objects[0]
    anns = [ann for ann in anns if ann.obj_id == obj_id]
    if not anns:
        raise ValueError(f"{data_dir}: no instance of obj_id {obj_id}")
    keys = [(ann.scene_id, ann.im_id, ann.obj_id) for ann in anns]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{data_dir}: an image holds two instances of obj_id {obj_id}; scoring needs one per image")
    best: dict[tuple[int, int, int], dict] = {}
    for row in rows:
        key = (row["scene_id"], row["im_id"], row["obj_id"])
        if key not in best or row["score"] > best[key]["score"]:
            best[key] = row
    predicted = np.array([key in best for key in keys])
    true_pose = np.stack([np.concatenate([rotmat_to_rvec(torch.from_numpy(a.R)[None])[0].numpy(), a.t]) for a in anns])
    pred_pose = true_pose.copy()  # placeholders where nothing was predicted, overwritten below
    for j, key in enumerate(keys):
        if predicted[j]:
            R = torch.from_numpy(np.ascontiguousarray(best[key]["R"]))[None]
            pred_pose[j] = np.concatenate([rotmat_to_rvec(R)[0].numpy(), best[key]["t"]])
    points, info = model_points(data_dir, obj_id)
    symmetric = bool(info.get("symmetries_continuous") or info.get("symmetries_discrete"))
    K = np.stack([a.K for a in anns])
    dist = np.stack([np.zeros(5) if a.dist is None else a.dist for a in anns])
    per = pose_metrics(
        pred_pose, true_pose, K, points, float(info["diameter"]), symmetric, dist if dist.any() else None
    )
    for values in per.values():
        values[~predicted] = False if values.dtype == bool else np.nan
    summary = {
        "images": len(anns),
        "predicted": float(predicted.mean()),
        "rows_unused": len(rows) - int(predicted.sum()),
        "symmetric": symmetric,
        "diameter_mm": float(info["diameter"]),
        **_pose_summary(per, symmetric),
    }
    per = {"ids": np.array(keys, dtype=np.int64), "predicted": predicted, **per}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "per_image.npz", **per)
        (out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
        _write_report(out, f"Scores of {predictions} on {data_dir}", summary, False, quiet)
    return summary, per


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
    corners = _box_corners(points)
    true_uv = data.project(corners)[:count]
    pred_uv = data.project(corners, pred_pose)[:count]
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
