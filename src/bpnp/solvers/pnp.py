"""The batched PnP forward solve: global candidates, then exact-Hessian LM on pixels."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..cost import cost_terms
from ..geometry import rvec_to_rotmat
from .init import initial_poses
from .lm import levenberg_marquardt


class PnPSolution(NamedTuple):
    """Forward answer, float64, detached."""

    R: Tensor  # (B, 3, 3)
    t: Tensor  # (B, 3)
    cost: Tensor  # (B,)
    hess: Tensor  # (B, 6, 6) exact chart Hessian at the answer
    converged: Tensor  # (B,) bool
    iterations: int


def refine(
    R: Tensor,
    t: Tensor,
    x3d: Tensor,
    x2d: Tensor,
    K: Tensor,
    weights: Tensor,
    max_iter: int = 100,
    check_every: int = 1,
):
    """Exact-Hessian Levenberg-Marquardt on the reprojection cost from ``(R, t)``.

    Args:
        R: ``(M, 3, 3)``; t: ``(M, 3)``; x3d: ``(M|1, n, 3)``; x2d: ``(M, n, 2)``;
        K: ``(M|1, 3, 3)``; weights: ``(M|1, n)``; all float64.
    Returns:
        The :class:`~bpnp.solvers.lm.LMResult` with state ``(R, t)``.
    """
    M, n, _ = x2d.shape
    wsum = weights.expand(M, n).sum(-1)
    pix_scale = (x2d * x2d).sum(-1).mean(-1) + 1.0
    # Floor of the decrement: a residual of ~1e-14 of the pixel scale, i.e. float64 rounding.
    atol = 1e-28 * wsum * pix_scale
    depth_floor = 1e-9 * (t.norm(dim=-1, keepdim=True) + 1e-300)

    def evaluate(state):
        ct = cost_terms(state[0], state[1], x3d, x2d, K, weights, hessian=True,
                        min_depth=depth_floor)
        bad = ct.min_depth <= depth_floor[:, 0]
        # A pose that puts weighted points behind the camera is not a valid trial point.
        cost = torch.where(bad, torch.full_like(ct.cost, float("inf")), ct.cost)
        return cost, ct.grad, ct.hess

    def retract(state, step):
        return rvec_to_rotmat(step[:, :3]) @ state[0], state[1] + step[:, 3:]

    return levenberg_marquardt((R, t), evaluate, retract, max_iter=max_iter, rtol=1e-15,
                               atol=atol, check_every=check_every)


def _take(x: Tensor, B: int, k: int) -> Tensor:
    """Repeat a ``(B|1, ...)`` tensor for ``k`` candidates per item."""
    return x if x.shape[0] == 1 else x.repeat_interleave(k, 0)


def solve_pnp_forward(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    init_R: Tensor | None = None,
    init_t: Tensor | None = None,
    num_candidates: int = 4,
    max_iter: int = 100,
    check_every: int = 1,
) -> PnPSolution:
    """Globally optimal weighted PnP for a batch (forward only, float64 in and out).

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``.
        init_R, init_t: optional warm start ``(B, 3, 3)``, ``(B, 3)``, added as a candidate.
        num_candidates: global candidates refined per item.
        max_iter: LM iteration cap.
        check_every: LM's host check interval.
    Returns:
        :class:`PnPSolution`.
    """
    B, n, _ = x2d.shape
    R0, t0, _ = initial_poses(x2d, x3d, K, weights, num_candidates=num_candidates)
    if init_R is not None:
        R0 = torch.cat([init_R[:, None], R0], 1)
        t0 = torch.cat([init_t[:, None], t0], 1)
    k = R0.shape[1]
    out = refine(
        R0.reshape(-1, 3, 3), t0.reshape(-1, 3), _take(x3d, B, k), x2d.repeat_interleave(k, 0),
        _take(K, B, k), _take(weights, B, k), max_iter=max_iter, check_every=check_every,
    )
    R, t = out.state
    depth = cost_terms(R, t, _take(x3d, B, k), x2d.repeat_interleave(k, 0), _take(K, B, k),
                       _take(weights, B, k), hessian=False).min_depth
    cost = out.cost.reshape(B, k)
    valid = (depth > 0).reshape(B, k) & torch.isfinite(cost)
    key = torch.where(valid, cost, torch.full_like(cost, float("inf")))
    none_valid = ~valid.any(-1, keepdim=True)
    key = torch.where(none_valid, torch.nan_to_num(cost, nan=float("inf")), key)
    best = key.argmin(-1)
    idx = torch.arange(B, device=x2d.device) * k + best
    R, t, cost, hess = R[idx], t[idx], out.cost[idx], out.hess[idx]
    ok = out.converged[idx] & ~none_valid[:, 0]
    eig = torch.linalg.eigvalsh(0.5 * (hess + hess.transpose(-1, -2)))
    well_posed = eig[:, 0] > 1e-10 * eig[:, -1].abs().clamp_min(1e-300)
    return PnPSolution(R, t, cost, hess, ok & well_posed & torch.isfinite(cost), out.iterations)
