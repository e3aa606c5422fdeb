"""Pose errors and similarity alignment used by the experiments."""

from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import rvec_to_rotmat


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


def translation_error_rel(pose: Tensor, pose_ref: Tensor) -> Tensor:
    """``|t - t_ref| / |t_ref|``."""
    return (pose[..., 3:] - pose_ref[..., 3:]).norm(dim=-1) / pose_ref[..., 3:].norm(dim=-1)


def similarity_align(src: Tensor, dst: Tensor) -> Tensor:
    """Umeyama: the scale-rotation-translation of ``src (n,3)`` that best fits ``dst (n,3)``;
    returns the aligned copy of ``src``."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / src.shape[0]
    U, S, Vh = torch.linalg.svd(cov)
    D = torch.ones(3, dtype=src.dtype)
    D[2] = torch.sign(torch.linalg.det(U @ Vh))
    R = U @ torch.diag(D) @ Vh
    scale = (S * D).sum() / a.pow(2).sum(-1).mean()
    return scale * a @ R.T + mu_d
