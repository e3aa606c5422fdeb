"""The batched PnP forward solve: global candidates, then exact-Hessian LM on pixels."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from ..cost import cost_terms, distorted_cost_terms, point_terms
from ..geometry import rotate_by
from ..options import MAX_CANDIDATES, SolverOptions
from .candidates import initial_poses
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
    second_cost: Tensor | None = None  # (B,) cost of the best other distinct minimum (inf: none)
    trusted: Tensor | None = None  # (B,) bool, when the solver checked warm-started answers itself


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
    loss: str = "l2",
    loss_scale: Tensor | float = 1.0,
    dist: Tensor | None = None,
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
        loss, loss_scale: the robust loss of :func:`~bpnp.cost.cost_terms` (``loss_scale``
            ``(M|1, 1)`` or a float).
        dist: ``(M|1, 5)`` lens distortion (:func:`~bpnp.cost.distorted_cost_terms`), or None.
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

    scale = loss_scale if isinstance(loss_scale, Tensor) else torch.full_like(depth_floor, loss_scale)
    terms = cost_terms if dist is None else distorted_cost_terms
    hessian = True if exact_hessian else "gauss-newton"

    def evaluate(state, idx):
        data = (x2d, x3d, K, weights, depth_floor, scale) + (() if dist is None else (dist,))
        if idx is not None:
            data = tuple(_take(x, idx) for x in data)
        extra = {} if dist is None else {"dist": data[6]}
        ct = terms(*state, *data[:4], hessian=hessian, min_depth=data[4], loss=loss, loss_scale=data[5], **extra)
        # A pose that puts weighted points behind the camera is not a valid trial point.
        return ct.cost.masked_fill(ct.min_depth <= data[4][:, 0], float("inf")), ct.grad, ct.hess

    def retract(state, step):
        return rotate_by(step[:, :3], state[0]), state[1] + step[:, 3:]

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
        inf = torch.full_like(out.cost, float("inf"))
        return _finish(R, t, out.cost, out.hess, out.converged, out.iterations, inf, o)
    # As the C solver's solve_one: problems with few points get the exhaustive search at once; a
    # problem whose candidates had points behind the camera, whose residuals are heavy-tailed or
    # whose points form a needle gets it as a second pass, and the better answer wins (ties: the first).
    full = exhaustive_options(o)
    small = (weights.expand(B, n) > 0).sum(-1) <= o.small_problem

    def run(idx: Tensor, opts: SolverOptions) -> list:
        data = (x2d[idx], _take(x3d, idx), _take(K, idx), _take(weights, idx))
        starts = _pass_starts(*data, _take(init_R, idx), _take(init_t, idx), opts, check_every)
        return _pass_select(starts, *_refine_starts([starts.lm], *data, opts, check_every), opts)

    everything = torch.arange(B, device=x2d.device)
    result = run(everything, o) if not bool(small.any()) else None
    if result is None:
        result = [None] * 8
        for mask, opts in ((small, full), (~small, o)):
            idx = mask.nonzero()[:, 0]
            if idx.numel():
                result = _merge(result, run(idx, opts), idx, B)
    if o.escalate:
        heavy = heavy_tailed(result[0], result[1], x2d, x3d, K, weights, o.escalate_ratio)
        heavy = heavy | misfit(result[2], x2d, weights, o.escalate_misfit)
        heavy = heavy | needle_like(x3d, weights, o.thin_ratio).expand(B)
        again = ((result[7] | heavy) & ~small).nonzero()[:, 0]
        if again.numel():
            result = _escalate(result, again, x2d, x3d, K, weights, init_R, init_t, o, check_every)
    return _finish(*result[:7], o)


def _escalate(result: list, again: Tensor, x2d, x3d, K, weights, init_R, init_t, o: SolverOptions, check_every):
    """The second and third passes of the problems ``again`` (the exhaustive search, and LM from
    the cube's rotations), the better answer winning each time (ties: the earlier). Their LM
    starts run as one batch (each start's run is its own: the answers of separate runs, in the
    iterations of the longer one)."""
    B = x2d.shape[0]
    data = (x2d[again], _take(x3d, again), _take(K, again), _take(weights, again))
    full = exhaustive_options(o)
    second = _pass_starts(*data, _take(init_R, again), _take(init_t, again), full, check_every)
    parts = [second.lm] + ([_cube_starts(*data, o, check_every)] if o.cube_starts else [])
    outs = _refine_starts(parts, *data, o, check_every)
    second_pass = _pass_select(second, outs[0], full)
    better = _replaces(result[2][again], result[4][again], second_pass)
    result = _merge(result, second_pass, again[better], B, rows=better.nonzero()[:, 0])
    if not o.cube_starts:
        return result
    third = _cube_select(parts[1], outs[1], again.numel())
    R_old, t_old, cost_old, converged_old = (result[k][again] for k in (0, 1, 2, 4))
    better = _replaces(cost_old, converged_old, third)
    # The answer it replaces is another minimum, when its pose differs.
    dR = (third[0] - R_old).flatten(1).norm(dim=-1)
    dt = (third[1] - t_old).norm(dim=-1)
    distinct = (dR > o.dedupe) | (dt > o.dedupe * third[1].norm(dim=-1))
    old_cost = torch.where(distinct, cost_old, torch.full_like(dR, float("inf")))
    third[6] = torch.minimum(result[6][again], old_cost)
    return _merge(result, third, again[better], B, rows=better.nonzero()[:, 0])


class _Starts(NamedTuple):
    """LM starts of one pass: ``R (M, 3, 3)``, ``t (M, 3)``, their depth floors ``(M, 1)`` and the
    problem of each ``item (M,)``."""

    R: Tensor
    t: Tensor
    floor: Tensor
    item: Tensor


def _refine_starts(parts: list[_Starts], x2d, x3d, K, weights, o: SolverOptions, check_every: int) -> list[LMResult]:
    """LM from the starts of one or more passes over the same problems, as one batch; the
    :class:`~bpnp.solvers.lm.LMResult` of each part (``iterations``: the batch's)."""
    item = torch.cat([part.item for part in parts])
    R, t, floor = (torch.cat([getattr(part, f) for part in parts]) for f in ("R", "t", "floor"))
    rows = (x2d[item], _take(x3d, item), _take(K, item), _take(weights, item))
    out = refine(R, t, *rows, o, check_every=check_every, depth_floor=floor)
    if len(parts) == 1:
        return [out]
    results, start = [], 0
    for part in parts:
        rows = slice(start, start + part.item.numel())
        start = rows.stop
        fields = (out.cost, out.grad, out.hess, out.converged)
        results.append(LMResult(tuple(s[rows] for s in out.state), *(f[rows] for f in fields), out.iterations))
    return results


def cube_rotations(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(24, 3, 3)`` the rotations of the cube (signed permutation matrices of determinant +1),
    in the order the C solver builds them."""
    from .candidates import _rotation_group

    return _rotation_group(dtype, device, 24)


def _cube_starts(x2d, x3d, K, weights, o: SolverOptions, check_every: int) -> _Starts:
    """The third pass's LM starts: the 24 cube rotations, the object on the mean ray of its pixels
    at the depth that matches their spread (moved in front of the camera where needed),
    screened."""
    from .candidates import normalised_rays

    B, n, _ = x2d.shape
    w = weights.expand(B, n)
    rays = normalised_rays(x2d, K)
    wsum = w.sum(-1, keepdim=True)
    mean = (w[..., None] * rays).sum(1) / wsum
    spread = ((w * (rays - mean[:, None]).pow(2).sum(-1)).sum(-1, keepdim=True) / wsum).sqrt()
    t_guess = mean / spread.clamp_min(1e-12)
    G = cube_rotations(x2d.dtype, x2d.device)
    S = G.shape[0]
    R0 = G.expand(B, S, 3, 3)
    t0, _ = _repair_depth(R0, t_guess[:, None].expand(B, S, 3), x3d, weights, o)
    t0 = t0.reshape(-1, 3)
    starts = _Starts(
        R0.reshape(-1, 3, 3), t0, start_depth_floor(t0, o), torch.arange(B, device=x2d.device).repeat_interleave(S)
    )
    if o.screen_iter > 0:
        starts = _screen(starts, (x2d, x3d, K, weights), o, check_every)[0]
    return starts


def _screen(
    starts: _Starts, data: tuple, o: SolverOptions, check_every: int, several: Tensor | None = None
) -> tuple[_Starts, Tensor]:
    """Screening: ``o.screen_iter`` LM iterations from every start, then only the starts within
    ``o.screen_ratio`` of their problem's best cost go on (the others sit in basins that cannot
    win), from where the iterations left them.

    Args:
        starts: ``M`` starts of the problems ``data = (x2d, x3d, K, weights)`` (``B`` of them).
        several: ``(M,)`` bool, the starts of problems with several; the others are not screened
            and go on from where they were (they start afresh, as the C solver's). None: all.
    Returns:
        The starts that go on and which they are, ``(M,)`` bool.
    """
    x2d, x3d, K, weights = data
    item = starts.item
    pre = refine(
        starts.R, starts.t, x2d[item], _take(x3d, item), _take(K, item), _take(weights, item), o,
        max_iter=o.screen_iter, check_every=check_every, polish_steps=0, depth_floor=starts.floor,
    )  # fmt: skip
    c = torch.nan_to_num(pre.cost, nan=float("inf"))
    item_best = torch.full((x2d.shape[0],), float("inf"), dtype=c.dtype, device=c.device)
    item_best = item_best.scatter_reduce(0, item, c, reduce="amin")
    keep = c <= o.screen_ratio * item_best[item] + 1e-12
    R, t = pre.state
    if several is not None:
        keep = ~several | keep
        R = torch.where(several[:, None, None], R, starts.R)
        t = torch.where(several[:, None], t, starts.t)
    return _Starts(R[keep], t[keep], starts.floor[keep], item[keep]), keep


def _take(x: Tensor | None, rows: Tensor) -> Tensor | None:
    """The ``rows`` of a per-problem input; an input shared by the batch (leading 1) or None as is."""
    return x if x is None or x.shape[0] == 1 else x[rows]


def _winner(cost: Tensor, converged: Tensor, item: Tensor, B: int) -> Tensor:
    """Each problem's winning answer, as the C solver's ``winner()``: the lowest cost, except that
    the costs within rounding of it (1e-12 relative) tie and the first converged one of those wins
    (else the first lowest). A run cut off at ``max_iter`` can end an ulp below the converged runs
    at the same minimum; its flag must not become the answer's.

    Args:
        cost: ``(N,)`` the answers' costs (no NaN); converged: ``(N,)``; item: ``(N,)`` the problem
            of each answer, in ``[0, B)``.
    Returns:
        ``(B,)`` indices into the N answers (N for a problem without one).
    """
    N, device = cost.numel(), cost.device
    ar = torch.arange(N, device=device)
    low = torch.full((B,), float("inf"), dtype=cost.dtype, device=device).scatter_reduce(0, item, cost, "amin")[item]
    tie = converged & torch.isfinite(low) & ((cost - low).abs() <= 1e-12 * low.abs())
    none = torch.full((B,), N, dtype=torch.long, device=device)
    first = none.scatter_reduce(0, item, torch.where(cost == low, ar, N), "amin")
    first_tie = none.scatter_reduce(0, item, torch.where(tie, ar, N), "amin")
    return torch.where(first_tie < N, first_tie, first)


def _replaces(old_cost: Tensor, old_converged: Tensor, new: list) -> Tensor:
    """``(M,)`` whether each answer of ``new`` (a ``_pass_select`` list of M problems) replaces the
    old answer with ``old_cost`` and ``old_converged`` ``(M,)``: ``_winner`` of the two, the old
    one first."""
    M = new[2].shape[0]
    both = torch.arange(M, device=new[2].device).repeat(2)
    cost = torch.nan_to_num(torch.cat([old_cost, new[2]]), nan=float("inf"))
    return _winner(cost, torch.cat([old_converged, new[4]]), both, M) >= M


def _cube_select(starts: _Starts, out: LMResult, B: int) -> list:
    """The third pass's answer (``_pass_select``'s list) from its LM: each problem's best start."""
    item = starts.item
    device = item.device
    cost = torch.nan_to_num(out.cost, nan=float("inf"))
    sel = _winner(cost, out.converged, item, B)
    # The screening keeps each problem's best start, so every problem has a winner (sel < N).
    ok = out.converged[sel] & torch.isfinite(cost[sel])
    inf = torch.full((B,), float("inf"), dtype=cost.dtype, device=device)
    # (no depth repair: that flag decides the escalation, which this pass ends)
    repaired = torch.zeros_like(ok)
    return [out.state[0][sel], out.state[1][sel], cost[sel], out.hess[sel], ok, out.iterations, inf, repaired]


def refine_robust(
    R: Tensor,
    t: Tensor,
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    loss: str,
    loss_scale: Tensor,
    options: SolverOptions,
    check_every: int = 1,
    dist: Tensor | None = None,
) -> PnPSolution:
    """Minimise the robust cost ``sum_i w_i rho(s_i)`` from ``(R, t)`` (e.g. the least-squares
    answer) by Levenberg-Marquardt with its exact Hessian (``rho''`` term included); with
    ``dist``, the cost in distorted pixels (:func:`~bpnp.cost.distorted_cost_terms`).

    Args:
        R: ``(B, 3, 3)``; t: ``(B, 3)``; x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``;
        weights: ``(B|1, n)``; loss: one of :data:`~bpnp.cost.LOSSES`; loss_scale: ``(B|1, 1)``;
        options, check_every: as in :func:`refine`.
    Returns:
        :class:`PnPSolution` (``converged`` also requires a positive definite robust Hessian).
    """
    out = refine(
        R, t, x2d, x3d, K, weights, options, check_every=check_every, loss=loss, loss_scale=loss_scale, dist=dist
    )
    R, t = out.state
    inf = torch.full_like(out.cost, float("inf"))
    return _finish(R, t, out.cost, out.hess, out.converged, out.iterations, inf, options)


def misfit(cost: Tensor, x2d: Tensor, weights: Tensor, ratio: float) -> Tensor:
    """``(B,)``: the fit explains little of the image: the RMS residual (``cost`` ``(B,)``) exceeds
    ``ratio`` times the RMS spread of the pixels ``(B, n, 2)`` about their weighted mean."""
    w = weights.expand(x2d.shape[:2])
    mean = (w[..., None] * x2d).sum(1) / w.sum(-1, keepdim=True)
    spread = (w * (x2d - mean[:, None]).pow(2).sum(-1)).sum(-1)
    return torch.isfinite(cost) & (cost > ratio * ratio * spread)


def heavy_tailed(R: Tensor, t: Tensor, x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor, ratio: float) -> Tensor:
    """``(B,)``: the largest squared residual at ``(R, t)`` exceeds ``ratio`` times the
    median one (points of positive weight; median: the ``(m-1)//2``-th smallest), beyond 1e-16."""
    pt = point_terms(R, t, x2d, x3d, K)
    B = x2d.shape[0]
    w = weights.expand(B, -1)
    pos = w > 0
    r2 = pt.ru * pt.ru + pt.rv * pt.rv  # unweighted: weights need not be inverse variances
    m = pos.sum(-1)
    ordered = torch.where(pos, r2, torch.full_like(r2, float("inf"))).sort(-1).values
    med = ordered.gather(-1, ((m - 1).clamp_min(0) // 2)[:, None])[:, 0]
    top = torch.where(pos, r2, torch.zeros_like(r2)).amax(-1)
    return (m > 0) & (top > ratio * med + 1e-16)


def _merge(result: list, part: list, idx: Tensor, B: int, rows: Tensor | None = None) -> list:
    """Write the rows ``rows`` (default all) of a pass over a subset into ``result`` at ``idx``."""
    out = []
    for k, (old, new) in enumerate(zip(result, part)):
        if k == 5:  # iterations: the most any problem needed
            out.append(new if old is None else max(old, new))
            continue
        new = new if rows is None else new[rows]
        if old is None:
            old = new.new_zeros((B, *new.shape[1:]))
        out.append(old.index_copy(0, idx, new))
    return out


def needle_like(x3d: Tensor, weights: Tensor, thin_ratio: float) -> Tensor:
    """``(B|1,)`` whether each weighted point set is a needle: thin in two directions (its two
    smaller spreads below ``thin_ratio^2`` of the largest, as variances). The rotation about its
    axis is barely seen and the object-space minima crowd: the search missed the best minimum in
    0.3-0.8% of such problems (n = 7-30), so they are escalated (the exhaustive pass and the cube
    starts; the cube starts found the minima the exhaustive pass alone missed).

    Args:
        x3d: ``(B|1, n, 3)``; weights: ``(B|1, n)``.
    """
    B = max(x3d.shape[0], weights.shape[0])
    w = torch.where(weights > 0, weights, torch.zeros_like(weights)).expand(B, -1)
    wsum = w.sum(-1)
    centre = (w[..., None] * x3d).sum(1) / wsum.clamp_min(1e-300)[:, None]
    d = x3d - centre[:, None]
    cov = (w[..., None, None] * d[..., :, None] * d[..., None, :]).sum(1)
    finite = torch.isfinite(cov).flatten(1).all(-1) & (wsum > 0)
    cov = torch.where(finite[:, None, None], cov, torch.eye(3, dtype=cov.dtype, device=cov.device))
    spread = torch.linalg.eigvalsh(cov)  # ascending
    return finite & (spread[:, 1] < thin_ratio**2 * spread[:, 2])


def exhaustive_options(options: SolverOptions) -> SolverOptions:
    """``options`` with every shortcut of the global search off (the small-problem search)."""
    return dataclasses.replace(options, num_candidates=MAX_CANDIDATES)._tuned(
        object_ratio=0.0, screen_iter=0, num_eigvecs=9, solid_eigvecs=9, thin_ratio=2.0
    )


def object_size(x3d: Tensor, weights: Tensor) -> Tensor:
    """``(B, 1)`` weighted RMS distance of the points ``(B|1, n, 3)`` from their weighted centre."""
    B = max(x3d.shape[0], weights.shape[0])
    w = weights.expand(B, -1)
    wsum = w.sum(-1, keepdim=True)
    centre = (w[..., None] * x3d).sum(1) / wsum
    return ((w * (x3d - centre[:, None]).pow(2).sum(-1)).sum(-1, keepdim=True) / wsum).sqrt()


def _repair_depth(R0: Tensor, t0: Tensor, x3d: Tensor, weights: Tensor, o: SolverOptions) -> tuple[Tensor, Tensor]:
    """Depth repair (as the C solver's repair_depth): a candidate ``(R0 (B,k,3,3), t0 (B,k,3))``
    with a weighted point behind the camera moves along the optical axis until its nearest point
    is ``depth_margin`` object sizes in front. Returns the translations and ``(B, k)`` which moved."""
    B, k = t0.shape[:2]
    n = x3d.shape[-2]
    w = weights.expand(B, n)
    depth = (R0[..., 2:3, :] @ x3d.expand(B, n, 3)[:, None].transpose(-1, -2))[..., 0, :] + t0[..., 2:3]  # BxkxN
    nearest = torch.where(w[:, None] > 0, depth, torch.full_like(depth, float("inf"))).amin(-1)
    margin = o.depth_margin * object_size(x3d, weights)  # Bx1
    t0 = t0.clone()
    t0[..., 2] = torch.where(nearest <= 0, t0[..., 2] + (margin - nearest), t0[..., 2])
    return t0, nearest <= 0


class _PassStarts(NamedTuple):
    """A global search's LM starts (screened) and what its selection needs: the index of each
    start among the ``B * k`` candidate slots, ``k``, ``B`` and which problems needed the depth
    repair."""

    lm: _Starts
    flat: Tensor
    k: int
    B: int
    repaired: Tensor


def _pass_starts(x2d, x3d, K, weights, init_R, init_t, o: SolverOptions, check_every: int) -> _PassStarts:
    """One global search up to its final LM: candidates, depth repair, screening."""
    B, n, _ = x2d.shape
    R0, t0, key = initial_poses(x2d, x3d, K, weights, o)
    t0, behind = _repair_depth(R0, t0, x3d, weights, o)
    # Refine only candidates worth it: distinct basins with (nearly) all points in front of the
    # camera; the best-ranked one is always refined.
    worth = key < o.candidate_cutoff
    if o.object_ratio > 0:
        # The best-ranked candidate is valid: skip those whose object-space error is far worse.
        worth = worth & ((key[:, :1] >= 1.0) | (key <= o.object_ratio * key[:, :1] + 1e-12))
    worth[:, 0] = True
    # The C solver repairs the candidates it refines: those worth it.
    repaired = (behind & worth).any(-1)
    if init_R is not None:
        R0 = torch.cat([init_R[:, None], R0], 1)
        t0 = torch.cat([init_t[:, None], t0], 1)
        worth = torch.cat([torch.ones_like(worth[:, :1]), worth], 1)
    k = R0.shape[1]
    flat = worth.reshape(-1).nonzero()[:, 0]  # indices into the B*k candidates
    item = flat // k
    Rf, tf = R0.reshape(-1, 3, 3)[flat], t0.reshape(-1, 3)[flat]
    starts = _Starts(Rf, tf, start_depth_floor(tf, o), item)
    per_item = torch.zeros(B, dtype=torch.long, device=x2d.device).index_add_(0, item, torch.ones_like(item))
    if o.screen_iter > 0 and bool((per_item > 1).any()):
        starts, keep = _screen(starts, (x2d, x3d, K, weights), o, check_every, several=per_item[item] > 1)
        flat = flat[keep]
    return _PassStarts(starts, flat, k, B, repaired)


def _pass_select(starts: _PassStarts, out: LMResult, o: SolverOptions) -> list:
    """A global search's answer from its final LM: ``[R, t, cost, hess, converged, iterations,
    second_cost, repaired]`` before the well-posedness test."""
    flat, item, B = starts.flat, starts.lm.item, starts.B
    device = flat.device
    Rr, tr = out.state
    # A finite cost from refine() means every weighted point is in front of the camera; without
    # one, the first lowest is the first refined candidate (all costs inf).
    cost = torch.nan_to_num(out.cost, nan=float("inf"))
    sel = _winner(cost, out.converged, item, B)
    none_valid = ~torch.isfinite(cost[sel])
    ar = torch.arange(flat.numel(), device=device)
    R, t, cost_sel, hess = Rr[sel], tr[sel], out.cost[sel], out.hess[sel]
    # The best other minimum: a refined valid candidate whose pose differs from the winner's.
    dR = (Rr - R[item]).flatten(1).norm(dim=-1)
    dt = (tr - t[item]).norm(dim=-1)
    distinct = (dR > o.dedupe) | (dt > o.dedupe * t[item].norm(dim=-1))
    other = torch.where(distinct & (ar != sel[item]), cost, torch.inf)
    second = torch.full((B,), float("inf"), dtype=cost.dtype, device=device).scatter_reduce(0, item, other, "amin")
    ok = out.converged[sel] & ~none_valid
    return [R, t, cost_sel, hess, ok, out.iterations, second, starts.repaired]


def _finish(
    R: Tensor,
    t: Tensor,
    cost: Tensor,
    hess: Tensor,
    ok: Tensor,
    iterations: int,
    second_cost: Tensor | None,
    options: SolverOptions,
) -> PnPSolution:
    # A (near) singular Hessian means the pose is not determined by the data.
    finite = torch.isfinite(hess).flatten(1).all(-1)
    H = torch.where(finite[:, None, None], 0.5 * (hess + hess.transpose(-1, -2)), torch.zeros_like(hess))
    eig = torch.linalg.eigvalsh(H)
    well_posed = eig[:, 0] > options.well_posed_ratio * eig[:, -1].abs().clamp_min(1e-300)
    return PnPSolution(R, t, cost, hess, ok & well_posed & torch.isfinite(cost), iterations, None, second_cost)
