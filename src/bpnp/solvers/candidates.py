"""Batched global initialisation from the object-space cost (SQPnP-style).

With rays ``v_i = K^-1 [x_i, 1]`` and projectors ``P_i = I - v_i v_i^T / |v_i|^2``, the
object-space error ``sum_i w_i |P_i (R X_i + t)|^2`` is, after eliminating ``t`` in closed
form, a quadratic form ``vec(R)^T Omega vec(R)`` with a 9x9 ``Omega`` (Schweighofer & Pinz;
Terzakis & Lourakis, SQPnP). Its minimisation over SO(3) no longer depends on n, so many
starts are cheap: we start from rotations near the eigenvectors of ``Omega`` with the
smallest eigenvalues (both signs) and, for flat or thin point sets (where ``Omega`` has a near
null space), from the 12 rotations of the tetrahedral group; run a damped Newton on SO(3) from
each, and hand the best distinct, cheirally valid minima to the reprojection refinement.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

from ..geometry import quaternion_to_rotmat, rotate_by, rotmat_to_quaternion, skew
from ..options import SolverOptions


@functools.cache
def _rotation_group_f64(order: int) -> Tensor:
    mats = []
    eye = torch.eye(3, dtype=torch.float64)
    for perm in itertools.permutations(range(3)):
        even = sum(perm[i] > perm[j] for i in range(3) for j in range(i + 1, 3)) % 2 == 0
        if order == 12 and not even:
            continue
        for signs in itertools.product((1.0, -1.0), repeat=3):
            M = eye[list(perm)] * torch.tensor(signs, dtype=torch.float64)[:, None]
            if torch.linalg.det(M) > 0:
                mats.append(M)
    return torch.stack(mats)


def _rotation_group(dtype: torch.dtype, device: torch.device, order: int = 24) -> Tensor:
    """Fixed, well-spread starts on SO(3): the rotations of the cube (order 24) or of the
    tetrahedron (order 12, the even permutations among them); built once, then cached."""
    return _rotation_group_f64(order).to(dtype=dtype, device=device)


def normalised_rays(x2d: Tensor, K: Tensor) -> Tensor:
    """``K^-1 [x, 1]`` for upper-triangular ``K``: ``(B,n,2), (B|1,3,3) -> (B,n,3)``."""
    k = K[..., None, :, :]
    k22 = k[..., 2, 2]
    b = (x2d[..., 1] * k22 - k[..., 1, 2]) / k[..., 1, 1]
    a = (x2d[..., 0] * k22 - k[..., 0, 2] - k[..., 0, 1] * b) / k[..., 0, 0]
    return torch.stack([a, b, torch.ones_like(a)], -1)


def omega_matrix(rays: Tensor, x3d: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """The object-space quadratic form.

    Args:
        rays: ``(B, n, 3)``; x3d: ``(B|1, n, 3)`` (centred); weights: ``(B|1, n)``.
    Returns:
        ``Omega (B, 9, 9)`` and ``T (B, 3, 9)`` with the optimal ``t = T vec(R)``.
    """
    B, n, _ = rays.shape
    proj = rays[..., :, None] * rays[..., None, :] / (rays * rays).sum(-1)[..., None, None]
    eye = torch.eye(3, dtype=rays.dtype, device=rays.device)
    P = (eye - proj) * weights[..., None, None]  # BxNx3x3, weighted projectors
    x3d = x3d.expand(B, n, 3)
    A = P.sum(1)  # Bx3x3
    Bm = torch.einsum("bnac,bnk->back", P, x3d).reshape(B, 3, 9)
    zz = x3d[..., :, None] * x3d[..., None, :]  # BxNx3x3
    full = torch.einsum("bnac,bnjk->bajck", P, zz).reshape(B, 9, 9)
    # A is singular only when every weighted ray is the same: T is NaN there (no exception; the
    # item's answer is then not finite and the layer replaces it).
    T, info = torch.linalg.solve_ex(A, Bm)
    T = torch.where((info == 0)[:, None, None], -T, torch.full_like(T, float("nan")))
    omega = full + Bm.transpose(-1, -2) @ T
    omega = 0.5 * (omega + omega.transpose(-1, -2))
    return omega, T


def orthonormalise(M: Tensor) -> Tensor:
    """A rotation near ``M`` (exact for a rotation, valid for any matrix): ``M`` read as a
    quaternion by Shepperd's formulas, normalised, and turned back into a matrix.

    Args:
        M: ``(..., 3, 3)``.
    Returns:
        ``(..., 3, 3)`` rotation matrices, orthonormal to float precision.
    """
    return quaternion_to_rotmat(rotmat_to_quaternion(M))


# Entries of a symmetric 3x3 matrix (row-major index) whose products give its cofactors
# c00, c01, c02, c11, c12, c22 = first * second - third * fourth (d f - e e, c e - b f, ...), and
# the adjugate's 9 entries as indices into those six.
_COFACTOR_TERMS = ((4, 2, 1, 0, 1, 0), (8, 5, 5, 8, 2, 4), (5, 1, 2, 2, 0, 1), (5, 8, 4, 2, 5, 1))
_ADJUGATE = (0, 1, 2, 1, 3, 4, 2, 4, 5)


@functools.cache
def _cofactor_indices(device: torch.device) -> tuple[Tensor, Tensor]:
    """:data:`_COFACTOR_TERMS` (flattened) and :data:`_ADJUGATE` as index tensors on ``device``
    (made once)."""
    return torch.tensor(_COFACTOR_TERMS, device=device).flatten(), torch.tensor(_ADJUGATE, device=device)


def _solve3_spd(A: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Solve ``A x = g`` for symmetric 3x3 ``A`` in closed form (cofactors); also whether A is PD.
    The six cofactors are one gathered product, so the work is about a dozen elementwise
    operations (kernels, on a GPU) for any batch."""
    flat = A.flatten(-2)
    terms, adjugate = _cofactor_indices(A.device)
    factors = flat.index_select(-1, terms).unflatten(-1, (2, 2, 6))
    products = factors[..., 0, :] * factors[..., 1, :]  # ...x2x6
    cof = products[..., 0, :] - products[..., 1, :]  # c00, c01, c02, c11, c12, c22
    det = (flat[..., :3] * cof[..., :3]).sum(-1)
    pd = (torch.stack([flat[..., 0], cof[..., 5], det], -1) > 0).all(-1)
    adj = cof.index_select(-1, adjugate).unflatten(-1, (3, 3))
    x = (adj * g[..., None, :]).sum(-1) / torch.where(pd, det, 1.0)[..., None]
    return torch.where(pd[..., None], x, 0.0), pd


def minimise_on_so3(
    omega: Tensor, R: Tensor, iters: int = 8, lam0: float = 1e-3, active: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Local minima of ``vec(R)^T Omega vec(R)`` from many starts per item.

    Damped Newton with the exact Hessian on the chart ``R <- exp([d]_x) R``, at most ``iters``
    iterations, all in closed-form tensor ops (3x3 solves by cofactors): the starts of one
    item share their ``Omega``, so the 9x9 products are one matmul per item. A start stops once
    a Newton step (accepted or not) is below 1e-8 rad, the minimum to float64's resolution of the
    cost (as the C solver's).

    Args:
        omega: ``(B, 9, 9)``; R: ``(B, S, 3, 3)`` starts; lam0: initial damping;
        active: ``(B, S)`` bool, starts to run (default all).
    Returns:
        ``R (B, S, 3, 3)`` and the cost ``(B, S)``.
    """
    B, S = R.shape[:2]
    generators = _skew_generators(R.dtype, R.device)
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    floor = 1e-12 * omega.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None].clamp_min(1e-300)

    def value(R):
        o_r = R.reshape(B, S, 9) @ omega  # BxSx9 (omega symmetric)
        return (R.reshape(B, S, 9) * o_r).sum(-1), o_r

    h, o_r = value(R)
    lam = torch.full((B, S), lam0, dtype=R.dtype, device=R.device)
    running = torch.ones(B, S, dtype=torch.bool, device=R.device) if active is None else active.clone()
    for _ in range(iters):
        J = (R.reshape(B, S, 9) @ generators).unflatten(-1, (3, 9))  # BxSx3x9, rows vec([e_a]_x R)
        grad = 2.0 * (J @ o_r[..., None])[..., 0]
        H_gn = 2.0 * (J.reshape(B, S * 3, 9) @ omega).reshape(B, S, 3, 9) @ J.transpose(-1, -2)
        N = R @ o_r.reshape(B, S, 3, 3).transpose(-1, -2)
        X = N - N.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * eye
        H = H_gn + (X + X.transpose(-1, -2))
        damp = torch.diag_embed(lam[..., None] * torch.maximum(H_gn.diagonal(dim1=-2, dim2=-1), floor))
        # Far from a minimum the exact Hessian can be indefinite: then the Gauss-Newton step.
        both, both_pd = _solve3_spd(torch.stack([H, H_gn]) + damp, grad)
        step = -torch.where(both_pd[0, ..., None], both[0], both[1])
        R_new = rotate_by(step, R)
        h_new, o_new = value(R_new)
        pd = both_pd[0] | both_pd[1]
        ok = running & pd & (h_new <= h)
        R = torch.where(ok[..., None, None], R_new, R)
        h = torch.where(ok, h_new, h)
        o_r = torch.where(ok[..., None], o_new, o_r)
        lam = (lam * torch.where(ok, 0.1, 10.0)).clamp(1e-12, 1e12)
        running = running & ~(pd & ((step * step).sum(-1) < 1e-16))
    # The updates keep R a rotation to rounding; one Newton-Schulz step of the polar factor,
    # R (3 I - R^T R) / 2, removes the drift (as orthonormalise would, to O(eps^2)).
    return torch.sub(1.5 * R, R @ (R.transpose(-1, -2) @ R), alpha=0.5), h


@functools.cache
def _skew_generators(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(9, 27)`` the linear map ``vec(R) -> [vec([e_0]_x R), vec([e_1]_x R), vec([e_2]_x R)]``
    on ``device`` (made once): the rows of d vec(R) / d d_a, for all starts in one matmul."""
    eye = torch.eye(3, dtype=dtype, device=device)
    skews = skew(eye)  # [e_a]_x
    # vec(G R)[3 i + j] = sum_k G[i, k] R[k, j]: the map takes R[k, j] to it with weight G[i, k].
    return torch.einsum("aik,jl->kjail", skews, eye).reshape(9, 27)


def _object_space(x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor) -> tuple[Tensor, ...]:
    """The object-space problem of every item: ``rays (B,n,3)``, ``w (B,n)``, the weighted
    ``centre (B,3)`` and ``centred`` points, ``T (B,3,9)``, Omega's trace ``norm (B,1,1)``, Omega
    divided by it ``(B,9,9)`` and whether it is finite ``(B,)`` (items without a finite Omega,
    from degenerate data, get the identity, as the eigen-decomposition raises on NaN; their
    translations stay NaN, so their answers are not finite)."""
    B, n, _ = x2d.shape
    rays = normalised_rays(x2d, K)
    w = weights.expand(B, n)
    centre = (w[..., None] * x3d).sum(1) / w.sum(-1, keepdim=True)  # Bx3
    centred = x3d - centre[:, None, :]
    omega, T = omega_matrix(rays, centred, w)
    norm = omega.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None].clamp_min(1e-300)
    omega_n = omega / norm
    finite = torch.isfinite(omega_n).flatten(1).all(-1)
    omega_n = torch.where(finite[:, None, None], omega_n, torch.eye(9, dtype=omega.dtype, device=omega.device))
    return rays, w, centre, centred, T, norm, omega_n, finite


def initial_poses(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    options: SolverOptions,
) -> tuple[Tensor, Tensor, Tensor]:
    """Candidate poses for every item, best first; every decision is made per item.

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``, float64.
        options: ``num_candidates``, ``num_eigvecs``, ``solid_eigvecs``, ``thin_ratio``,
            ``so3_iters``, ``so3_damping``, ``dedupe``, ``behind_penalty`` and
            ``duplicate_penalty`` of :class:`~bpnp.options.SolverOptions` apply.
    Returns:
        ``R (B, k, 3, 3)``, ``t (B, k, 3)`` and ``rank_key (B, k)`` (object-space cost, plus a
        large penalty for candidates with points behind the camera or duplicates; ``inf`` for
        slots an item does not use).
    """
    B, n, _ = x2d.shape
    rays, w, centre, centred, T, norm, omega_n, finite = _object_space(x2d, x3d, K, weights)
    _, vecs = torch.linalg.eigh(omega_n)
    # Flat or thin point sets leave Omega with a (near) null space in which eigenvectors are
    # poor starts; only they get the fixed starts (measured: solid sets lose no optimum with
    # eigenvector starts alone, sets thinner than ~0.1 do). Decided per item: every item gets
    # the slots of the largest start set, and the slots it does not use are masked out.
    cov = (w[..., None, None] * centred[..., :, None] * centred[..., None, :]).sum(1)
    cov = torch.where(
        torch.isfinite(cov).flatten(1).all(-1)[:, None, None], cov, torch.eye(3, dtype=cov.dtype, device=cov.device)
    )
    spread = torch.linalg.eigvalsh(cov)  # Bx3 ascending
    thin = spread[:, 0] < options.thin_ratio**2 * spread[:, 2]  # (B,)
    m_thin, m_solid = min(options.num_eigvecs, 9), min(options.solid_eigvecs, 9)
    # Slots are only computed when some item uses them; masked slots never reach an answer.
    any_thin = bool(thin.any())
    m = max(m_thin, m_solid) if any_thin else m_solid
    e = vecs[..., :m].transpose(-1, -2).reshape(B, m, 3, 3) * 3.0**0.5
    starts = orthonormalise(torch.stack([e, -e], 2).reshape(B, 2 * m, 3, 3))  # +e_0, -e_0, +e_1, ...
    used = torch.arange(m, device=x2d.device)[None, :] < torch.where(thin, m_thin, m_solid)[:, None]
    used = used.repeat_interleave(2, 1)
    if any_thin:
        cube = _rotation_group(x2d.dtype, x2d.device, 12)
        starts = torch.cat([starts, cube.expand(B, *cube.shape)], 1)
        used = torch.cat([used, thin[:, None].expand(B, cube.shape[0])], 1)  # BxS
    S = starts.shape[1]
    R, h = minimise_on_so3(omega_n, starts, iters=options.so3_iters, lam0=options.so3_damping, active=used)
    h = h * norm[:, 0, 0, None]
    t_c = (T[:, None] @ R.reshape(B, S, 9, 1))[..., 0]  # BxSx3
    t = t_c - (R @ centre[:, None, :, None])[..., 0]
    # Cheirality: points (with weight) in front of the camera along their rays.
    xcam = torch.einsum("bsij,bnj->bsni", R, centred.expand(B, n, 3)) + t_c[:, :, None, :]
    ahead = ((xcam * rays[:, None]).sum(-1) > 0) | (w[:, None] <= 0)
    behind_frac = 1.0 - ahead.to(h.dtype).mean(-1)
    h_scale = torch.where(used, h.abs(), torch.zeros_like(h)).amax(-1, keepdim=True) + 1e-300
    key = h / h_scale + options.behind_penalty * behind_frac
    inf = torch.full_like(key, float("inf"))
    key = torch.where(used, key, inf)
    # Duplicates: a candidate equal to a better one is pushed to the back.
    order = key.argsort(dim=-1, stable=True)
    R = torch.gather(R, 1, order[..., None, None].expand(B, S, 3, 3))
    t = torch.gather(t, 1, order[..., None].expand(B, S, 3))
    key = torch.gather(key, 1, order)
    diff = (R[:, :, None] - R[:, None, :]).flatten(-2).norm(dim=-1)  # BxSxS
    earlier = torch.ones(S, S, dtype=torch.bool, device=R.device).tril(-1)
    dup = ((diff < options.dedupe) & earlier & torch.isfinite(key)[:, None, :]).any(-1)
    key = key + options.duplicate_penalty * dup.to(key.dtype)
    order = key.argsort(dim=-1, stable=True)[:, : options.num_candidates]
    k = order.shape[1]
    R = torch.gather(R, 1, order[..., None, None].expand(B, k, 3, 3))
    t = torch.gather(t, 1, order[..., None].expand(B, k, 3))
    return R, t, torch.gather(key, 1, order)


def warm_start_trusted(
    x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor, R: Tensor, options: SolverOptions, ratio: float = 2.0
) -> Tensor:
    """Whether warm-started answers sit in the global basin, by the object-space error.

    The object-space error ``vec(R)^T Omega vec(R)`` of the answer ``R`` is compared with the best
    minimum of the object-space multi-start (eigenvector starts only: the cheap half of the global
    search, no pixel-space refinement). An answer whose error exceeds ``ratio`` times that minimum
    (plus float64's floor) lies in another basin than the global search would start from.

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``;
        R: ``(B, 3, 3)`` the answers; options: the solver's options (SO(3) iterations, damping).
    Returns:
        ``(B,)`` bool.
    """
    B = x2d.shape[0]
    *_, omega_n, finite = _object_space(x2d, x3d, K, weights)
    _, vecs = torch.linalg.eigh(omega_n)
    m = min(options.solid_eigvecs, 9)
    e = vecs[..., :m].transpose(-1, -2).reshape(B, m, 3, 3) * 3.0**0.5
    starts = orthonormalise(torch.stack([e, -e], 2).reshape(B, 2 * m, 3, 3))
    _, h = minimise_on_so3(omega_n, starts, iters=options.so3_iters, lam0=options.so3_damping)
    r = R.reshape(B, 9, 1)
    h_answer = (r.transpose(-1, -2) @ omega_n @ r)[:, 0, 0]
    return finite & (h_answer <= ratio * h.amin(-1) + 1e-12)
