"""The backward of the PnP layer by the implicit function theorem.

At the optimum ``y*`` the chart gradient ``g(xi = 0; theta)`` vanishes, so for any input
``theta`` in ``{x2d, x3d, K, weights}``: ``d xi*/d theta = -H^-1 d g / d theta`` with ``H`` the
exact chart Hessian. The output pose ``y = (log(exp(omega) R*), t* + tau)`` is a function of the
chart coordinates with Jacobian ``blockdiag(J_l^-1(rvec*), I)``, so with the incoming gradient
``v = dL/dy``:

    u = H^-1 [J_l^-T v_rot, v_t]          (one batched 6x6 solve)
    dL/dtheta = -d (u . g(theta)) / dtheta  (closed-form per-point expressions, O(B n))
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cost import point_terms


def inverse_left_jacobian_transpose_apply(rvec: Tensor, v: Tensor) -> Tensor:
    """``J_l^-T v`` with ``J_l^-1`` of SO(3) (``d rvec' / d omega`` for
    ``exp(rvec') = exp(omega) exp(rvec)``).

    ``J_l^-1 = I - [r]/2 + c [r]^2`` with ``c = 1/th^2 - (1 + cos th) / (2 th sin th)`` (its
    series below ``th^2 = 1e-6``), so ``J_l^-T v = v + (r x v)/2 + c r x (r x v)``.

    Args:
        rvec: ``(..., 3)``; v: ``(..., 3)``.
    Returns:
        ``(..., 3)``.
    """
    theta2 = (rvec * rvec).sum(-1, keepdim=True)
    small = theta2 < 1e-6
    th = torch.where(small, torch.ones_like(theta2), theta2).sqrt()
    coef_big = 1.0 / th**2 - (1.0 + torch.cos(th)) / (2.0 * th * torch.sin(th))
    coef_small = 1.0 / 12.0 + theta2 / 720.0 + theta2 * theta2 / 30240.0
    coef = torch.where(small, coef_small, coef_big)
    rv = torch.linalg.cross(rvec, v, dim=-1)
    return v + 0.5 * rv + coef * torch.linalg.cross(rvec, rv, dim=-1)


def solve_hessian(hess: Tensor, rhs: Tensor, rel_floor: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Solve ``H u = rhs`` for a batch of symmetric 6x6 Hessians, safely.

    Items whose Hessian is not positive definite with condition better than ``1/rel_floor``
    are solved with eigenvalues clamped to ``rel_floor * max|eig|`` (a regularised inverse), so
    gradients stay finite. Returns ``u (B, 6)`` and a ``(B,)`` mask of regularised items.
    """
    H = 0.5 * (hess + hess.transpose(-1, -2))
    L, info = torch.linalg.cholesky_ex(H)
    diag = torch.diagonal(L, dim1=-2, dim2=-1)
    ratio = (diag.amin(-1) / diag.amax(-1).clamp_min(1e-300)) ** 2
    good = (info == 0) & (ratio > rel_floor)
    u = torch.cholesky_solve(
        rhs[..., None], torch.where(good[:, None, None], L, torch.eye(6, dtype=H.dtype, device=H.device))
    )[..., 0]
    if bool(good.all()):
        return u, ~good
    H = torch.where(
        torch.isfinite(H).flatten(1).all(-1)[:, None, None], H, torch.eye(6, dtype=H.dtype, device=H.device)
    )
    evals, evecs = torch.linalg.eigh(H)
    floor = rel_floor * evals.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    inv = 1.0 / torch.maximum(evals.abs(), floor)
    u_reg = evecs @ (inv[..., None] * (evecs.transpose(-1, -2) @ rhs[..., None]))
    return torch.where(good[:, None], u, u_reg[..., 0]), ~good


def input_gradients(
    u: Tensor,
    R: Tensor,
    t: Tensor,
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
    keep: Tensor | None = None,
) -> tuple[Tensor | None, ...]:
    """``-d (u . g) / d theta`` in closed form, for ``theta`` in ``(x2d, x3d, K, weights)``.

    With the chart gradient ``g = 2 sum_i D_i^T s_i`` (``D_i = dX_i/dxi``, ``s_i = w_i J_i^T r_i``,
    ``J_i`` the projection Jacobian, ``r_i`` the residual), ``u . g = 2 sum_i w_i r_i . dp_i``
    where ``dp_i = J_i D_i u`` is the pixel motion of point ``i`` along ``u``. Its derivatives
    are per-point expressions (no autograd graph): x2d ``-2 w dp``, weights ``2 r . dp``, K
    through the entries of ``K / K[2,2]``, x3d ``2 R^T (Q q + s x u_rot)`` with ``q = D u`` and
    ``Q`` the point's 3x3 Hessian block (Gauss-Newton plus residual curvature).

    Args:
        u: ``(B, 6)``; R: ``(B, 3, 3)``; t: ``(B, 3)``; x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``;
        K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``; needs: which gradients to return;
        keep: ``(B,)`` bool, items whose gradients count (zeros for the others), default all.
    Returns:
        Gradients shaped like the inputs (summed over the batch for shared inputs), or None.
    """
    B = x2d.shape[0]
    P, P0, P1, P2, _, iz, a, b, ma, ru, rv, m00, m01, m11, c0, c1 = point_terms(R, t, x2d, x3d, K)
    k22 = K[..., 2, 2][..., None]
    w = weights.expand(B, -1)
    w0, w1, w2, t0, t1, t2 = (u[:, k : k + 1] for k in range(6))
    q0 = t0 + w1 * P2 - w2 * P1  # q = u_t + u_rot x P: motion of the point
    q1 = t1 + w2 * P0 - w0 * P2
    q2 = t2 + w0 * P1 - w1 * P0
    da = (q0 - a * q2) * iz
    db = (q1 - b * q2) * iz
    du = m00 * da + m01 * db  # pixel motion dp
    dv = m11 * db

    def reduce_like(g: Tensor, like: Tensor) -> Tensor:
        # An item whose gradient is not finite (a near-singular problem: weights of 1e-300, say)
        # contributes exact zeros, before any sum over the batch.
        ok = torch.isfinite(g).flatten(1).all(-1)
        if keep is not None:
            ok = ok & keep
        g = torch.where(ok.reshape(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g))
        return g.sum(0, keepdim=True) if like.shape[0] == 1 and B > 1 else g

    out: list[Tensor | None] = [None, None, None, None]
    if needs[0]:
        out[0] = reduce_like(torch.stack([2.0 * w * du, 2.0 * w * dv], -1), x2d)
    if needs[3]:
        out[3] = reduce_like(-2.0 * (ru * du + rv * dv), weights)
    if needs[2]:
        wdu, wdv = w * du, w * dv
        gm00 = -2.0 * (a * wdu + w * ru * da).sum(-1)
        gm01 = -2.0 * (b * wdu + w * ru * db).sum(-1)
        gm11 = -2.0 * (b * wdv + w * rv * db).sum(-1)
        gc0 = -2.0 * wdu.sum(-1)
        gc1 = -2.0 * wdv.sum(-1)
        k = k22[:, 0]
        zero = torch.zeros_like(gm00)
        dk22 = -(m00[:, 0] * gm00 + m01[:, 0] * gm01 + m11[:, 0] * gm11 + c0[:, 0] * gc0 + c1[:, 0] * gc1)
        gK = (
            torch.stack(
                [
                    torch.stack([gm00, gm01, gc0], -1),
                    torch.stack([zero, gm11, gc1], -1),
                    torch.stack([zero, zero, dk22], -1),
                ],
                -2,
            )
            / k[:, None, None]
        )
        out[2] = reduce_like(gK, K)
    if needs[1]:
        wru, wrv = w * ru, w * rv
        gu0, gu1, gu2 = m00 * iz, m01 * iz, -ma * iz
        gv1, gv2 = m11 * iz, -(m11 * b) * iz
        s0, s1, s2 = wru * gu0, wru * gu1 + wrv * gv1, wru * gu2 + wrv * gv2
        # residual curvature of the projection: the entries c02, c12, c22 of the 3x3 block
        p0, p1, iz2 = m00 * wru, m01 * wru + m11 * wrv, iz * iz
        c02, c12, c22 = -p0 * iz2, -p1 * iz2, 2.0 * (p0 * a + p1 * b) * iz2
        wdu, wdv = w * du, w * dv
        v0 = gu0 * wdu + c02 * q2 + (s1 * w2 - s2 * w1)
        v1 = gu1 * wdu + gv1 * wdv + c12 * q2 + (s2 * w0 - s0 * w2)
        v2 = gu2 * wdu + gv2 * wdv + c02 * q0 + c12 * q1 + c22 * q2 + (s0 * w1 - s1 * w0)
        v = torch.stack([v0, v1, v2], -2)  # Bx3xN
        out[1] = reduce_like(-2.0 * (v.transpose(-1, -2) @ R), x3d)
    return tuple(out)


def implicit_vjp(
    grad_pose: Tensor,
    rvec: Tensor,
    R: Tensor,
    t: Tensor,
    hess: Tensor,
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    needs: tuple[bool, bool, bool, bool],
    grad_R: Tensor | None = None,
    keep: Tensor | None = None,
) -> tuple[Tensor | None, ...]:
    """Gradients of a loss w.r.t. ``(x2d, x3d, K, weights)`` given ``dL/dpose`` (and ``dL/dR``).

    Written in differentiable tensor ops: with a graph-connected optimum and Hessian (as the
    layer's double backward passes them), autograd differentiates it exactly.

    Args:
        grad_pose: ``(B, 6)`` gradient of the loss w.r.t. the returned pose.
        rvec: ``(B, 3)`` returned rotation vectors.
        R: ``(B, 3, 3)`` rotation at the optimum.
        t: ``(B, 3)`` translation at the optimum.
        hess: ``(B, 6, 6)`` exact chart Hessian there.
        x2d: ``(B, n, 2)``.
        x3d: ``(B|1, n, 3)``.
        K: ``(B|1, 3, 3)``.
        weights: ``(B|1, n)``.
        needs: which of the four inputs need gradients.
        grad_R: ``(B, 3, 3)`` gradient of the loss w.r.t. the returned rotation matrix, or None.
        keep: ``(B,)`` bool, items whose gradients count (the others, and items whose gradient is
            not finite, get exact zeros, also in the sums over the batch of shared inputs).
    Returns:
        Gradients shaped like the inputs (None where not needed).
    """
    rot = inverse_left_jacobian_transpose_apply(rvec, grad_pose[:, :3])
    if grad_R is not None:
        # In the chart R = exp([w]_x) R*: dL/dw_a = <G, [e_a]_x R*>, the axial part of G R*^T.
        M = grad_R @ R.transpose(-1, -2)
        rot = rot + torch.stack([M[:, 2, 1] - M[:, 1, 2], M[:, 0, 2] - M[:, 2, 0], M[:, 1, 0] - M[:, 0, 1]], -1)
    rhs = torch.cat([rot, grad_pose[:, 3:]], -1)
    u, _ = solve_hessian(hess, rhs)
    return input_gradients(u, R, t, x2d, x3d, K, weights, needs, keep)


def robust_vjp(
    grad_pose: Tensor,
    rvec: Tensor,
    R: Tensor,
    t: Tensor,
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    loss_scale: Tensor,
    loss: str,
    needs: tuple[bool, ...],
    grad_R: Tensor | None = None,
    keep: Tensor | None = None,
    dist: Tensor | None = None,
) -> tuple[Tensor | None, ...]:
    """:func:`implicit_vjp` for a robust cost (and lens distortion), also w.r.t. ``loss_scale``
    (and ``dist``).

    ``u = H^-1 rhs`` with the robust cost's exact Hessian (its ``rho''`` term included), then
    ``-d (u . g) / d theta`` by one reverse pass through the closed-form chart gradient ``g``
    (:func:`bpnp.cost.cost_terms`): exact, and differentiable again when a double backward asks
    (``torch.is_grad_enabled()`` inside the backward).

    Args:
        as :func:`implicit_vjp`, plus loss_scale: ``(B|1, 1)``; loss: one of
        :data:`~bpnp.cost.LOSSES`; dist: ``(B|1, 5)`` or None (:func:`~bpnp.cost.distorted_cost_terms`);
        needs: six flags, for ``(x2d, x3d, K, weights, loss_scale, dist)``.
    Returns:
        Six gradients shaped like the inputs (None where not needed).
    """
    from .cost import cost_terms, distorted_cost_terms

    rot = inverse_left_jacobian_transpose_apply(rvec, grad_pose[:, :3])
    if grad_R is not None:
        M = grad_R @ R.transpose(-1, -2)
        rot = rot + torch.stack([M[:, 2, 1] - M[:, 1, 2], M[:, 0, 2] - M[:, 2, 0], M[:, 1, 0] - M[:, 0, 1]], -1)
    rhs = torch.cat([rot, grad_pose[:, 3:]], -1)
    create = torch.is_grad_enabled()
    inputs = (x2d, x3d, K, weights, loss_scale, dist)
    needs = tuple(needs) + (False,) * (6 - len(needs))
    if create:
        return _robust_vjp_differentiable(rhs, R, t, inputs, loss, needs, keep)
    with torch.enable_grad():
        leaves = [
            x if x is None or (create and x.requires_grad) else x.detach().requires_grad_(bool(need))
            for x, need in zip(inputs, needs)
        ]
        Rg, tg = (R, t) if create else (R.detach(), t.detach())
        if dist is None:
            ct = cost_terms(Rg, tg, *leaves[:4], hessian=True, loss=loss, loss_scale=leaves[4])
        else:
            ct = distorted_cost_terms(
                Rg, tg, *leaves[:4], leaves[5], hessian=True, loss=loss, loss_scale=leaves[4], create_graph=True
            )
        u, _ = solve_hessian(ct.hess if create else ct.hess.detach(), rhs)
        ok = torch.isfinite(u).all(-1) & torch.isfinite(ct.grad).all(-1)
        if keep is not None:
            ok = ok & keep
        u = torch.where(ok[:, None], u, torch.zeros_like(u))
        g = torch.where(ok[:, None], ct.grad, torch.zeros_like(ct.grad))
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        got = torch.autograd.grad(g, wanted, grad_outputs=-u, create_graph=create, allow_unused=True)
    out: list[Tensor | None] = []
    it = iter(got)
    for x, need in zip(inputs, needs):
        if not need:
            out.append(None)
            continue
        gx = next(it)
        out.append(torch.zeros_like(x) if gx is None else torch.nan_to_num(gx, nan=0.0, posinf=0.0, neginf=0.0))
    return tuple(out)


def _robust_vjp_differentiable(rhs, R, t, inputs, loss, needs, keep):
    """:func:`robust_vjp` as a differentiable function of the inputs and the optimum (for a double
    backward). The partial derivatives w.r.t. the inputs hold ``R, t`` fixed: ``torch.func.vjp``
    differentiates only its primals, while ``R, t`` (outputs of the layer) stay connected to the
    outer graph, so a second backward runs through them (and the Hessian) exactly."""
    from .cost import cost_terms, distorted_cost_terms_composable

    dist = inputs[5]

    def terms(*full, hessian):
        if dist is None:
            return cost_terms(R, t, *full[:4], hessian=hessian, loss=loss, loss_scale=full[4])
        return distorted_cost_terms_composable(R, t, *full[:4], full[5], hessian=hessian, loss=loss, loss_scale=full[4])

    u, _ = solve_hessian(terms(*inputs, hessian=True).hess, rhs)
    ok = torch.isfinite(u).all(-1)
    if keep is not None:
        ok = ok & keep
    u = torch.where(ok[:, None], u, torch.zeros_like(u))
    idx = [i for i in range(6) if needs[i] and inputs[i] is not None]

    def chart_gradient(*primals):
        full = list(inputs)
        for i, x in zip(idx, primals):
            full[i] = x
        return terms(*full, hessian=False).grad

    _, pullback = torch.func.vjp(chart_gradient, *[inputs[i] for i in idx])
    got = dict(zip(idx, pullback(-u)))
    return tuple(got.get(i) for i in range(6))
