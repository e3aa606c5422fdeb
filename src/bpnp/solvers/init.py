"""Batched global initialisation from the object-space cost (SQPnP-style).

With rays ``v_i = K^-1 [x_i, 1]`` and projectors ``P_i = I - v_i v_i^T / |v_i|^2``, the
object-space error ``sum_i w_i |P_i (R X_i + t)|^2`` is, after eliminating ``t`` in closed
form, a quadratic form ``vec(R)^T Omega vec(R)`` with a 9x9 ``Omega`` (Schweighofer & Pinz;
Terzakis & Lourakis, SQPnP). Its minimisation over SO(3) no longer depends on n, so many
starts are cheap: we start from the rotations nearest to the eigenvectors of ``Omega`` with
the smallest eigenvalues (both signs), run a damped Newton on SO(3) from each, and hand the
best distinct, cheirally valid minima to the reprojection refinement.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import rvec_to_rotmat, skew
from .lm import levenberg_marquardt



def _cube_group(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 24 rotations of the cube: well-spread fixed starts on SO(3)."""
    mats = []
    eye = torch.eye(3, dtype=torch.float64)
    import itertools

    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            M = eye[list(perm)] * torch.tensor(signs, dtype=torch.float64)[:, None]
            if torch.linalg.det(M) > 0:
                mats.append(M)
    return torch.stack(mats).to(dtype=dtype, device=device)


def _basis_skews(dtype: torch.dtype, device: torch.device) -> Tensor:
    return skew(torch.eye(3, dtype=dtype, device=device))  # 3x3x3, [e_a]_x


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
    T = -torch.linalg.solve(A, Bm)
    omega = full + Bm.transpose(-1, -2) @ T
    omega = 0.5 * (omega + omega.transpose(-1, -2))
    return omega, T


def nearest_rotation(M: Tensor) -> Tensor:
    """Closest rotation in Frobenius norm: ``(..., 3, 3) -> (..., 3, 3)``."""
    U, _, Vh = torch.linalg.svd(M)
    det = torch.linalg.det(U @ Vh)
    D = torch.ones_like(U[..., 0])
    D = torch.cat([D[..., :2], det[..., None]], -1)
    return (U * D[..., None, :]) @ Vh


def minimise_on_so3(omega: Tensor, R0: Tensor, max_iter: int = 30) -> tuple[Tensor, Tensor]:
    """Local minima of ``vec(R)^T Omega vec(R)`` from starts ``R0``.

    Args:
        omega: ``(M, 9, 9)``; R0: ``(M, 3, 3)``.
    Returns:
        ``R (M, 3, 3)`` and the cost ``(M,)``.
    """
    E = _basis_skews(omega.dtype, omega.device)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)

    def evaluate(state):
        (R,) = state
        r = R.reshape(-1, 9)
        o_r = (omega @ r[..., None])[..., 0]
        cost = (r * o_r).sum(-1)
        J = (E[None] @ R[:, None]).reshape(-1, 3, 9)  # rows vec([e_a]_x R)
        grad = 2.0 * (J @ o_r[..., None])[..., 0]
        N = R @ o_r.reshape(-1, 3, 3).transpose(-1, -2)
        sym = 0.5 * (N + N.transpose(-1, -2))
        trace = N.diagonal(dim1=-2, dim2=-1).sum(-1)
        hess = 2.0 * (J @ omega @ J.transpose(-1, -2) + sym - trace[:, None, None] * eye)
        return cost, grad, hess

    def retract(state, step):
        (R,) = state
        return (rvec_to_rotmat(step) @ R,)

    scale = omega.diagonal(dim1=-2, dim2=-1).sum(-1)
    out = levenberg_marquardt((R0,), evaluate, retract, max_iter=max_iter, rtol=1e-12,
                              atol=1e-20 * scale)
    return out.state[0], out.cost


def initial_poses(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    num_candidates: int = 4,
    num_eigvecs: int = 4,
    fixed_starts: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Candidate poses for every item, best first.

    Args:
        x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``.
        num_candidates: how many candidates per item to return.
        num_eigvecs: eigenvectors of Omega used as starts (each with both signs).
        fixed_starts: also start from the 24 rotations of the cube group (planar points leave
            a 3-dimensional null space in Omega, where eigenvectors alone are poor starts).
    Returns:
        ``R (B, k, 3, 3)``, ``t (B, k, 3)`` and ``rank_key (B, k)`` (object-space cost, plus a
        large penalty for candidates with points behind the camera or duplicates).
    """
    B, n, _ = x2d.shape
    rays = normalised_rays(x2d, K)
    w = weights.expand(B, n)
    wsum = w.sum(-1, keepdim=True)
    centre = (w[..., None] * x3d).sum(1) / wsum  # Bx3
    centred = x3d - centre[:, None, :]
    omega, T = omega_matrix(rays, centred, w)
    _, vecs = torch.linalg.eigh(omega)
    m = min(num_eigvecs, 9)
    e = vecs[..., :m].transpose(-1, -2).reshape(B, m, 3, 3) * 3.0**0.5
    starts = nearest_rotation(torch.cat([e, -e], 1))  # Bx2mx3x3
    if fixed_starts:
        cube = _cube_group(x2d.dtype, x2d.device)
        starts = torch.cat([starts, cube.expand(B, *cube.shape)], 1)
    S = starts.shape[1]
    R, h = minimise_on_so3(omega.repeat_interleave(S, 0), starts.reshape(-1, 3, 3))
    R = R.reshape(B, S, 3, 3)
    h = h.reshape(B, S)
    t_c = (T[:, None] @ R.reshape(B, S, 9, 1))[..., 0]  # BxSx3
    t = t_c - (R @ centre[:, None, :, None])[..., 0]
    # Cheirality: points (with weight) in front of the camera along their rays.
    xcam = torch.einsum("bsij,bnj->bsni", R, centred.expand(B, n, 3)) + t_c[:, :, None, :]
    ahead = ((xcam * rays[:, None]).sum(-1) > 0) | (w[:, None] <= 0)
    behind_frac = 1.0 - ahead.to(h.dtype).mean(-1)
    h_scale = h.abs().amax(-1, keepdim=True) + 1e-300
    key = h / h_scale + 10.0 * behind_frac
    # Duplicates: a candidate equal to a better one is pushed to the back.
    order = key.argsort(-1)
    R = torch.gather(R, 1, order[..., None, None].expand(B, S, 3, 3))
    t = torch.gather(t, 1, order[..., None].expand(B, S, 3))
    key = torch.gather(key, 1, order)
    diff = (R[:, :, None] - R[:, None, :]).flatten(-2).norm(dim=-1)  # BxSxS
    earlier = torch.ones(S, S, dtype=torch.bool, device=R.device).tril(-1)
    dup = ((diff < 1e-5) & earlier).any(-1)
    key = key + 100.0 * dup.to(key.dtype)
    order = key.argsort(-1)[:, :num_candidates]
    k = order.shape[1]
    R = torch.gather(R, 1, order[..., None, None].expand(B, k, 3, 3))
    t = torch.gather(t, 1, order[..., None].expand(B, k, 3))
    return R, t, torch.gather(key, 1, order)
