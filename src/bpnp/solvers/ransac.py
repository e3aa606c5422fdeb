"""Batched RANSAC for PnP: P3P hypotheses and MSAC scores for the whole batch at once.

Every round draws ``samples_per_round`` minimal samples (3 points of positive weight) for each
problem still running, from a counter-based stream keyed by the seed and a hash of the problem's
own image points (so an answer does not depend on the rest of the batch); problems with at most
:data:`ENUMERATE_MAX` such points try every triple instead. P3P for all samples in one set of
tensor ops (Grunert's formulation: a quartic per sample, solved in closed form, up to 4 poses),
every pose scored against every point of its problem with the truncated quadratic of MSAC, and
the :data:`LO_CANDIDATES` best hypotheses seen are kept. A problem stops once an all-inlier sample
has been drawn with the requested confidence. Then local optimisation: each kept hypothesis (one
per structure) is refitted on its points within :data:`LO_WIDEN` thresholds and scored again, and
the best is refined while its score improves. A consensus counts when chance does not explain it
(:func:`consensus_is_real`). No Python loop runs over the batch, only over rounds.

All inputs are the solver's normalised, float64 problems (:mod:`bpnp.normalise`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ..options import RansacOptions
from .candidates import normalised_rays

__all__ = ["RansacResult", "solve_quartic", "p3p", "ransac", "item_keys", "uniform", "mix64"]

#: ``(x2d, x3d, K, weights, R, t) -> (R, t)``: least squares from a warm start (the layer's solver).
LocalSolve = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], "tuple[Tensor, Tensor]"]

#: The smallest consensus that determines a pose: a P3P sample and one point that checks it.
MIN_CONSENSUS = 4
#: Problems with at most this many points of positive weight try every triple (220 at 12).
ENUMERATE_MAX = 12
#: The chance (a union bound over the hypotheses tried) above which a consensus counts as luck.
CHANCE_LEVEL = 0.01
#: The band of a hypothesis' first refinement, in thresholds.
LO_WIDEN = 1.5
#: A hypothesis whose points lie this much within a better one's is not refined again.
REPEAT_SHARE = 0.9
#: The best hypotheses seen that are refined on their inliers and scored again: a hypothesis of
#: the right structure from noisy points can score worse than one of a competing structure.
LO_CANDIDATES = 8


class RansacResult(NamedTuple):
    R: Tensor  # (B, 3, 3) pose after local optimisation
    t: Tensor  # (B, 3)
    inliers: Tensor  # (B, n) bool, points of positive weight within the threshold at that pose
    score: Tensor  # (B,) MSAC score of the pose
    samples: Tensor  # (B,) minimal samples drawn (or triples tried)
    enough: Tensor  # (B,) bool: a consensus of at least MIN_CONSENSUS that chance does not explain
    support: Tensor  # (B, n) bool, the points to solve on: the inliers, or the MIN_CONSENSUS nearest where fewer


def solve_quartic(coeffs: Tensor) -> Tensor:
    """Complex roots of ``a4 x^4 + a3 x^3 + a2 x^2 + a1 x + a0`` by Ferrari's method.

    Args:
        coeffs: ``(M, 5)`` real, ``[a0, a1, a2, a3, a4]`` with ``a4 != 0``.
    Returns:
        ``(M, 4)`` complex roots (NaN where ``a4 = 0``).
    """
    c = coeffs.to(torch.complex128)
    a4 = c[:, 4]
    b3, b2, b1, b0 = c[:, 3] / a4, c[:, 2] / a4, c[:, 1] / a4, c[:, 0] / a4
    # Depressed quartic y^4 + p y^2 + q y + r, x = y - b3/4.
    p = b2 - 3.0 * b3 * b3 / 8.0
    q = b1 - b3 * b2 / 2.0 + b3**3 / 8.0
    r = b0 - b3 * b1 / 4.0 + b3 * b3 * b2 / 16.0 - 3.0 * b3**4 / 256.0
    # Resolvent cubic m^3 + p m^2 + (p^2/4 - r) m - q^2/8 = 0 (Cardano); its root of largest
    # modulus keeps sqrt(2m) away from zero.
    a2, a1, a0 = p, p * p / 4.0 - r, -q * q / 8.0
    P = a1 - a2 * a2 / 3.0
    Q = 2.0 * a2**3 / 27.0 - a2 * a1 / 3.0 + a0
    disc = torch.sqrt(Q * Q / 4.0 + P**3 / 27.0)
    u3 = torch.where((-Q / 2.0 + disc).abs() >= (-Q / 2.0 - disc).abs(), -Q / 2.0 + disc, -Q / 2.0 - disc)
    u = u3 ** (1.0 / 3.0)
    omega = torch.tensor(complex(-0.5, math.sqrt(3.0) / 2.0), dtype=torch.complex128, device=coeffs.device)
    best = None
    for k in range(3):
        uk = u * omega**k
        safe = torch.where(uk.abs() > 0, uk, torch.ones_like(uk))
        m = torch.where(uk.abs() > 0, uk - P / (3.0 * safe), torch.zeros_like(uk)) - a2 / 3.0
        best = m if best is None else torch.where(m.abs() > best.abs(), m, best)
    s = torch.sqrt(2.0 * best)
    s_safe = torch.where(s.abs() > 0, s, torch.ones_like(s))
    h = torch.where(s.abs() > 0, q / (2.0 * s_safe), torch.zeros_like(s))
    roots = []
    for sign in (1.0, -1.0):
        # y^2 - sign s y + (p/2 + m + sign h) = 0
        bq = -sign * s
        cq = p / 2.0 + best + sign * h
        d = torch.sqrt(bq * bq - 4.0 * cq)
        roots += [(-bq + d) / 2.0, (-bq - d) / 2.0]
    return torch.stack(roots, -1) - (b3 / 4.0)[:, None]


def _real_roots(coeffs: Tensor, newton: int = 3) -> tuple[Tensor, Tensor]:
    """``(M, 4)`` real parts of the roots, polished by Newton steps on the real quartic, and a
    mask of the (nearly) real ones."""
    z = solve_quartic(coeffs)
    x = z.real
    real = z.imag.abs() <= 1e-4 * (1.0 + x.abs())
    a = coeffs[:, None, :]
    for _ in range(newton):
        f = (((a[..., 4] * x + a[..., 3]) * x + a[..., 2]) * x + a[..., 1]) * x + a[..., 0]
        df = ((4.0 * a[..., 4] * x + 3.0 * a[..., 3]) * x + 2.0 * a[..., 2]) * x + a[..., 1]
        step = f / torch.where(df.abs() > 0, df, torch.ones_like(df))
        x = torch.where(df.abs() > 0, x - step, x)
    return x, real & torch.isfinite(x)


def _frame(p0: Tensor, p1: Tensor, p2: Tensor) -> Tensor:
    """``(..., 3, 3)`` orthonormal frame (columns) of a point triple: edge, normal x edge, normal."""
    e0 = p1 - p0
    e0 = e0 / e0.norm(dim=-1, keepdim=True)
    nrm = torch.linalg.cross(e0, p2 - p0, dim=-1)
    nrm = nrm / nrm.norm(dim=-1, keepdim=True)
    return torch.stack([e0, torch.linalg.cross(nrm, e0, dim=-1), nrm], -1)


def p3p(bearings: Tensor, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Poses that map three object points onto three viewing rays (up to 4 per sample).

    Grunert's formulation: with depths ``l_i`` along unit bearings ``f_i`` and ``l_2 = u l_1``,
    ``l_3 = v l_1``, the three distance constraints leave a quartic in ``v`` and ``u`` rational
    in ``v``; the camera-frame points ``l_i f_i`` are then aligned with the object points.

    Args:
        bearings: ``(M, 3, 3)`` unit viewing rays (rows); points: ``(M, 3, 3)`` object points (rows).
    Returns:
        ``R (M, 4, 3, 3)``, ``t (M, 4, 3)`` and ``valid (M, 4)`` (real, positive depths, finite).
    """
    f1, f2, f3 = bearings.unbind(-2)
    X1, X2, X3 = points.unbind(-2)
    c12 = (f1 * f2).sum(-1)
    c13 = (f1 * f3).sum(-1)
    c23 = (f2 * f3).sum(-1)
    D12 = (X1 - X2).pow(2).sum(-1)
    D13 = (X1 - X3).pow(2).sum(-1)
    D23 = (X2 - X3).pow(2).sum(-1)
    # Coefficients of the quartic in v (derived by eliminating u and l_1 from the constraints).
    a0 = D12**2 - 2 * D12 * D13 - 2 * D12 * D23 + D13**2 - 4 * D13 * D23 * c12**2 + 2 * D13 * D23 + D23**2
    a1 = 4 * (
        -(D12**2) * c13
        + D12 * D13 * c12 * c23
        + D12 * D13 * c13
        + 2 * D12 * D23 * c13
        - D13**2 * c12 * c23
        + 2 * D13 * D23 * c12**2 * c13
        + D13 * D23 * c12 * c23
        - D13 * D23 * c13
        - D23**2 * c13
    )
    a2 = 2 * (
        2 * D12**2 * c13**2
        + D12**2
        - 4 * D12 * D13 * c12 * c13 * c23
        - 2 * D12 * D13 * c23**2
        - 4 * D12 * D23 * c13**2
        - 2 * D12 * D23
        + 2 * D13**2 * c12**2
        + 2 * D13**2 * c23**2
        - D13**2
        - 2 * D13 * D23 * c12**2
        - 4 * D13 * D23 * c12 * c13 * c23
        + 2 * D23**2 * c13**2
        + D23**2
    )
    a3 = 4 * (
        -(D12**2) * c13
        + D12 * D13 * c12 * c23
        + 2 * D12 * D13 * c13 * c23**2
        - D12 * D13 * c13
        + 2 * D12 * D23 * c13
        - D13**2 * c12 * c23
        + D13 * D23 * c12 * c23
        + D13 * D23 * c13
        - D23**2 * c13
    )
    a4 = D12**2 - 4 * D12 * D13 * c23**2 + 2 * D12 * D13 - 2 * D12 * D23 + D13**2 - 2 * D13 * D23 + D23**2
    v, real = _real_roots(torch.stack([a0, a1, a2, a3, a4], -1))
    c12_, c13_, c23_ = c12[:, None], c13[:, None], c23[:, None]
    D12_, D13_, D23_ = D12[:, None], D13[:, None], D23[:, None]
    num = (D12_ + D13_ - D23_) * v * v + 2.0 * (D23_ - D12_) * c13_ * v + D12_ - D13_ - D23_
    u = num / (2.0 * D13_ * (c23_ * v - c12_))
    den = 1.0 + u * u - 2.0 * u * c12_
    l1 = (D12_ / den).sqrt()
    valid = real & (v > 0) & (u > 0) & (den > 0) & torch.isfinite(u) & torch.isfinite(l1)
    cam = torch.stack(
        [l1[..., None] * f1[:, None], (u * l1)[..., None] * f2[:, None], (v * l1)[..., None] * f3[:, None]], -2
    )
    Fc = _frame(cam[..., 0, :], cam[..., 1, :], cam[..., 2, :])  # Mx4x3x3
    Fw = _frame(X1, X2, X3)[:, None]  # Mx1x3x3
    R = Fc @ Fw.transpose(-1, -2)
    t = cam[..., 0, :] - (R @ X1[:, None, :, None])[..., 0]
    valid = valid & torch.isfinite(R).flatten(-2).all(-1) & torch.isfinite(t).all(-1)
    return R, t, valid


def _squared_errors(R: Tensor, t: Tensor, x2d: Tensor, x3d: Tensor, K: Tensor) -> Tensor:
    """``(B, H, m)`` squared reprojection errors of ``H`` poses per problem (inf behind the camera).

    Args:
        R: ``(B, H, 3, 3)``; t: ``(B, H, 3)``; x2d: ``(B, m, 2)``; x3d: ``(B, m, 3)``; K: ``(B, 3, 3)``.
    """
    # Elementwise over (B, H, m): batched 3x3 matmuls of this shape are several times slower.
    X = [x3d[:, None, :, k] for k in range(3)]
    r = R[..., None]
    z = r[:, :, 2, 0] * X[0] + r[:, :, 2, 1] * X[1] + r[:, :, 2, 2] * X[2] + t[:, :, 2:3]
    x = r[:, :, 0, 0] * X[0] + r[:, :, 0, 1] * X[1] + r[:, :, 0, 2] * X[2] + t[:, :, 0:1]
    y = r[:, :, 1, 0] * X[0] + r[:, :, 1, 1] * X[1] + r[:, :, 1, 2] * X[2] + t[:, :, 1:2]
    iz = 1.0 / z
    k = (K / K[:, 2:3, 2:3])[:, None, :, :, None]  # Bx1x3x3x1
    a, b = x * iz, y * iz
    du = k[:, :, 0, 0] * a + k[:, :, 0, 1] * b + (k[:, :, 0, 2] - x2d[:, None, :, 0])
    dv = k[:, :, 1, 1] * b + (k[:, :, 1, 2] - x2d[:, None, :, 1])
    e = du * du + dv * dv
    return torch.where((z > 0) & torch.isfinite(e), e, torch.full_like(e, float("inf")))


def _msac_terms(e: Tensor, weights: Tensor, tau2: Tensor) -> tuple[Tensor, Tensor]:
    """MSAC scores ``sum_i w_i min(e_i, tau^2)`` ``(B, H)`` (lower is better) and the counts of
    points of positive weight within the threshold, from squared errors ``e (B, H, n)``,
    ``weights (B, n)`` and ``tau2 (B,)``."""
    within = e < tau2[:, None, None]
    score = (weights[:, None] * torch.where(within, e, tau2[:, None, None].expand_as(e))).sum(-1)
    return score, (within & (weights[:, None] > 0)).sum(-1)


def msac_score(
    R: Tensor, t: Tensor, x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor, tau2: Tensor
) -> tuple[Tensor, Tensor]:
    """MSAC scores and inlier counts of ``H`` poses per problem, in tensor ops (any device; the C
    library's ``bpnp_ransac_round`` scores the same way).

    Args:
        R: ``(B, H, 3, 3)``; t: ``(B, H, 3)``; x2d: ``(B, n, 2)``; x3d: ``(B, n, 3)``; K: ``(B, 3, 3)``;
        weights: ``(B, n)``; tau2: ``(B,)``.
    Returns:
        ``score (B, H)`` and ``count (B, H)``.
    """
    return _msac_terms(_squared_errors(R, t, x2d, x3d, K), weights, tau2)


def _needed(inlier_ratio: Tensor, confidence: float) -> Tensor:
    """``(B,)`` samples needed for an all-inlier 3-point sample with the given confidence."""
    good = inlier_ratio.clamp(0.0, 1.0) ** 3
    miss = torch.log1p(-good.clamp(max=1.0 - 1e-12))
    need = math.log(1.0 - confidence) / torch.where(miss < 0, miss, torch.full_like(miss, -1e-300))
    return need.clamp(max=1e12)


def ransac(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    threshold: Tensor,
    options: RansacOptions,
    local_solve: LocalSolve,
    native: bool = False,
    keys: Tensor | None = None,
) -> RansacResult:
    """RANSAC (P3P + MSAC + local optimisation) for a batch of normalised problems.

    Every problem draws its own samples: from a counter-based stream keyed by ``keys`` (a hash of
    its own data and the seed, :func:`item_keys`), so that its answer is the same alone, in any
    batch and at any position. Problems with at most :data:`ENUMERATE_MAX` points of positive
    weight try every triple instead. The :data:`LO_CANDIDATES` best hypotheses seen are each
    refined on their inliers and scored again; the best of them (never worse than a hypothesis
    seen) is refined further while its score improves.

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``; weights: ``(B|1, n)`` (points
            of zero weight are never sampled and never count); threshold: ``(B|1, 1)`` inlier
            threshold in the units of x2d; options: :class:`~bpnp.options.RansacOptions`;
        local_solve: least squares from a warm start (:data:`LocalSolve`).
        native: score the hypotheses in the compiled C library (CPU tensors).
        keys: ``(B,)`` int64 stream keys (default: :func:`item_keys` of ``x2d``).
    Returns:
        :class:`RansacResult`.
    """
    B, n, _ = x2d.shape
    x3d_b, K_b, w = x3d.expand(B, n, 3), K.expand(B, 3, 3), weights.expand(B, n)
    pos = w > 0
    m = pos.sum(-1)
    tau2 = (threshold * threshold).expand(B, 1)
    if keys is None:
        keys = item_keys(x2d, options.seed)
    rays = normalised_rays(x2d, K_b)
    rays = rays / rays.norm(dim=-1, keepdim=True)
    data = _Data(x2d, x3d, K, weights, x3d_b, K_b, w, rays, tau2, native)
    pool = _sample(data, pos, m, keys, options)
    R, t, score, inl, e = _refine_candidates(data, pool, pos, local_solve)
    R, t, score, inl, e = _local_optimisation(data, R, t, score, inl, e, pos, local_solve, options.local_iterations)
    enough = consensus_is_real(inl, pos, x2d, tau2, pool.drawn)
    support = torch.where(enough[:, None], inl, inl | _nearest(e, pos, MIN_CONSENSUS))
    return RansacResult(R, t, inl, score, pool.drawn, enough, support)


class _Data(NamedTuple):
    x2d: Tensor
    x3d: Tensor  # (B|1, n, 3) as given (the C round reads it unexpanded)
    K: Tensor
    weights: Tensor
    x3d_b: Tensor  # expanded to (B, ...)
    K_b: Tensor
    w: Tensor
    rays: Tensor
    tau2: Tensor  # (B, 1)
    native: bool


class _Pool(NamedTuple):
    """The best hypotheses seen per problem, best first."""

    R: Tensor  # (B, L, 3, 3)
    t: Tensor  # (B, L, 3)
    score: Tensor  # (B, L), inf where empty
    count: Tensor  # (B, L)
    drawn: Tensor  # (B,) minimal samples drawn


def _sample(data: _Data, pos: Tensor, m: Tensor, keys: Tensor, options: RansacOptions) -> _Pool:
    """The sampling stage: rounds of minimal samples until each problem's adaptive count is met."""
    B = pos.shape[0]
    dt, dev = data.x2d.dtype, data.x2d.device
    L = LO_CANDIDATES
    pool = _Pool(
        torch.eye(3, dtype=dt, device=dev).expand(B, L, 3, 3).clone(),
        torch.zeros(B, L, 3, dtype=dt, device=dev),
        torch.full((B, L), float("inf"), dtype=dt, device=dev),
        torch.zeros(B, L, dtype=torch.long, device=dev),
        torch.zeros(B, dtype=torch.long, device=dev),
    )
    order = (~pos).to(torch.int8).argsort(dim=-1, stable=True)  # points of positive weight first
    few = (m >= 3) & (m <= ENUMERATE_MAX)
    small = few.nonzero()[:, 0]
    if small.numel():
        pool = _merge(pool, small, _all_triples(order[small], m[small]), data)
        # Every triple tried: the count of samples is the number of triples.
        pool = pool._replace(drawn=torch.where(few, m * (m - 1) * (m - 2) // 6, pool.drawn))
    active = (m > ENUMERATE_MAX).nonzero()[:, 0]
    S = options.samples_per_round
    while active.numel():
        a = active
        pick = _minimal_samples(order[a], m[a], S, keys[a], pool.drawn[a])
        pool = _merge(pool, a, pick, data)
        pool.drawn[a] += S
        ratio = pool.count[a, 0].to(dt) / m[a].clamp_min(1).to(dt)
        need = _needed(ratio, options.confidence).clamp_min(options.min_iterations)
        more = (pool.drawn[a].to(dt) < need) & (pool.drawn[a] < options.max_iterations)
        active = a[more]
    return pool


def _merge(pool: _Pool, a: Tensor, pick: Tensor, data: _Data) -> _Pool:
    """``pool`` with the hypotheses of the samples ``pick (A, S, 3)`` of the problems ``a`` merged
    in (the best :data:`LO_CANDIDATES` kept; a repeat of a kept score is a repeated sample)."""
    bound = pool.score[a, -1]
    if data.native:
        from .native import ransac_round_native

        R, t, score, count = ransac_round_native(
            a, pick, data.rays, data.x2d, data.x3d, data.K, data.weights, data.tau2[:, 0], bound
        )
        count = count.to(torch.long)
    else:
        R, t, score, count = _round(a, pick, data.rays, data.x2d, data.x3d_b, data.K_b, data.w, data.tau2, bound)
    R = torch.cat([pool.R[a], R], 1)
    t = torch.cat([pool.t[a], t], 1)
    score = torch.cat([pool.score[a], score], 1)
    count = torch.cat([pool.count[a], count], 1)
    score, order = score.sort(dim=-1, stable=True)
    repeat = torch.zeros_like(score, dtype=torch.bool)
    repeat[:, 1:] = score[:, 1:] == score[:, :-1]
    score = torch.where(repeat & torch.isfinite(score), torch.full_like(score, float("inf")), score)
    score, again = score.sort(dim=-1, stable=True)
    order = order.gather(1, again)[:, :LO_CANDIDATES]
    score = score[:, :LO_CANDIDATES]
    R_new, t_new, score_new, count_new = pool.R.clone(), pool.t.clone(), pool.score.clone(), pool.count.clone()
    R_new[a] = R.gather(1, order[..., None, None].expand(-1, -1, 3, 3))
    t_new[a] = t.gather(1, order[..., None].expand(-1, -1, 3))
    score_new[a] = score
    count_new[a] = count.gather(1, order)
    return _Pool(R_new, t_new, score_new, count_new, pool.drawn)


def _refine_candidates(
    data: _Data, pool: _Pool, pos: Tensor, local_solve: LocalSolve
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One least-squares step on the inliers of each kept hypothesis, scored again; per problem
    the best of the refined and unrefined ones: ``R, t, score, inliers, squared errors``."""
    B, L = pool.score.shape
    dt = data.x2d.dtype
    e = _squared_errors(pool.R, pool.t, data.x2d, data.x3d_b, data.K_b)  # BxLxn
    # The fit takes the points within a wider band than the threshold (LO-RANSAC's widened inner
    # threshold): a hypothesis from three noisy points leaves true inliers just outside it.
    inl = pos[:, None] & (e < LO_WIDEN**2 * data.tau2[..., None])
    solvable = torch.isfinite(pool.score) & (inl.sum(-1) >= MIN_CONSENSUS) & ~_repeats(inl)
    # Only the hypotheses with a consensus are solved (the pools of few-point problems are short).
    item, slot = solvable.nonzero(as_tuple=True)
    pick = lambda x: x.expand(B, *x.shape[1:])[item]
    R_lo, t_lo = pool.R.clone(), pool.t.clone()
    if item.numel():
        w_lo = data.w[item] * inl[item, slot].to(dt)
        R_s, t_s = local_solve(
            pick(data.x2d), pick(data.x3d), pick(data.K), w_lo, pool.R[item, slot], pool.t[item, slot]
        )
        R_lo[item, slot], t_lo[item, slot] = R_s, t_s
    ok = solvable & torch.isfinite(R_lo).flatten(2).all(-1) & torch.isfinite(t_lo).all(-1)
    e_lo = _squared_errors(R_lo, t_lo, data.x2d, data.x3d_b, data.K_b)
    s_lo = _msac_terms(e_lo, data.w, data.tau2[:, 0])[0]
    better = ok & (s_lo < pool.score)
    score = torch.where(better, s_lo, pool.score)
    R = torch.where(better[..., None, None], R_lo, pool.R)
    t = torch.where(better[..., None], t_lo, pool.t)
    e = torch.where(better[..., None], e_lo, e)
    best = score.argmin(-1)  # the first of the lowest
    ar = torch.arange(B, device=best.device)
    e_best = e[ar, best]
    return R[ar, best], t[ar, best], score[ar, best], pos & (e_best < data.tau2), e_best


def _repeats(inl: Tensor) -> Tensor:
    """``(B, L)`` hypotheses (best first) whose point set lies mostly (90%) within that of a better
    one: the same structure again, which a refinement of the better one covers."""
    f = inl.to(torch.float64)
    shared = f @ f.transpose(-1, -2)  # BxLxL: points two hypotheses share
    own = f.sum(-1)  # BxL
    L = inl.shape[1]
    better = torch.ones(L, L, dtype=torch.bool, device=inl.device).tril(-1)  # [l, k]: k before l
    return ((shared >= REPEAT_SHARE * own[..., :, None]) & better).any(-1)


def _local_optimisation(
    data: _Data, R: Tensor, t: Tensor, score: Tensor, inl: Tensor, e: Tensor, pos: Tensor, local_solve, rounds: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Least squares on the inliers, inliers read again, while the score improves; a problem
    whose inliers stop changing is done (the others' rounds never touch it)."""
    dt = data.x2d.dtype
    going = inl.sum(-1) >= MIN_CONSENSUS
    for _ in range(rounds):
        R_lo, t_lo = local_solve(data.x2d, data.x3d, data.K, data.weights * inl.to(dt), R, t)
        ok = going & torch.isfinite(R_lo).flatten(1).all(-1) & torch.isfinite(t_lo).all(-1)
        R_lo = torch.where(ok[:, None, None], R_lo, R)
        t_lo = torch.where(ok[:, None], t_lo, t)
        e_lo = _squared_errors(R_lo[:, None], t_lo[:, None], data.x2d, data.x3d_b, data.K_b)[:, 0]
        s_lo = _msac_terms(e_lo[:, None], data.w, data.tau2[:, 0])[0][:, 0]
        inl_lo = pos & (e_lo < data.tau2)
        improved = ok & (s_lo <= score) & (inl_lo.sum(-1) >= MIN_CONSENSUS)
        changed = improved & (inl_lo != inl).any(-1)
        R = torch.where(improved[:, None, None], R_lo, R)
        t = torch.where(improved[:, None], t_lo, t)
        score = torch.where(improved, s_lo, score)
        inl = torch.where(improved[:, None], inl_lo, inl)
        e = torch.where(improved[:, None], e_lo, e)
        going = changed
        if not bool(going.any()):
            break
    return R, t, score, inl, e


def consensus_is_real(inliers: Tensor, pos: Tensor, x2d: Tensor, tau2: Tensor, drawn: Tensor) -> Tensor:
    """``(B,)`` whether a consensus is a pose's and not chance: at least :data:`MIN_CONSENSUS`
    points, and too many for the best of the hypotheses tried to have gathered them by chance.

    A point that no pose explains lands within the threshold of a hypothesis' projection with
    probability ``p = pi tau^2 / area`` (``area``: the bounding box of the image points). The
    consensus of a P3P hypothesis is its 3 sample points plus ``k`` others; among the ``4 drawn``
    hypotheses tried, the chance that any gathers ``k`` of the ``m - 3`` others by chance is at most
    ``4 drawn P(Binomial(m - 3, p) >= k)`` (a union bound), which must stay below
    :data:`CHANCE_LEVEL`. With few points (``p`` small, few hypotheses) 4 or 5 points suffice.

    Args:
        inliers: ``(B, n)`` bool; pos: ``(B, n)`` points of positive weight; x2d: ``(B, n, 2)``;
        tau2: ``(B, 1)`` squared threshold (units of x2d); drawn: ``(B,)`` samples tried.
    """
    dt = x2d.dtype
    big = torch.full_like(x2d, float("inf"))
    lo = torch.where(pos[..., None], x2d, big).amin(1)
    hi = torch.where(pos[..., None], x2d, -big).amax(1)
    area = ((hi - lo).clamp_min(0).prod(-1)).clamp_min(1e-300)
    p = (math.pi * tau2[:, 0] / area).clamp(1e-300, 1.0 - 1e-12)  # (B,)
    m = pos.sum(-1)
    others = (m - 3).clamp_min(0)
    k = (inliers.sum(-1) - 3).clamp_min(0)
    # log P(Binomial(others, p) >= k): the sum of the pmf from k to others, in log space.
    j = torch.arange(pos.shape[1] + 1, device=x2d.device, dtype=dt)  # (n+1,)
    N = others.to(dt)[:, None]
    log_pmf = (
        torch.lgamma(N + 1)
        - torch.lgamma(j + 1)
        - torch.lgamma((N - j).clamp_min(0) + 1)
        + j * torch.log(p)[:, None]
        + (N - j) * torch.log1p(-p)[:, None]
    )
    log_pmf = torch.where((j >= k.to(dt)[:, None]) & (j <= N), log_pmf, torch.full_like(log_pmf, -float("inf")))
    log_tail = torch.logsumexp(log_pmf, -1)
    hypotheses = (4 * drawn).clamp_min(1).to(dt)
    chance = torch.log(hypotheses) + log_tail
    return (inliers.sum(-1) >= MIN_CONSENSUS) & (chance < math.log(CHANCE_LEVEL))


# splitmix64's constants as signed int64 (torch has no uint64 arithmetic); products wrap.
_GOLDEN = -7046029254386353131  # 0x9e3779b97f4a7c15
_MUL1 = -4658895280553007687  # 0xbf58476d1ce4e5b9
_MUL2 = -7723592293110705685  # 0x94d049bb133111eb


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` keeps the sign)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors: a bijection that scatters every input bit."""
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def item_keys(x2d: Tensor, seed: int) -> Tensor:
    """``(B,)`` int64 keys of the random streams: a hash of each problem's image points ``x2d
    (B, n, 2)`` (their float64 bits, in order) and ``seed``; the same for a problem wherever it
    stands in a batch."""
    bits = x2d.detach().to(torch.float64).contiguous().view(torch.int64).flatten(1)  # Bx2n
    place = torch.arange(1, bits.shape[1] + 1, device=bits.device, dtype=torch.int64) * _GOLDEN
    return mix64(mix64(bits + place).sum(-1) ^ mix64(torch.tensor(seed, dtype=torch.int64, device=bits.device)))


def uniform(keys: Tensor, counters: Tensor) -> Tensor:
    """float64 uniforms in [0, 1), the ``counters``-th numbers of the streams ``keys`` (broadcast)."""
    return _shr(mix64(keys + mix64(counters * _GOLDEN)), 11).to(torch.float64) * 2.0**-53


def _minimal_samples(order: Tensor, m: Tensor, S: int, keys: Tensor, drawn: Tensor) -> Tensor:
    """``(A, S, 3)`` indices of 3 distinct points of positive weight per sample, uniformly: three
    uniform draws from ``m``, ``m - 1`` and ``m - 2`` values, shifted past the ones already drawn,
    then mapped through ``order`` ``(A, n)`` (the positive-weight points first; ``m (A,)`` of them).
    The draws are numbers ``3 drawn + k`` onwards of each problem's stream (``keys (A,)``)."""
    A = order.shape[0]
    dev = order.device
    counters = (drawn[:, None] + torch.arange(S, device=dev))[..., None] * 3 + torch.arange(3, device=dev)
    u = uniform(keys[:, None, None], counters)
    mm = m.to(torch.float64)[:, None]
    r0 = torch.minimum((u[..., 0] * mm).long(), (m - 1)[:, None])
    r1 = torch.minimum((u[..., 1] * (mm - 1)).long(), (m - 2)[:, None])
    r2 = torch.minimum((u[..., 2] * (mm - 2)).long(), (m - 3)[:, None])
    r1 = r1 + (r1 >= r0).long()
    lo, hi = torch.minimum(r0, r1), torch.maximum(r0, r1)
    r2 = r2 + (r2 >= lo).long()
    r2 = r2 + (r2 >= hi).long()
    ranks = torch.stack([r0, r1, r2], -1).reshape(A, S * 3)
    return order.gather(1, ranks).reshape(A, S, 3)


def _all_triples(order: Tensor, m: Tensor) -> Tensor:
    """``(A, T, 3)`` every triple of the first ``m`` points of ``order`` (``T = C(ENUMERATE_MAX,
    3)``; the triples past a problem's ``m`` are ``-1``: skipped)."""
    triples = torch.combinations(torch.arange(ENUMERATE_MAX, device=order.device), 3)  # Tx3
    A = order.shape[0]
    picked = order.gather(1, triples.reshape(1, -1).expand(A, -1).clamp(max=order.shape[1] - 1)).reshape(A, -1, 3)
    inside = triples[None, :, 2] < m[:, None]
    return torch.where(inside[..., None], picked, torch.full_like(picked, -1))


def _round(
    a: Tensor,
    pick: Tensor,
    rays: Tensor,
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    w: Tensor,
    tau2: Tensor,
    bound: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One round in tensor ops (as :func:`bpnp.solvers.native.ransac_round_native`): P3P for the
    samples ``pick (A, S, 3)`` of the problems ``a (A,)`` (a sample of index ``-1`` is skipped),
    every pose scored; the best of each sample ``R (A, S, 3, 3), t (A, S, 3), score (A, S)``
    (inf where none scored below ``bound (A,)``), ``count (A, S)``."""
    A, S, _ = pick.shape
    dt, dev = x2d.dtype, x2d.device
    skipped = pick[..., 0] < 0
    pick = pick.clamp_min(0)
    gather = pick[..., None].expand(-1, -1, -1, 3)
    f = rays[a, None].expand(-1, S, -1, -1).gather(2, gather)
    X = x3d[a, None].expand(-1, S, -1, -1).gather(2, gather)
    R, t, valid = p3p(f.reshape(-1, 3, 3), X.reshape(-1, 3, 3))
    # The C round takes each sample's valid poses in root order: keep that order (valid first).
    order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)
    R = R.gather(1, order[..., None, None].expand(-1, -1, 3, 3)).reshape(A, 4 * S, 3, 3)
    t = t.gather(1, order[..., None].expand(-1, -1, 3)).reshape(A, 4 * S, 3)
    valid = valid.gather(1, order).reshape(A, S, 4) & ~skipped[..., None]
    # Invalid hypotheses score as if every point were an outlier, and never win.
    R = torch.where(valid.reshape(A, 4 * S)[..., None, None], R, torch.eye(3, dtype=dt, device=dev))
    t = torch.where(valid.reshape(A, 4 * S)[..., None], t, torch.zeros_like(t))
    score, counts = msac_score(R, t, x2d[a], x3d[a], K[a], w[a], tau2[a, 0])
    score = score.reshape(A, S, 4)
    score = torch.where(valid & (score < bound[:, None, None]), score, torch.full_like(score, float("inf")))
    s_min, h = score.min(-1)  # AxS
    R = R.reshape(A, S, 4, 3, 3).gather(2, h[..., None, None, None].expand(-1, -1, 1, 3, 3))[:, :, 0]
    t = t.reshape(A, S, 4, 3).gather(2, h[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    count = counts.reshape(A, S, 4).gather(2, h[..., None])[..., 0].to(torch.long)
    none = torch.isinf(s_min)
    R = torch.where(none[..., None, None], torch.eye(3, dtype=dt, device=dev), R)
    t = torch.where(none[..., None], torch.tensor([0.0, 0.0, 1.0], dtype=dt, device=dev), t)
    count = torch.where(none, torch.zeros_like(count), count)
    return R, t, s_min, count


def _nearest(e: Tensor, pos: Tensor, k: int) -> Tensor:
    """``(B, n)`` the ``k`` points of positive weight with the smallest errors ``e (B, n)``."""
    k = min(k, e.shape[-1])
    ranked = torch.where(pos, torch.nan_to_num(e, nan=1e300, posinf=1e300), torch.full_like(e, float("inf")))
    nearest = ranked.topk(k, dim=-1, largest=False).indices
    return torch.zeros_like(pos).scatter_(-1, nearest, True) & pos
