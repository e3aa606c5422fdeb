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
    rvec: Tensor | None = None  # (B, 3) rotation vector of R, when the solver computed it


def refine(
    R: Tensor,
    t: Tensor,
    x3d: Tensor,
    x2d: Tensor,
    K: Tensor,
    weights: Tensor,
    max_iter: int = 100,
    check_every: int = 1,
    polish_steps: int = 2,
    exact_hessian: bool = True,
):
    """Exact-Hessian Levenberg-Marquardt on the reprojection cost from ``(R, t)``.

    Args:
        R: ``(M, 3, 3)``; t: ``(M, 3)``; x3d: ``(M|1, n, 3)``; x2d: ``(M, n, 2)``;
        K: ``(M|1, 3, 3)``; weights: ``(M|1, n)``; all float64.
        max_iter, check_every, polish_steps: as in :func:`~bpnp.solvers.lm.levenberg_marquardt`.
        exact_hessian: False uses the Gauss-Newton Hessian (cheaper; for a few screening
            iterations, not for the final convergence).
    Returns:
        The :class:`~bpnp.solvers.lm.LMResult` with state ``(R, t)``.
    """
    M, n, _ = x2d.shape
    wsum = weights.expand(M, n).sum(-1)
    pix_scale = (x2d * x2d).sum(-1).mean(-1) + 1.0
    # Floor of the decrement: a residual of ~1e-14 of the pixel scale, i.e. float64 rounding.
    atol = 1e-28 * wsum * pix_scale
    depth_floor = 1e-9 * (t.norm(dim=-1, keepdim=True) + 1e-300)

    def evaluate(state, idx):
        data = (x3d, x2d, K, weights, depth_floor)
        if idx is not None:
            data = tuple(x if x.shape[0] == 1 else x[idx] for x in data)
        ct = cost_terms(state[0], state[1], *data[:4], hessian=True if exact_hessian else "gauss-newton",
                        min_depth=data[4])
        bad = ct.min_depth <= data[4][:, 0]
        # A pose that puts weighted points behind the camera is not a valid trial point.
        cost = torch.where(bad, torch.full_like(ct.cost, float("inf")), ct.cost)
        return cost, ct.grad, ct.hess

    def retract(state, step):
        return rvec_to_rotmat(step[:, :3]) @ state[0], state[1] + step[:, 3:]

    return levenberg_marquardt((R, t), evaluate, retract, max_iter=max_iter, rtol=1e-15,
                               atol=atol, check_every=check_every, polish_steps=polish_steps)


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
    screen_iter: int = 4,
    screen_ratio: float = 2.0,
    object_ratio: float = 10.0,
    global_search: bool = True,
) -> PnPSolution:
    """Globally optimal weighted PnP for a batch (forward only, float64 in and out).

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``.
        init_R, init_t: optional warm start ``(B, 3, 3)``, ``(B, 3)``, added as a candidate.
        num_candidates: global candidates refined per item.
        max_iter: LM iteration cap.
        check_every: LM's host check interval.
        screen_iter, screen_ratio: candidates get ``screen_iter`` LM iterations, then only
            those with cost <= ``screen_ratio`` x the item's best go on to convergence.
        object_ratio: candidates whose object-space error exceeds this multiple of the best
            valid candidate's are not refined (0: refine all distinct valid candidates).
        global_search: with a warm start, False refines only from it (fast; for training
            loops whose problems change little between steps; no global guarantee).
    Returns:
        :class:`PnPSolution`.
    """
    B, n, _ = x2d.shape
    if init_R is not None and not global_search:
        out = refine(init_R, init_t, x3d, x2d, K, weights, max_iter=max_iter, check_every=check_every)
        R, t = out.state
        # refine() gives an infinite cost to poses with weighted points behind the camera, and
        # _finish() only accepts finite costs: no separate depth check is needed.
        return _finish(R, t, out.cost, out.hess, out.converged, out.iterations)
    R0, t0, key = initial_poses(x2d, x3d, K, weights, num_candidates=num_candidates)
    # Refine only candidates worth it: distinct basins with (nearly) all points in front of
    # the camera; the best-ranked one is always refined.
    worth = key < 10.5
    if object_ratio > 0:
        # The best-ranked candidate is valid: skip those whose object-space error is far worse.
        worth = worth & ((key[:, :1] >= 1.0) | (key <= object_ratio * key[:, :1] + 1e-12))
    worth[:, 0] = True
    if init_R is not None:
        R0 = torch.cat([init_R[:, None], R0], 1)
        t0 = torch.cat([init_t[:, None], t0], 1)
        worth = torch.cat([torch.ones_like(worth[:, :1]), worth], 1)
    k = R0.shape[1]
    flat = worth.reshape(-1).nonzero()[:, 0]  # indices into the B*k candidates
    item = flat // k

    def take(x: Tensor) -> Tensor:
        return x if x.shape[0] == 1 else x[item]

    Rf, tf = R0.reshape(-1, 3, 3)[flat], t0.reshape(-1, 3)[flat]
    if screen_iter > 0 and flat.numel() > B:
        # Screening: a few iterations for every candidate, then only those within a factor of
        # the item's best cost go on (the others sit in basins that cannot win).
        pre = refine(Rf, tf, take(x3d), x2d[item], take(K), take(weights), max_iter=screen_iter,
                     check_every=check_every, polish_steps=0)
        c = torch.nan_to_num(pre.cost, nan=float("inf"))
        item_best = torch.full((B,), float("inf"), dtype=c.dtype, device=c.device)
        item_best = item_best.scatter_reduce(0, item, c, reduce="amin")
        keep = c <= screen_ratio * item_best[item] + 1e-12
        flat, item = flat[keep], item[keep]
        Rf, tf = pre.state[0][keep], pre.state[1][keep]
    out = refine(Rf, tf, take(x3d), x2d[item], take(K), take(weights), max_iter=max_iter,
                 check_every=check_every)
    Rr, tr = out.state
    inf = torch.full((B * k,), float("inf"), dtype=x2d.dtype, device=x2d.device)
    cost = inf.index_copy(0, flat, torch.nan_to_num(out.cost, nan=float("inf"))).reshape(B, k)
    # A finite cost from refine() means every weighted point is in front of the camera.
    valid = torch.isfinite(cost)
    rank = torch.where(valid, cost, inf.reshape(B, k))
    none_valid = ~valid.any(-1)
    rank = torch.where(none_valid[:, None], cost, rank)
    best = rank.argmin(-1)
    # Position of each item's winner among the refined candidates.
    pos = torch.full((B * k,), -1, dtype=torch.long, device=x2d.device)
    pos = pos.index_copy(0, flat, torch.arange(flat.numel(), device=x2d.device))
    sel = pos[torch.arange(B, device=x2d.device) * k + best]
    R, t, cost, hess = Rr[sel], tr[sel], out.cost[sel], out.hess[sel]
    ok = out.converged[sel] & ~none_valid
    return _finish(R, t, cost, hess, ok, out.iterations)


def _finish(R: Tensor, t: Tensor, cost: Tensor, hess: Tensor, ok: Tensor, iterations: int) -> PnPSolution:
    # A (near) singular Hessian means the pose is not determined by the data.
    eig = torch.linalg.eigvalsh(0.5 * (hess + hess.transpose(-1, -2)))
    well_posed = eig[:, 0] > 1e-10 * eig[:, -1].abs().clamp_min(1e-300)
    return PnPSolution(R, t, cost, hess, ok & well_posed & torch.isfinite(cost), iterations)
