"""Pose errors and similarity alignment used by the experiments."""

from __future__ import annotations

import torch
from torch import Tensor

from ..metrics import rotation_angle_deg, rotation_error_deg

__all__ = ["rotation_angle_deg", "rotation_error_deg", "translation_error_rel", "similarity_align"]


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
