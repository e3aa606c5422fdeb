"""Batched RANSAC for PnP: P3P hypotheses and MSAC scores for the whole batch at once.

Every round draws ``samples_per_round`` minimal samples (3 points of positive weight) for each
problem still running, solves P3P for all of them in one set of tensor ops (Grunert's
formulation: a quartic per sample, solved in closed form, up to 4 poses), and scores every pose
against every point of its problem with the truncated quadratic of MSAC. A problem stops once
an all-inlier sample has been drawn with the requested confidence. Then local optimisation:
least squares on the best hypothesis' inliers, inliers read again at the refined pose, kept
while the score improves. No Python loop runs over the batch, only over rounds.

All inputs are the solver's normalised, float64 problems (:mod:`bpnp.normalise`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ..options import RansacOptions
from .init import normalised_rays

__all__ = ["RansacResult", "solve_quartic", "p3p", "ransac"]

#: ``(x2d, x3d, K, weights, R, t) -> (R, t)``: least squares from a warm start (the layer's solver).
LocalSolve = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], "tuple[Tensor, Tensor]"]

#: Points the final inlier set holds at least (the pose of fewer is not well determined).
MIN_INLIERS = 6


class RansacResult(NamedTuple):
    R: Tensor  # (B, 3, 3) pose after local optimisation
    t: Tensor  # (B, 3)
    inliers: Tensor  # (B, n) bool, within the threshold at that pose (at least MIN_INLIERS where n allows)
    score: Tensor  # (B,) MSAC score of the pose
    samples: Tensor  # (B,) minimal samples drawn
    enough: Tensor  # (B,) bool: at least min(MIN_INLIERS, points of positive weight) within the threshold


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
) -> RansacResult:
    """RANSAC (P3P + MSAC + local optimisation) for a batch of normalised problems.

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``; weights: ``(B|1, n)`` (points
            of zero weight are never sampled and never count); threshold: ``(B|1, 1)`` inlier
            threshold in the units of x2d; options: :class:`~bpnp.options.RansacOptions`;
        local_solve: least squares from a warm start (:data:`LocalSolve`).
        native: score the hypotheses in the compiled C library (CPU tensors).
    Returns:
        :class:`RansacResult`.
    """
    B, n, _ = x2d.shape
    dev, dt = x2d.device, x2d.dtype
    x3d_b = x3d.expand(B, n, 3)
    K_b = K.expand(B, 3, 3)
    w = weights.expand(B, n)
    pos = w > 0
    m = pos.sum(-1)
    tau2 = (threshold * threshold).expand(B, 1)
    rays = normalised_rays(x2d, K_b)
    rays = rays / rays.norm(dim=-1, keepdim=True)
    gen = torch.Generator(device=dev)
    gen.manual_seed(options.seed)

    best_score = torch.full((B,), float("inf"), dtype=dt, device=dev)
    best_R = torch.eye(3, dtype=dt, device=dev).expand(B, 3, 3).clone()
    best_t = torch.zeros(B, 3, dtype=dt, device=dev)
    best_t[:, 2] = 1.0
    best_count = torch.zeros(B, dtype=torch.long, device=dev)
    drawn = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.arange(B, device=dev)
    S = options.samples_per_round
    order = (~pos).to(torch.int8).argsort(dim=-1, stable=True)  # points of positive weight first
    while active.numel():
        a = active
        pick = _minimal_samples(order[a], m[a], S, gen)  # AxSx3
        if native:
            from .native import ransac_round_native

            R_b, t_b, s_min, count = ransac_round_native(a, pick, rays, x2d, x3d, K, weights, tau2[:, 0])
            count = count.to(torch.long)
        else:
            R_b, t_b, s_min, count = _round(a, pick, rays, x2d, x3d_b, K_b, w, tau2)
        better = s_min < best_score[a]
        best_score[a] = torch.where(better, s_min, best_score[a])
        best_R[a] = torch.where(better[:, None, None], R_b, best_R[a])
        best_t[a] = torch.where(better[:, None], t_b, best_t[a])
        best_count[a] = torch.where(better, count, best_count[a])
        drawn[a] += S
        ratio = best_count[a].to(dt) / m[a].clamp_min(1).to(dt)
        need = _needed(ratio, options.confidence).clamp_min(options.min_iterations)
        more = (drawn[a].to(dt) < need) & (drawn[a] < options.max_iterations)
        active = a[more]

    R, t, score = best_R, best_t, best_score
    e = _squared_errors(R[:, None], t[:, None], x2d, x3d_b, K_b)[:, 0]
    inl = _inlier_set(e, pos, tau2)
    for _ in range(options.local_iterations):
        R_lo, t_lo = local_solve(x2d, x3d, K, weights * inl.to(dt), R, t)
        ok = torch.isfinite(R_lo).flatten(1).all(-1) & torch.isfinite(t_lo).all(-1)
        R_lo = torch.where(ok[:, None, None], R_lo, R)
        t_lo = torch.where(ok[:, None], t_lo, t)
        e_lo = _squared_errors(R_lo[:, None], t_lo[:, None], x2d, x3d_b, K_b)[:, 0]
        s_lo = _msac_terms(e_lo[:, None], w, tau2[:, 0])[0][:, 0]
        inl_lo = _inlier_set(e_lo, pos, tau2)
        improved = ok & (s_lo <= score)
        changed = improved & (inl_lo != inl).any(-1)
        R = torch.where(improved[:, None, None], R_lo, R)
        t = torch.where(improved[:, None], t_lo, t)
        score = torch.where(improved, s_lo, score)
        inl = torch.where(improved[:, None], inl_lo, inl)
        e = torch.where(improved[:, None], e_lo, e)
        if not bool(changed.any()):
            break
    enough = (pos & (e < tau2)).sum(-1) >= m.clamp(max=MIN_INLIERS)
    return RansacResult(R, t, inl, score, drawn, enough)


def _minimal_samples(order: Tensor, m: Tensor, S: int, gen: torch.Generator) -> Tensor:
    """``(A, S, 3)`` indices of 3 distinct points of positive weight per sample, uniformly: three
    uniform draws from ``m``, ``m - 1`` and ``m - 2`` values, shifted past the ones already drawn,
    then mapped through ``order`` ``(A, n)`` (the positive-weight points first; ``m (A,)`` of them)."""
    A = order.shape[0]
    u = torch.rand(A, S, 3, generator=gen, dtype=torch.float64, device=order.device)
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


def _round(
    a: Tensor, pick: Tensor, rays: Tensor, x2d: Tensor, x3d: Tensor, K: Tensor, w: Tensor, tau2: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One round in tensor ops (as :func:`bpnp.solvers.native.ransac_round_native`): P3P for the
    samples ``pick (A, S, 3)`` of the problems ``a (A,)``, every pose scored; the best per problem
    ``R (A, 3, 3), t (A, 3), score (A,), count (A,)``."""
    A, S, _ = pick.shape
    dt, dev = x2d.dtype, x2d.device
    gather = pick[..., None].expand(-1, -1, -1, 3)
    f = rays[a, None].expand(-1, S, -1, -1).gather(2, gather)
    X = x3d[a, None].expand(-1, S, -1, -1).gather(2, gather)
    R, t, valid = p3p(f.reshape(-1, 3, 3), X.reshape(-1, 3, 3))
    # The C round takes each sample's valid poses in root order: keep that order (valid first).
    order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)
    R = R.gather(1, order[..., None, None].expand(-1, -1, 3, 3)).reshape(A, 4 * S, 3, 3)
    t = t.gather(1, order[..., None].expand(-1, -1, 3)).reshape(A, 4 * S, 3)
    valid = valid.gather(1, order).reshape(A, 4 * S)
    # Invalid hypotheses score as if every point were an outlier, and never win.
    R = torch.where(valid[..., None, None], R, torch.eye(3, dtype=dt, device=dev))
    t = torch.where(valid[..., None], t, torch.zeros_like(t))
    score, counts = msac_score(R, t, x2d[a], x3d[a], K[a], w[a], tau2[a, 0])
    score = torch.where(valid, score, torch.full_like(score, float("inf")))
    s_min, h = score.min(-1)
    ar = torch.arange(A, device=dev)
    return R[ar, h], t[ar, h], s_min, counts[ar, h].to(torch.long)


def _inlier_set(e: Tensor, pos: Tensor, tau2: Tensor) -> Tensor:
    """``(B, n)`` points of positive weight within the threshold; where fewer than
    :data:`MIN_INLIERS`, the :data:`MIN_INLIERS` of positive weight with the smallest errors."""
    inl = pos & (e < tau2)
    k = min(MIN_INLIERS, e.shape[-1])
    few = inl.sum(-1) < torch.clamp(pos.sum(-1), max=k)
    if bool(few.any()):
        ranked = torch.where(pos, torch.nan_to_num(e, posinf=1e300), torch.full_like(e, float("inf")))
        nearest = ranked.topk(k, dim=-1, largest=False).indices
        fill = torch.zeros_like(inl).scatter_(-1, nearest, True) & pos
        inl = torch.where(few[:, None], inl | fill, inl)
    return inl
