"""The batched PnP forward solve: global candidates, then exact-Hessian LM on pixels."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..cost import cost_terms
from ..geometry import rvec_to_rotmat
from ..options import SolverOptions
from .init import initial_poses
from .lm import LMResult, levenberg_marquardt


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
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    options: SolverOptions | None = None,
    *,
    max_iter: int | None = None,
    check_every: int = 1,
    polish_steps: int | None = None,
    exact_hessian: bool = True,
    depth_floor: Tensor | None = None,
) -> LMResult:
    """Exact-Hessian Levenberg-Marquardt on the reprojection cost from ``(R, t)``.

    Args:
        R: ``(M, 3, 3)``; t: ``(M, 3)``; x2d: ``(M, n, 2)``; x3d: ``(M|1, n, 3)``;
        K: ``(M|1, 3, 3)``; weights: ``(M|1, n)``; all float64.
        options: :class:`~bpnp.options.SolverOptions` (LM damping, tolerances, depth floor).
        max_iter: LM iteration cap (default ``options.max_iter``).
        polish_steps: Newton polish steps (default ``options.polish_steps``).
        check_every: as in :func:`~bpnp.solvers.lm.levenberg_marquardt`.
        exact_hessian: False uses the Gauss-Newton Hessian (cheaper; for a few screening
            iterations, not for the final convergence).
        depth_floor: ``(M, 1)`` trial poses with a weighted point at a depth <= it are rejected;
            default ``options.depth_floor * |t|`` of the start (a continued run passes the floor of
            its first run, as the C solver keeps it).
    Returns:
        The :class:`~bpnp.solvers.lm.LMResult` with state ``(R, t)``.
    """
    options = SolverOptions() if options is None else options
    max_iter = options.max_iter if max_iter is None else max_iter
    polish_steps = options.polish_steps if polish_steps is None else polish_steps
    M, n, _ = x2d.shape
    wsum = weights.expand(M, n).sum(-1)
    pix_scale = (x2d * x2d).sum(-1).mean(-1) + 1.0
    # Floor of the decrement: a residual of ~1e-14 of the pixel scale, i.e. float64 rounding.
    atol = options.lm_atol * wsum * pix_scale
    if depth_floor is None:
        depth_floor = start_depth_floor(t, options)

    def evaluate(state, idx):
        data = (x2d, x3d, K, weights, depth_floor)
        if idx is not None:
            data = tuple(x if x.shape[0] == 1 else x[idx] for x in data)
        ct = cost_terms(
            state[0], state[1], *data[:4], hessian=True if exact_hessian else "gauss-newton", min_depth=data[4]
        )
        bad = ct.min_depth <= data[4][:, 0]
        # A pose that puts weighted points behind the camera is not a valid trial point.
        cost = torch.where(bad, torch.full_like(ct.cost, float("inf")), ct.cost)
        return cost, ct.grad, ct.hess

    def retract(state, step):
        return rvec_to_rotmat(step[:, :3]) @ state[0], state[1] + step[:, 3:]

    def negligible(state, step):
        # A step below float64 resolution cannot move the pose: the answer is final.
        rot = step[:, :3].abs().sum(-1)
        tra = step[:, 3:].abs().sum(-1)
        return (rot <= 1e-15) & (tra <= 1e-15 * state[1].abs().sum(-1))

    return levenberg_marquardt(
        (R, t),
        evaluate,
        retract,
        max_iter=max_iter,
        rtol=options.lm_rtol,
        atol=atol,
        lam0=options.lm_damping,
        check_every=check_every,
        polish_steps=polish_steps,
        negligible=negligible,
    )


def start_depth_floor(t: Tensor, options: SolverOptions) -> Tensor:
    """``(M, 1)`` depth floor of LM runs that start at translations ``t (M, 3)``."""
    return options.depth_floor * (t.norm(dim=-1, keepdim=True) + 1e-300)


def solve_pnp_forward(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    init_R: Tensor | None = None,
    init_t: Tensor | None = None,
    options: SolverOptions | None = None,
    check_every: int = 1,
) -> PnPSolution:
    """Globally optimal weighted PnP for a batch (forward only, float64 in and out).

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``.
        init_R: optional warm start rotations ``(B, 3, 3)``, added as a candidate (the only one
            with ``options.global_search=False``).
        init_t: its translations ``(B, 3)``.
        options: :class:`~bpnp.options.SolverOptions` (default: the defaults).
        check_every: LM's host check interval (the resolved ``options.check_every``).
    Returns:
        :class:`PnPSolution`.
    """
    o = SolverOptions() if options is None else options
    B, n, _ = x2d.shape
    if init_R is not None and not o.global_search:
        out = refine(init_R, init_t, x2d, x3d, K, weights, o, check_every=check_every)
        R, t = out.state
        # refine() gives an infinite cost to poses with weighted points behind the camera, and
        # _finish() only accepts finite costs: no separate depth check is needed.
        return _finish(R, t, out.cost, out.hess, out.converged, out.iterations, o)
    R0, t0, key = initial_poses(x2d, x3d, K, weights, o)
    # Refine only candidates worth it: distinct basins with (nearly) all points in front of the
    # camera; the best-ranked one is always refined.
    worth = key < o.candidate_cutoff
    if o.object_ratio > 0:
        # The best-ranked candidate is valid: skip those whose object-space error is far worse.
        worth = worth & ((key[:, :1] >= 1.0) | (key <= o.object_ratio * key[:, :1] + 1e-12))
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
    floor = start_depth_floor(tf, o)
    per_item = torch.zeros(B, dtype=torch.long, device=x2d.device).index_add_(0, item, torch.ones_like(item))
    if o.screen_iter > 0 and bool((per_item > 1).any()):
        # Screening: a few iterations for every candidate of items with several, then only those
        # within a factor of the item's best cost go on (the others sit in basins that cannot win).
        pre = refine(
            Rf,
            tf,
            x2d[item],
            take(x3d),
            take(K),
            take(weights),
            o,
            max_iter=o.screen_iter,
            check_every=check_every,
            polish_steps=0,
            depth_floor=floor,
        )
        c = torch.nan_to_num(pre.cost, nan=float("inf"))
        item_best = torch.full((B,), float("inf"), dtype=c.dtype, device=c.device)
        item_best = item_best.scatter_reduce(0, item, c, reduce="amin")
        several = per_item[item] > 1
        keep = ~several | (c <= o.screen_ratio * item_best[item] + 1e-12)
        # Items with one candidate skip the screening (as the C solver): they start afresh.
        Rf = torch.where(several[:, None, None], pre.state[0], Rf)[keep]
        tf = torch.where(several[:, None], pre.state[1], tf)[keep]
        flat, item, floor = flat[keep], item[keep], floor[keep]
    out = refine(Rf, tf, x2d[item], take(x3d), take(K), take(weights), o, check_every=check_every, depth_floor=floor)
    Rr, tr = out.state
    inf = torch.full((B * k,), float("inf"), dtype=x2d.dtype, device=x2d.device)
    cost = inf.index_copy(0, flat, torch.nan_to_num(out.cost, nan=float("inf"))).reshape(B, k)
    # A finite cost from refine() means every weighted point is in front of the camera; the first
    # lowest wins (the C solver's order).
    best = cost.argmin(-1)
    none_valid = ~torch.isfinite(cost).any(-1)
    # Position of each item's winner among the refined candidates; without a valid one, the
    # first refined candidate.
    pos = torch.full((B * k,), -1, dtype=torch.long, device=x2d.device)
    pos = pos.index_copy(0, flat, torch.arange(flat.numel(), device=x2d.device))
    first = torch.full((B,), flat.numel(), dtype=torch.long, device=x2d.device)
    first = first.scatter_reduce(0, item, torch.arange(flat.numel(), device=x2d.device), reduce="amin")
    sel = torch.where(none_valid, first, pos[torch.arange(B, device=x2d.device) * k + best])
    R, t, cost, hess = Rr[sel], tr[sel], out.cost[sel], out.hess[sel]
    ok = out.converged[sel] & ~none_valid
    return _finish(R, t, cost, hess, ok, out.iterations, o)


def _finish(
    R: Tensor, t: Tensor, cost: Tensor, hess: Tensor, ok: Tensor, iterations: int, options: SolverOptions
) -> PnPSolution:
    # A (near) singular Hessian means the pose is not determined by the data.
    finite = torch.isfinite(hess).flatten(1).all(-1)
    H = torch.where(finite[:, None, None], 0.5 * (hess + hess.transpose(-1, -2)), torch.zeros_like(hess))
    eig = torch.linalg.eigvalsh(H)
    well_posed = eig[:, 0] > options.well_posed_ratio * eig[:, -1].abs().clamp_min(1e-300)
    return PnPSolution(R, t, cost, hess, ok & well_posed & torch.isfinite(cost), iterations)
