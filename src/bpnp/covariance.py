"""Pose covariance from the exact Hessian at the optimum and the residual variance.

Near the optimum the cost is ``f(xi) ~ f* + 1/2 xi^T H xi`` in the chart ``R <- exp([w]_x) R,
t_n <- t_n + tau``. With pixel noise of variance ``sigma^2`` per coordinate (weights as relative
inverse variances), ``Cov(xi) = 2 sigma^2 H^-1`` (the Gauss-Newton part of ``H`` is
``2 J^T W J``), and ``sigma^2`` is estimated as ``f* / (2 n - 6)``. The chart maps to the
returned ``[rvec, t]`` with ``d rvec / d w = J_l^-1(rvec)``, ``d t / d w = [R c]_x`` and
``d t / d tau = s I`` (``c, s``: the normalisation's centre and scale). Since ``sigma^2`` is
estimated from the ``2 n - 6`` degrees of freedom of the fit, the covariance is widened by
:func:`student_factor` so that its 95% chi-square ellipsoid holds 95% of the answers (n = 50:
4.7%; it had held 91.9-94.9% without).

A robust cost ``sum_i w_i rho(s_i)`` is an M-estimator: its curvature no longer measures the
spread of its answer (``2 sigma^2 H^-1`` with ``sigma^2`` from the robust cost overstates it
1.3-1.8 times). It takes Huber's form of the sandwich ``H^-1 B H^-1``, each factor pooled over the
points so that a few residuals do not swing it: ``B = 2 c A`` and ``H = 2 d A`` with
``A = sum_i w_i J_i^T J_i`` (``J_i``: the residual's chart Jacobian), ``c = sum_i w_i rho'^2 s_i /
(n - 3)`` and ``d`` the weighted mean of ``rho' + rho'' s`` (the expected curvature of a point's
cost per unit of ``w J^T J``), times Huber's small-sample factor ``K^2 = (1 + 6 var / (n d^2))^2``:
``Cov = K^2 c / (2 d^2) A^-1``. For least squares (``rho' = 1``) it is ``sigma^2 A^-1``, the form above.
A robust cost leans on fewer points than it is given (``n_eff = (sum_i u_i)^2 / sum_i u_i^2`` with
``u_i = rho' + rho'' s``), and the spread it estimates from them has ``nu = 2 n_eff - 6`` degrees of
freedom: the covariance is scaled by ``6 F_0.95(6, nu) / chi2_0.95(6)`` (a fit in ``1/nu``, within
0.1% for ``nu >= 4``), so that its 95% chi-square ellipsoid holds 95% of the answers. Measured
(``benchmarks/bench_robust.py --coverage``): 93-96% for huber and cauchy at scales of 0.5-2 px of
unit noise, clean and with 10% of the points at five times the noise, but cauchy at 0.5 px with them (91%).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .cost import robust_loss
from .geometry import skew
from .normalise import Normalisation

__all__ = ["pose_covariance", "inverse_left_jacobian", "RobustSpread", "robust_spread"]


class RobustSpread(NamedTuple):
    """The pooled sandwich of a robust cost: ``Cov(xi) = factor A^-1``."""

    A: Tensor  # (B, 6, 6) sum_i w_i J_i^T J_i
    factor: Tensor  # (B,) K^2 c / (2 d^2)


def robust_spread(residuals: Tensor, jacobians: Tensor, weights: Tensor, loss: str, scale: Tensor) -> RobustSpread:
    """The pooled sandwich of the cost ``sum_i w_i rho(|r_i|^2)`` at its minimum (module docstring).

    Args:
        residuals: ``(B, n, 2)``; jacobians: ``(B, n, 2, 6)`` (:func:`bpnp.cost.residual_jacobians`);
        weights: ``(B|1, n)``; loss: ``"huber"`` or ``"cauchy"``; scale: ``(B|1, 1)``, units of the residuals.
    """
    B, n = residuals.shape[:2]
    w = weights.expand(B, n)
    s = (residuals * residuals).sum(-1)
    _, d1, d2 = robust_loss(s, loss, scale)
    A = torch.einsum("bn,bnki,bnkj->bij", w, jacobians, jacobians)
    points = (w > 0).sum(-1).to(s.dtype)
    c = (w * d1 * d1 * s).sum(-1) / (points - 3.0).clamp_min(1.0)
    curv = d1 + d2 * s  # the expected curvature of a point's cost along its residual
    wsum = w.sum(-1).clamp_min(1e-300)
    d = (w * curv).sum(-1) / wsum
    var = (w * (curv - d[:, None]) ** 2).sum(-1) / wsum
    K = 1.0 + 6.0 * var / (points.clamp_min(1.0) * d * d)
    n_eff = (w * curv).sum(-1) ** 2 / (w * w * curv * curv).sum(-1).clamp_min(1e-300)
    nu = 2.0 * n_eff - 6.0
    return RobustSpread(A, student_factor(nu) * K * K * c / (2.0 * d * d))


def _floored_inverse(M: Tensor) -> Tensor:
    """``(B, 6, 6)`` inverse of the symmetric part of ``M`` with its eigenvalues floored at 1e-12
    of the largest (a null direction gets a very large, finite variance; a non-finite ``M``, I)."""
    M = 0.5 * (M + M.transpose(-1, -2))
    finite = torch.isfinite(M).flatten(1).all(-1)[:, None, None]
    M = torch.where(finite, M, torch.eye(6, dtype=M.dtype, device=M.device))
    evals, evecs = torch.linalg.eigh(M)
    floor = 1e-12 * evals.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    return evecs @ torch.diag_embed(1.0 / torch.maximum(evals, floor)) @ evecs.transpose(-1, -2)


def student_factor(nu: Tensor) -> Tensor:
    """``6 F_0.95(6, nu) / chi2_0.95(6)``: how much wider a 95% ellipsoid of 6 parameters is when
    the noise level is estimated with ``nu`` degrees of freedom (a fit in ``1/nu``, within 0.1%
    for ``nu >= 4``; ``nu`` is clamped there)."""
    nu = nu.clamp_min(4.0)
    return 1.0 + 4.35288928 / nu + 7.06775156 / nu**2 + 26.02637777 / nu**3


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


def pose_covariance(
    hess: Tensor,
    cost: Tensor,
    dof: Tensor,
    rvec: Tensor,
    R: Tensor,
    norm: Normalisation,
    robust: RobustSpread | None = None,
) -> Tensor:
    """``(B, 6, 6)`` covariance of ``[rvec, t]`` (original units).

    Args:
        hess: ``(B, 6, 6)`` exact chart Hessian of the normalised problem at the answer.
        cost: ``(B,)`` its cost (normalised units); dof: ``(B,)`` ``2 n - 6`` (>= 1).
        rvec: ``(B, 3)``; R: ``(B, 3, 3)``; norm: the normalisation of the problem.
        robust: the pooled sandwich of a robust cost (:func:`robust_spread`); None: ``2 sigma^2 H^-1``.
    Returns:
        Symmetric positive semi-definite ``(B, 6, 6)``; a singular Hessian gives very large,
        finite entries along its null space (the pose is not determined there).
    """
    if robust is None:
        sigma2 = torch.nan_to_num(cost / dof, nan=0.0, posinf=0.0)
        cov_chart = (2.0 * student_factor(dof) * sigma2)[:, None, None] * _floored_inverse(hess)
    else:
        cov_chart = torch.nan_to_num(robust.factor, nan=0.0, posinf=0.0)[:, None, None] * _floored_inverse(robust.A)
    B = hess.shape[0]
    G = torch.zeros(B, 6, 6, dtype=hess.dtype, device=hess.device)
    G[:, :3, :3] = inverse_left_jacobian(rvec)
    Rc = (R @ norm.centre.expand(B, 3)[..., None])[..., 0]
    G[:, 3:, :3] = skew(Rc)
    G[:, 3:, 3:] = norm.scale.expand(B, 1)[..., None] * torch.eye(3, dtype=hess.dtype, device=hess.device)
    cov = G @ cov_chart @ G.transpose(-1, -2)
    return 0.5 * (cov + cov.transpose(-1, -2))
