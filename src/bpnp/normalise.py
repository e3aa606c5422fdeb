"""Unit-free problems: the solver sees the object centred and of unit size, pixels in focal units
and weights relative to the largest.

PnP's answer is invariant to these changes of units, and undoing them is exact: with
``x3d = s * x3d_n + c``, ``x2d = f * x2d_n + m`` (``K_n = A K``, ``A`` the same affine map) and
``w = w_max * w_n``, the pose ``(R, t_n)`` of the normalised problem gives ``t = s t_n - R c``
and the cost ``f^2 w_max cost_n``. The constants ``c, s, m, f, w_max`` are taken from the data
but held fixed (detached): the solution does not depend on them, so the derivatives through the
maps with fixed constants are the exact derivatives of the original problem, first and second
order. Every tolerance and the well-posedness test then act on a problem whose numbers are of
order one, whatever the units of the caller (micrometres, kilometres, an object far from its
origin, pixels of a 10-gigapixel sensor, softmax weights down to 1e-300).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .geometry import rvec_to_rotmat

__all__ = ["Normalisation", "normalise_problem", "apply_normalisation", "pose_to_normalised", "pose_from_normalised"]


class Normalisation(NamedTuple):
    """The fixed constants of the change of units (all detached, float64)."""

    centre: Tensor  # (B|1, 3) object centre c
    scale: Tensor  # (B|1, 1) object size s (> 0)
    principal: Tensor  # (B|1, 2) pixel origin m (the principal point)
    focal: Tensor  # (B|1, 1) pixel unit f (geometric mean focal length)
    weight: Tensor  # (B|1, 1) largest weight (> 0)


def normalise_problem(
    x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Normalisation]:
    """Normalised copies of a batched problem (differentiable, constants detached).

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)`` upper triangular with positive
        diagonal; weights: ``(B|1, n)`` non-negative with a positive maximum.
    Returns:
        ``x2d_n, x3d_n, K_n, weights_n`` of the same shapes and the :class:`Normalisation`.
    """
    with torch.no_grad():
        if x3d.shape[0]:
            var, centre = torch.var_mean(x3d, dim=-2, correction=0)  # (B|1, 3) each
        else:  # an empty batch (var_mean would warn of zero degrees of freedom)
            var = centre = x3d.new_zeros(0, 3)
        scale = var.sum(-1, keepdim=True).sqrt()
        # All points in one place: a degenerate problem; any positive unit keeps it finite.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        k22 = K[:, 2, 2]
        focal = (K[:, 0, 0] * K[:, 1, 1]).sqrt()[:, None] / k22[:, None]
        principal = K[:, :2, 2] / k22[:, None]
        wmax = weights.amax(-1, keepdim=True)
        wmax = torch.where(wmax > 0, wmax, torch.ones_like(wmax))
    norm = Normalisation(centre, scale, principal, focal, wmax)
    return (*apply_normalisation(x2d, x3d, K, weights, norm), norm)


def apply_normalisation(
    x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor, norm: Normalisation
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The change of units with given constants (differentiable in the inputs): ``x2d_n, x3d_n,
    K_n, weights_n`` (per-item constants make shared inputs per item)."""
    centre, scale, principal, focal, wmax = norm
    # (out-of-place subtraction, then in place: one temporary per input, autograd-safe)
    x3d_n = (x3d - centre[:, None]).div_(scale[:, :, None])
    x2d_n = (x2d - principal[:, None]).div_(focal[:, :, None])
    # K_n = A K with A = [[1/f, 0, -m_x/f], [0, 1/f, -m_y/f], [0, 0, 1]]: its principal point is 0.
    top = (K[:, :2, :] - principal[:, :, None] * K[:, 2:3, :]) / focal[:, :, None]
    K_n = torch.cat([top, K[:, 2:3, :].expand(top.shape[0], 1, 3)], 1)
    return x2d_n, x3d_n, K_n, weights / wmax


def pose_to_normalised(pose: Tensor, norm: Normalisation) -> Tensor:
    """``[rvec, t] (B, 6)`` of the original problem to the normalised one's ``[rvec, t_n]``."""
    R = rvec_to_rotmat(pose[:, :3])
    t_n = (pose[:, 3:] + (R @ norm.centre[..., None])[..., 0]) / norm.scale
    return torch.cat([pose[:, :3], t_n], -1)


def pose_from_normalised(pose_n: Tensor, R: Tensor, norm: Normalisation) -> Tensor:
    """The normalised problem's ``[rvec, t_n] (B, 6)`` with its ``R (B, 3, 3)`` to the original
    problem's ``[rvec, t]`` (differentiable in ``pose_n`` and ``R``)."""
    t = norm.scale * pose_n[:, 3:] - (R @ norm.centre[..., None])[..., 0]
    return torch.cat([pose_n[:, :3], t], -1)
