"""The PnP cost and its closed-form derivatives in a local pose chart.

The cost of a pose ``(R, t)`` is ``f = sum_i w_i ||pi(R X_i + t; K) - x_i||^2`` (pixels).
Derivatives are taken with respect to a local perturbation ``xi = (omega, tau)`` that acts as
``R <- exp([omega]_x) R``, ``t <- t + tau``; at ``xi = 0`` the first and second derivatives of
``f`` are given here in closed form (no autograd), per point and summed, O(B n) work:

- ``grad``: ``df/dxi`` (B, 6);
- ``hess``: the exact ``d2f/dxi2`` (B, 6, 6): Gauss-Newton term plus the residual curvature
  of the projection and of the rotation.

The projection (camera model) and the per-point weighting are kept as separate pieces so the
solver and the backward share them. ``gradient_in_chart`` is written with differentiable
tensor ops so that autograd through it gives the mixed derivatives ``d2f / dxi dtheta`` that
the implicit-function backward needs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class CostTerms(NamedTuple):
    """Cost and its chart derivatives for a batch of poses."""

    cost: Tensor  # (B,)
    grad: Tensor  # (B, 6)
    hess: Tensor | None  # (B, 6, 6) exact, or None
    min_depth: Tensor  # (B,) smallest camera-frame depth among points with weight > 0


def _camera_coefficients(K: Tensor) -> tuple[Tensor, ...]:
    """Entries of ``K / K[2,2]`` used by the projection, each ``(B|1, 1)``."""
    k22 = K[..., 2, 2]
    return tuple(
        (K[..., i, j] / k22)[..., None] for i, j in ((0, 0), (0, 1), (1, 1), (0, 2), (1, 2))
    )


def _projection_and_jacobian(
    xcam: Tensor, K: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pixels, their Jacobian rows w.r.t. the camera-frame point, and helpers.

    Returns ``(uv (B,n,2), gu (B,n,3), gv (B,n,3), inv_z (B,n), ab (B,n,2))`` where ``gu``,
    ``gv`` are ``du/dX`` and ``dv/dX`` and ``ab`` the normalised coordinates ``X/Z, Y/Z``.
    """
    m00, m01, m11, c0, c1 = _camera_coefficients(K)
    inv_z = 1.0 / xcam[..., 2]
    a = xcam[..., 0] * inv_z
    b = xcam[..., 1] * inv_z
    u = m00 * a + m01 * b + c0
    v = m11 * b + c1
    zero = torch.zeros_like(a)
    gu = torch.stack([m00 * inv_z, m01 * inv_z, -(m00 * a + m01 * b) * inv_z], -1)
    gv = torch.stack([zero + 0.0 * m00, m11 * inv_z, -m11 * b * inv_z], -1)
    return torch.stack([u, v], -1), gu, gv, inv_z, torch.stack([a, b], -1)


def _camera_points(R: Tensor, t: Tensor, x3d: Tensor) -> tuple[Tensor, Tensor]:
    rotated = x3d @ R.transpose(-1, -2)  # BxNx3, R X without t
    return rotated, rotated + t[..., None, :]


def gradient_in_chart(
    R: Tensor, t: Tensor, x3d: Tensor, x2d: Tensor, K: Tensor, weights: Tensor
) -> Tensor:
    """``df/dxi`` at ``xi = 0``, differentiable in ``x3d, x2d, K, weights`` (and R, t).

    Args:
        R: ``(B, 3, 3)``; t: ``(B, 3)``; x3d: ``(B|1, n, 3)``; x2d: ``(B, n, 2)``;
        K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``.
    Returns:
        ``(B, 6)`` gradient ``[d/domega, d/dtau]``.
    """
    rotated, xcam = _camera_points(R, t, x3d)
    uv, gu, gv, _, _ = _projection_and_jacobian(xcam, K)
    res = uv - x2d
    s = (2.0 * weights)[..., None] * (res[..., :1] * gu + res[..., 1:] * gv)  # BxNx3
    return torch.cat([torch.linalg.cross(rotated, s, dim=-1).sum(-2), s.sum(-2)], -1)


def cost_terms(
    R: Tensor,
    t: Tensor,
    x3d: Tensor,
    x2d: Tensor,
    K: Tensor,
    weights: Tensor,
    hessian: bool = True,
    min_depth: Tensor | float = 0.0,
) -> CostTerms:
    """Cost, chart gradient and exact chart Hessian, in closed form.

    Points whose depth falls below ``min_depth`` are clamped to it (so a pose with points behind
    the camera gets a large finite cost rather than NaN); callers see this in ``min_depth``.

    Args:
        R: ``(B, 3, 3)``; t: ``(B, 3)``; x3d: ``(B|1, n, 3)``; x2d: ``(B, n, 2)``;
        K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``; min_depth: scalar or ``(B, 1)``.
    Returns:
        :class:`CostTerms`.
    """
    rotated, xcam = _camera_points(R, t, x3d)
    depth = xcam[..., 2]
    visible = weights > 0
    big = torch.finfo(depth.dtype).max
    seen_depth = torch.where(visible, depth, torch.full_like(depth, big)).amin(-1)
    if not (isinstance(min_depth, float) and min_depth == 0.0):
        xcam = torch.cat([xcam[..., :2], torch.maximum(depth, min_depth)[..., None]], -1)
    uv, gu, gv, inv_z, ab = _projection_and_jacobian(xcam, K)
    res = uv - x2d  # BxNx2
    w = weights.expand(res.shape[:-1])
    cost = (w * (res * res).sum(-1)).sum(-1)
    s = res[..., :1] * gu + res[..., 1:] * gv  # BxNx3, (dpix/dX)^T r
    ws = w[..., None] * s
    grad = 2.0 * torch.cat([torch.linalg.cross(rotated, ws, dim=-1).sum(-2), ws.sum(-2)], -1)
    if not hessian:
        return CostTerms(cost, grad, None, seen_depth)

    # Per point, d2f/dX2 / 2 = G^T G + sum_c r_c d2pix_c/dX2, with G = dpix/dX (2x3).
    m00, m01, m11, _, _ = _camera_coefficients(K)
    q0 = m00 * res[..., 0]  # (M^T r), M = K[:2,:2]/k22
    q1 = m01 * res[..., 0] + m11 * res[..., 1]
    iz2 = inv_z * inv_z
    c02 = -q0 * iz2
    c12 = -q1 * iz2
    c22 = 2.0 * (q0 * ab[..., 0] + q1 * ab[..., 1]) * iz2
    S = gu[..., :, None] * gu[..., None, :] + gv[..., :, None] * gv[..., None, :]  # BxNx3x3
    curv = torch.stack(
        [
            torch.stack([torch.zeros_like(c02), torch.zeros_like(c02), c02], -1),
            torch.stack([torch.zeros_like(c02), torch.zeros_like(c02), c12], -1),
            torch.stack([c02, c12, c22], -1),
        ],
        -2,
    )
    S = (S + curv) * w[..., None, None]
    # Chain through X = exp([omega]) P + t + tau: dX/dxi = [-[P]_x, I].
    P = rotated
    N = torch.linalg.cross(P[..., :, None].expand_as(S), S, dim=-2)  # [P]_x S, column-wise
    hww = torch.linalg.cross(P[..., None, :].expand_as(N), N, dim=-1)  # [P]_x S [P]_x^T
    # Second derivative of exp at 0 gives sym(s P^T) - (s.P) I for the rotation block.
    sp = ws[..., :, None] * P[..., None, :]
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    rot_curv = 0.5 * (sp + sp.transpose(-1, -2)) - (ws * P).sum(-1)[..., None, None] * eye
    h_ww = (hww + rot_curv).sum(-3)
    h_wt = N.sum(-3)
    h_tt = S.sum(-3)
    hess = 2.0 * torch.cat(
        [torch.cat([h_ww, h_wt], -1), torch.cat([h_wt.transpose(-1, -2), h_tt], -1)], -2
    )
    return CostTerms(cost, grad, hess, seen_depth)


def cost_only(R: Tensor, t: Tensor, x3d: Tensor, x2d: Tensor, K: Tensor, weights: Tensor) -> Tensor:
    """Weighted squared reprojection error ``(B,)`` of poses ``R (B,3,3), t (B,3)``."""
    _, xcam = _camera_points(R, t, x3d)
    uv, _, _, _, _ = _projection_and_jacobian(xcam, K)
    res = uv - x2d
    return (weights * (res * res).sum(-1)).sum(-1)
