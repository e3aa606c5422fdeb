"""Pose covariance from the exact Hessian at the optimum and the residual variance.

Near the optimum the cost is ``f(xi) ~ f* + 1/2 xi^T H xi`` in the chart ``R <- exp([w]_x) R,
t_n <- t_n + tau``. With pixel noise of variance ``sigma^2`` per coordinate (weights as relative
inverse variances), ``Cov(xi) = 2 sigma^2 H^-1`` (the Gauss-Newton part of ``H`` is
``2 J^T W J``), and ``sigma^2`` is estimated as ``f* / (2 n - 6)``. The chart maps to the
returned ``[rvec, t]`` with ``d rvec / d w = J_l^-1(rvec)``, ``d t / d w = [R c]_x`` and
``d t / d tau = s I`` (``c, s``: the normalisation's centre and scale).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .geometry import skew
from .normalise import Normalisation

__all__ = ["pose_covariance", "inverse_left_jacobian"]


def inverse_left_jacobian(rvec: Tensor) -> Tensor:
    """``(..., 3, 3)`` matrix ``J_l^-1(rvec) = I - [r]/2 + c [r]^2`` of SO(3) (series near 0).

    Args:
        rvec: ``(..., 3)``.
    """
    theta2 = (rvec * rvec).sum(-1, keepdim=True)[..., None]
    small = theta2 < 1e-6
    th = torch.where(small, torch.ones_like(theta2), theta2).sqrt()
    coef = torch.where(
        small,
        1.0 / 12.0 + theta2 / 720.0 + theta2 * theta2 / 30240.0,
        1.0 / th**2 - (1.0 + torch.cos(th)) / (2.0 * th * torch.sin(th)),
    )
    S = skew(rvec)
    eye = torch.eye(3, dtype=rvec.dtype, device=rvec.device)
    return eye - 0.5 * S + coef * (S @ S)


def pose_covariance(hess: Tensor, cost: Tensor, dof: Tensor, rvec: Tensor, R: Tensor, norm: Normalisation) -> Tensor:
    """``(B, 6, 6)`` covariance of ``[rvec, t]`` (original units).

    Args:
        hess: ``(B, 6, 6)`` exact chart Hessian of the normalised problem at the answer.
        cost: ``(B,)`` its cost (normalised units); dof: ``(B,)`` ``2 n - 6`` (>= 1).
        rvec: ``(B, 3)``; R: ``(B, 3, 3)``; norm: the normalisation of the problem.
    Returns:
        Symmetric positive semi-definite ``(B, 6, 6)``; a singular Hessian gives very large,
        finite entries along its null space (the pose is not determined there).
    """
    H = 0.5 * (hess + hess.transpose(-1, -2))
    H = torch.where(
        torch.isfinite(H).flatten(1).all(-1)[:, None, None], H, torch.eye(6, dtype=H.dtype, device=H.device)
    )
    evals, evecs = torch.linalg.eigh(H)
    floor = 1e-12 * evals.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    inv = evecs @ torch.diag_embed(1.0 / torch.maximum(evals, floor)) @ evecs.transpose(-1, -2)
    sigma2 = torch.nan_to_num(cost / dof, nan=0.0, posinf=0.0)
    cov_chart = 2.0 * sigma2[:, None, None] * inv
    B = hess.shape[0]
    G = torch.zeros(B, 6, 6, dtype=hess.dtype, device=hess.device)
    G[:, :3, :3] = inverse_left_jacobian(rvec)
    Rc = (R @ norm.centre.expand(B, 3)[..., None])[..., 0]
    G[:, 3:, :3] = skew(Rc)
    G[:, 3:, 3:] = norm.scale.expand(B, 1)[..., None] * torch.eye(3, dtype=hess.dtype, device=hess.device)
    cov = G @ cov_chart @ G.transpose(-1, -2)
    return 0.5 * (cov + cov.transpose(-1, -2))
