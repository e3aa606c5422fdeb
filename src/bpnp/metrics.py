"""Pose-estimation metrics of the field: ADD, ADD-S, 2D projection error, n cm n deg, ADD(-S) AUC;
the translation error split into depth and lateral parts; the similarity alignment of point sets.

All functions are batched, differentiable where that makes sense, and take poses as ``[rvec, t]``
``(B, 6)`` in the OpenCV convention, object points ``(n, 3)`` in the units of the poses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .geometry import project, rvec_to_rotmat, transform_points

__all__ = [
    "add",
    "add_s",
    "projection_error",
    "rotation_angle_deg",
    "rotation_error_deg",
    "translation_error",
    "translation_error_rel",
    "similarity_align",
    "depth_and_lateral_error",
    "keypoint_scale_error",
    "cm_deg_accuracy",
    "auc",
]


def _model_in_camera(pose: Tensor, model: Tensor) -> Tensor:
    return transform_points(model, rvec_to_rotmat(pose[:, :3]), pose[:, 3:])  # BxNx3


def add(pred: Tensor, true: Tensor, model: Tensor) -> Tensor:
    """ADD: mean distance between the model points under the two poses.

    Args:
        pred, true: ``(B, 6)`` poses; model: ``(n, 3)`` object points.
    Returns:
        ``(B,)`` in the units of the model.
    """
    return (_model_in_camera(pred, model) - _model_in_camera(true, model)).norm(dim=-1).mean(-1)


def add_s(pred: Tensor, true: Tensor, model: Tensor, chunk: int = 1 << 24) -> Tensor:
    """ADD-S (symmetric objects): mean distance from each true-pose point to the closest
    predicted-pose point. O(B n^2) work, in blocks of at most ``chunk`` distances (memory stays
    bounded for any batch and model size).

    Args:
        pred, true: ``(B, 6)``; model: ``(n, 3)``.
    Returns:
        ``(B,)``.
    """
    a, b = _model_in_camera(true, model), _model_in_camera(pred, model)
    B, n = a.shape[:2]
    rows = max(1, chunk // max(n, 1))  # true-pose points per block, over one item
    items = chunk // max(n * n, 1)  # whole items per block, when one fits
    if n * n <= chunk:
        closest = torch.cat([torch.cdist(a[i : i + items], b[i : i + items]).amin(-1) for i in range(0, B, items)], 0)
    else:
        closest = torch.stack(
            [torch.cat([torch.cdist(a[i, j : j + rows], b[i]).amin(-1) for j in range(0, n, rows)]) for i in range(B)]
        )
    return closest.mean(-1)


def projection_error(pred: Tensor, true: Tensor, model: Tensor, K: Tensor, dist: Tensor | None = None) -> Tensor:
    """2D projection error: mean pixel distance between the model's projections under the two poses.

    Args:
        pred, true: ``(B, 6)``; model: ``(n, 3)``; K: ``(3, 3)`` or ``(B, 3, 3)``; dist: the lens,
            ``(5,)`` or ``(B, 5)`` OpenCV coefficients, or None (pinhole).
    Returns:
        ``(B,)`` pixels.
    """
    return (project(model, pred, K, dist) - project(model, true, K, dist)).norm(dim=-1).mean(-1)


def rotation_angle_deg(R: Tensor, R_ref: Tensor) -> Tensor:
    """Angle of ``R^T R_ref`` in degrees: ``(..., 3, 3), (..., 3, 3) -> (...)``.

    atan2 of the skew and symmetric parts: accurate for small angles, where acos is not.
    """
    M = R.transpose(-1, -2) @ R_ref
    cos = (M.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    sin = 0.5 * torch.stack(
        [M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1
    ).norm(dim=-1)
    return torch.rad2deg(torch.atan2(sin, cos))


def rotation_error_deg(pose: Tensor, pose_ref: Tensor) -> Tensor:
    """Rotation angle between two poses in degrees: ``(..., 6), (..., 6) -> (...)``."""
    return rotation_angle_deg(rvec_to_rotmat(pose[..., :3]), rvec_to_rotmat(pose_ref[..., :3]))


def translation_error(pred: Tensor, true: Tensor) -> Tensor:
    """``|t_pred - t_true|``, ``(B,)`` in the units of the poses."""
    return (pred[:, 3:] - true[:, 3:]).norm(dim=-1)


def translation_error_rel(pose: Tensor, pose_ref: Tensor) -> Tensor:
    """``|t - t_ref| / |t_ref|``: ``(..., 6), (..., 6) -> (...)``."""
    return (pose[..., 3:] - pose_ref[..., 3:]).norm(dim=-1) / pose_ref[..., 3:].norm(dim=-1)


def similarity_align(src: Tensor, dst: Tensor) -> Tensor:
    """Umeyama's alignment: ``src (n, 3)`` moved by the scale, rotation and translation that best
    fit it to ``dst (n, 3)`` in least squares; returns the moved copy ``(n, 3)`` (structure known
    up to a similarity, as in structure from motion, compared with the truth)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    U, S, Vh = torch.linalg.svd(b.T @ a / src.shape[0])
    D = torch.ones(3, dtype=src.dtype, device=src.device)
    D[2] = torch.sign(torch.linalg.det(U @ Vh))  # a rotation, not a reflection
    R = U @ torch.diag(D) @ Vh
    scale = (S * D).sum() / a.pow(2).sum(-1).mean()
    return scale * a @ R.T + mu_d


def depth_and_lateral_error(pred: Tensor, true: Tensor, signed: bool = False) -> tuple[Tensor, Tensor]:
    """The translation error split along and across the line of sight to the true position:
    ``(B, 6), (B, 6) -> (B,), (B,)``, the depth error ``dt . u`` and the lateral error
    ``|dt - (dt . u) u|`` with ``u = t_true / |t_true|`` (their squares add up to the squared
    translation error).

    A monocular estimate places an object across the image far better than along the ray: a depth
    error moves the image by a fraction of its size only, so the 2D projection error hardly sees
    it, while ADD does.

    Args:
        signed: return the depth error with its sign (> 0: placed too far), not its absolute value;
            its mean over a test set is the estimator's depth bias."""
    dt = pred[:, 3:] - true[:, 3:]
    ray = true[:, 3:] / true[:, 3:].norm(dim=-1, keepdim=True)
    along = (dt * ray).sum(-1)
    return along if signed else along.abs(), (dt - along[:, None] * ray).norm(dim=-1)


def keypoint_scale_error(pred: Tensor, true: Tensor, centre: Tensor) -> Tensor:
    """How much larger a predicted keypoint constellation is than the true one, about a centre:
    ``(B, k, 2), (B, k, 2), (B, 2) -> (B,)``, ``sum_i (pred_i - c) . u_i / sum_i |true_i - c| - 1``
    with ``u_i`` the direction from ``c`` to ``true_i`` (< 0: shrunk towards the centre).

    Only the radial part of each keypoint's error counts: an error across the radius lengthens it
    whichever way it points, and would read as growth. Keypoints at the centre itself (the
    object's centre, say) have no radial direction and do not count. With ``centre`` the
    projection of the object's centre, a constellation shrunk by s% makes PnP place the object
    about s% too far: the part of the depth error that the keypoints' spread decides."""
    offset = true - centre[:, None]  # Bxkx2
    radius = offset.norm(dim=-1)
    has_direction = radius > 1e-9 * radius.amax(-1, keepdim=True).clamp_min(1e-300)
    direction = offset / torch.where(has_direction, radius, torch.ones_like(radius))[..., None]
    radial = ((pred - centre[:, None]) * direction).sum(-1)
    return (radial * has_direction).sum(-1) / (radius * has_direction).sum(-1) - 1.0


def cm_deg_accuracy(pred: Tensor, true: Tensor, cm: float = 5.0, deg: float = 5.0, unit_per_cm: float = 10.0) -> Tensor:
    """``(B,)`` bool: rotation error < ``deg`` degrees and translation error < ``cm`` centimetres
    (``unit_per_cm``: pose units per centimetre; 10 for millimetres as in BOP)."""
    return (rotation_error_deg(pred, true) < deg) & (translation_error(pred, true) < cm * unit_per_cm)


def auc(errors: Tensor, max_threshold: float, steps: int = 1000) -> float:
    """Area under the accuracy-threshold curve for thresholds in ``[0, max_threshold]``,
    normalised to [0, 1] (e.g. ADD(-S) AUC with ``max_threshold`` = 10 cm as for YCB-Video).

    Args:
        errors: ``(B,)`` per-image errors; max_threshold: the curve's end.
    """
    thresholds = torch.linspace(0.0, max_threshold, steps + 1, dtype=torch.float64)
    acc = (errors.detach().double().cpu()[None, :] <= thresholds[:, None]).double().mean(-1)
    return float(torch.trapezoid(acc, thresholds) / max_threshold)
