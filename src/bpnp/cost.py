"""The PnP cost and its closed-form derivatives in a local pose chart.

The cost of a pose ``(R, t)`` is ``f = sum_i w_i ||pi(R X_i + t; K) - x_i||^2`` (pixels).
Derivatives are taken with respect to a local perturbation ``xi = (omega, tau)`` that acts as
``R <- exp([omega]_x) R``, ``t <- t + tau``; at ``xi = 0`` the first and second derivatives of
``f`` are given here in closed form (no autograd), per point and summed, O(B n) work:

- ``grad``: ``df/dxi`` (B, 6);
- ``hess``: the exact ``d2f/dxi2`` (B, 6, 6): Gauss-Newton term plus the residual curvature
  of the projection and of the rotation.

The per-point projection and residual (:func:`point_terms`) is the one kernel the torch solver,
the cost and the backward (:mod:`bpnp.implicit`) share; the C solver (``solvers/native_pnp.c``)
is its translation. Everything is written with differentiable tensor ops: the backward's
double-backward differentiates :func:`cost_terms` (the Hessian) through autograd, and the tests
check the closed-form backward against autograd through :func:`gradient_in_chart`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class CostTerms(NamedTuple):
    """Cost and its chart derivatives for a batch of poses."""

    cost: Tensor  # (B,)
    grad: Tensor  # (B, 6)
    hess: Tensor | None  # (B, 6, 6) exact, or None
    min_depth: Tensor  # (B,) smallest camera-frame depth among points with weight > 0


def camera_coefficients(K: Tensor) -> tuple[Tensor, ...]:
    """Entries ``m00, m01, m11, c0, c1`` of ``K / K[2,2]`` used by the projection, each ``(B|1, 1)``."""
    k22 = K[..., 2, 2]
    return tuple((K[..., i, j] / k22)[..., None] for i, j in ((0, 0), (0, 1), (1, 1), (0, 2), (1, 2)))


class PointTerms(NamedTuple):
    """Per-point projection quantities at a pose, every one ``(B, n)`` (camera entries ``(B|1, 1)``).

    The one projection/residual kernel: the solver's cost and derivatives
    (:func:`cost_terms`) and the backward (:func:`bpnp.implicit.input_gradients`) read it.
    """

    P: Tensor  # (B, 3, n) R X, without t; P0, P1, P2 are its rows
    P0: Tensor
    P1: Tensor
    P2: Tensor
    depth: Tensor  # z of R X + t (unclamped)
    iz: Tensor  # 1 / depth (clamped to min_depth)
    a: Tensor  # normalised image coordinates x/z, y/z
    b: Tensor
    ma: Tensor  # m00 a + m01 b
    ru: Tensor  # pixel residuals (projection - x2d)
    rv: Tensor
    m00: Tensor
    m01: Tensor
    m11: Tensor
    c0: Tensor
    c1: Tensor


def point_terms(
    R: Tensor, t: Tensor, x2d: Tensor, x3d: Tensor, K: Tensor, min_depth: Tensor | float = 0.0
) -> PointTerms:
    """Projection and residual of every point at the poses ``(R, t)``.

    Args:
        R: ``(B, 3, 3)``; t: ``(B, 3)``; x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``;
        min_depth: depths below it are clamped to it (scalar or ``(B, 1)``).
    Returns:
        :class:`PointTerms`.
    """
    P = R @ x3d.transpose(-1, -2)  # Bx3xN
    P0, P1, P2 = P.unbind(-2)
    depth = P2 + t[:, 2:3]
    X2 = depth if isinstance(min_depth, float) and min_depth == 0.0 else torch.maximum(depth, min_depth)
    m00, m01, m11, c0, c1 = camera_coefficients(K)
    iz = 1.0 / X2
    a = (P0 + t[:, 0:1]) * iz
    b = (P1 + t[:, 1:2]) * iz
    ma = m00 * a + m01 * b
    ru = ma + c0 - x2d[..., 0]
    rv = m11 * b + c1 - x2d[..., 1]
    return PointTerms(P, P0, P1, P2, depth, iz, a, b, ma, ru, rv, m00, m01, m11, c0, c1)


def gradient_in_chart(R: Tensor, t: Tensor, x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor) -> Tensor:
    """``df/dxi`` at ``xi = 0``, differentiable in ``x2d, x3d, K, weights`` (and R, t).

    Args:
        R: ``(B, 3, 3)``; t: ``(B, 3)``; x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``;
        K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``.
    Returns:
        ``(B, 6)`` gradient ``[d/domega, d/dtau]``.
    """
    return cost_terms(R, t, x2d, x3d, K, weights, hessian=False).grad


LOSSES = ("l2", "huber", "cauchy")


def robust_loss(s: Tensor, loss: str, scale: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """``rho(s)``, ``rho'(s)`` and ``rho''(s)`` of a loss of the squared residual ``s``.

    The conventions of Ceres' loss functions, with ``c = scale`` (the residual in pixels where
    the loss leaves the quadratic): ``"l2"``: ``rho = s``; ``"huber"``: ``s`` for ``s <= c^2``,
    ``2 c sqrt(s) - c^2`` beyond; ``"cauchy"``: ``c^2 log(1 + s / c^2)``. Each has ``rho(s) ~ s``
    for small ``s``, so a robust cost equals the least-squares one on inliers.

    Args:
        s: ``(B, n)`` squared residual norms (>= 0); loss: one of :data:`LOSSES`;
        scale: ``(B|1, 1)`` tensor or a float, > 0.
    Returns:
        Three ``(B, n)`` tensors.
    """
    if loss == "l2":
        one = torch.ones_like(s)
        return s, one, torch.zeros_like(s)
    c2 = scale * scale
    if loss == "huber":
        inside = s <= c2
        # sqrt of the clamped s: the branch not taken must not produce inf/NaN gradients.
        root = torch.where(inside, c2 * torch.ones_like(s), s).sqrt()
        rho = torch.where(inside, s, 2.0 * scale * root - c2)
        d1 = torch.where(inside, torch.ones_like(s), scale / root)
        d2 = torch.where(inside, torch.zeros_like(s), -0.5 * d1 / (root * root))
        return rho, d1, d2
    if loss == "cauchy":
        q = 1.0 + s / c2
        d1 = 1.0 / q
        return c2 * torch.log1p(s / c2), d1, -d1 * d1 / c2
    raise ValueError(f"unknown loss {loss!r}")


def cost_terms(
    R: Tensor,
    t: Tensor,
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    hessian: bool | str = True,
    min_depth: Tensor | float = 0.0,
    loss: str = "l2",
    loss_scale: Tensor | float = 1.0,
) -> CostTerms:
    """Cost, chart gradient and exact chart Hessian (or its Gauss-Newton part), in closed form.

    Points whose depth falls below ``min_depth`` are clamped to it (so a pose with points behind
    the camera gets a large finite cost rather than NaN); callers see this in ``min_depth``.
    With a robust ``loss`` the cost is ``sum_i w_i rho(s_i)`` (``s_i`` the squared residual):
    its gradient is the least-squares one with weights ``w rho'(s)``, and its exact Hessian adds
    ``sum_i w_i rho''(s_i) ds_i ds_i^T`` to that (IRLS drops this term; the backward needs it).

    Args:
        R: ``(B, 3, 3)``; t: ``(B, 3)``; x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``;
        K: ``(B|1, 3, 3)``; weights: ``(B|1, n)``; min_depth: scalar or ``(B, 1)``;
        hessian: True (exact), ``"gauss-newton"`` (without the residual curvature) or False.
        loss: one of :data:`LOSSES`; loss_scale: ``(B|1, 1)`` or a float, in the units of x2d.
    Returns:
        :class:`CostTerms`.
    """
    # Structure of arrays: every per-point quantity is a contiguous (B, n) tensor, which keeps
    # the elementwise work on fast paths; the sums over points are batched matmuls.
    pt = point_terms(R, t, x2d, x3d, K, min_depth)
    P, P0, P1, P2, depth, iz, a, b, ma, ru, rv, m00, m01, m11, c0, c1 = pt
    w0 = weights.expand(depth.shape)
    big = torch.finfo(depth.dtype).max
    seen_depth = torch.where(w0 > 0, depth, torch.full_like(depth, big)).amin(-1)
    if loss == "l2":
        w = w0
    else:
        rho, d1, d2 = robust_loss(ru * ru + rv * rv, loss, loss_scale)
        w = w0 * d1
    wru = w * ru
    wrv = w * rv
    cost = (wru * ru + wrv * rv).sum(-1) if loss == "l2" else (w0 * rho).sum(-1)
    # d pixel / d X rows (gu, gv), and d pixel / d xi = [P x g, g].
    gu0, gu1, gu2 = m00 * iz, m01 * iz, -ma * iz
    gv1, gv2 = m11 * iz, -(m11 * b) * iz
    zero = torch.zeros_like(iz)
    J = torch.stack(
        [
            P1 * gu2 - P2 * gu1,
            P2 * gu0 - P0 * gu2,
            P0 * gu1 - P1 * gu0,
            gu0,
            gu1,
            gu2,
            P1 * gv2 - P2 * gv1,
            -P0 * gv2,
            P0 * gv1,
            zero,
            gv1,
            gv2,
        ],
        -2,
    )  # Bx12xN
    Jt = J.reshape(J.shape[0], 2, 6, -1).transpose(1, 2).reshape(J.shape[0], 6, -1)  # Bx6x2N
    wr = torch.cat([wru, wrv], -1)  # Bx2N
    grad = 2.0 * (Jt @ wr[..., None])[..., 0]
    if not hessian:
        return CostTerms(cost, grad, None, seen_depth)
    hess = (Jt * torch.cat([w, w], -1)[:, None, :]) @ Jt.transpose(-1, -2)  # Gauss-Newton / 2
    if loss != "l2":
        # rho'' term: ds_i/dxi = 2 J_i^T r_i, so (1/2) sum w rho'' (2 J^T r)(2 J^T r)^T.
        n = depth.shape[-1]
        G = Jt[..., :n] * ru[:, None] + Jt[..., n:] * rv[:, None]  # Bx6xN
        hess = hess + (G * (2.0 * w0 * d2)[:, None]) @ G.transpose(-1, -2)
    if hessian == "gauss-newton":
        return CostTerms(cost, grad, 2.0 * hess, seen_depth)

    # Residual curvature. Of d2 pixel/dX2 (weighted by the residuals) only three entries are
    # non-zero: c02, c12, c22; with j_k = dX_k/dxi = [P x e_k, e_k] its pull-back is
    # sum (j2 b^T + b j2^T), b = c02 j0 + c12 j1 + c22/2 j2: one batched matmul.
    q0 = m00 * wru  # (M^T r) times the weight, M = K[:2,:2]/k22
    q1 = m01 * wru + m11 * wrv
    iz2 = iz * iz
    c02 = -q0 * iz2
    c12 = -q1 * iz2
    c22h = (q0 * a + q1 * b) * iz2  # c22 / 2
    j2 = torch.stack([P1, -P0, zero, zero, zero, torch.ones_like(iz)], -2)  # Bx6xN
    bvec = torch.stack([-c12 * P2 + c22h * P1, c02 * P2 - c22h * P0, -c02 * P1 + c12 * P0, c02, c12, c22h], -2)
    curv = j2 @ bvec.transpose(-1, -2)  # Bx6x6
    # Rotation curvature: sym(s P^T) - (s.P) I in the rotation block, s = w (dpix/dX)^T r.
    s = torch.stack([wru * gu0, wru * gu1 + wrv * gv1, wru * gu2 + wrv * gv2], -2)  # Bx3xN
    sP = s @ P.transpose(-1, -2)  # Bx3x3
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    rot = 0.5 * (sP + sP.transpose(-1, -2)) - sP.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * eye
    hess = hess + curv + curv.transpose(-1, -2)
    hess = torch.cat([torch.cat([hess[..., :3, :3] + rot, hess[..., :3, 3:]], -1), hess[..., 3:, :]], -2)
    hess = 2.0 * hess
    return CostTerms(cost, grad, hess, seen_depth)


def cost_only(R: Tensor, t: Tensor, x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor) -> Tensor:
    """Weighted squared reprojection error ``(B,)`` of poses ``R (B,3,3), t (B,3)``."""
    return cost_terms(R, t, x2d, x3d, K, weights, hessian=False).cost


def distorted_cost(
    xi: Tensor,
    R: Tensor,
    t: Tensor,
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    dist: Tensor,
    loss_scale: Tensor | float,
    min_depth: Tensor | float,
    loss: str,
) -> Tensor:
    """Cost with lens distortion at ``(I + [w] + [w]^2/2) R, t + tau`` for ``xi = (w, tau)``.

    Batched (``xi (B, 6), R (B, 3, 3), t (B, 3), x2d (B, n, 2), x3d (B|1, n, 3), K (B|1, 3, 3),
    weights (B|1, n), dist (B|1, 5)``, scale and floor ``(B|1, 1)`` or floats: returns ``(B,)``) or
    one problem (the same without the leading dimension, ``dist (5,)``: returns a scalar). Points
    nearer than ``min_depth`` are clamped to it.
    """
    Rx = _chart_rotation(xi[..., :3], R)
    P = x3d @ Rx.transpose(-1, -2) + (t + xi[..., 3:])[..., None, :]
    r = _camera_pixels(P, K, dist, min_depth) - x2d
    return (weights * robust_loss((r * r).sum(-1), loss, loss_scale)[0]).sum(-1)


def _chart_rotation(w: Tensor, R: Tensor) -> Tensor:
    """``(I + [w] + [w]^2 / 2) R``: the second-order chart (the exponential map to second order at 0)."""
    from .geometry import skew

    S = skew(w)
    return R + S @ R + 0.5 * (S @ S) @ R


def _camera_pixels(P: Tensor, K: Tensor, dist: Tensor | None, min_depth: Tensor | float = 0.0) -> Tensor:
    """``(..., n, 2)`` pixels of camera-frame points ``P (..., n, 3)`` through OpenCV's lens model
    (``dist`` or None) and ``K (..., 3, 3)``; depths below ``min_depth`` are clamped to it."""
    from .geometry import distort

    z = P[..., 2] if isinstance(min_depth, float) and min_depth == 0.0 else torch.maximum(P[..., 2], min_depth)
    xy = P[..., :2] / z[..., None]
    if dist is not None:
        xy = distort(xy, dist)
    k22 = K[..., 2:3, 2:3]
    return xy @ (K[..., :2, :2] / k22).transpose(-1, -2) + (K[..., :2, 2] / K[..., 2:3, 2])[..., None, :]


def _nearest_weighted_depth(R: Tensor, t: Tensor, x3d: Tensor, weights: Tensor) -> Tensor:
    """``(B,)`` smallest camera-frame depth among the points of positive weight (detached)."""
    with torch.no_grad():
        depth = (x3d @ R.transpose(-1, -2))[..., 2] + t[:, None, 2]
        w = weights.expand(depth.shape)
        return torch.where(w > 0, depth, torch.full_like(depth, torch.finfo(depth.dtype).max)).amin(-1)


def distorted_cost_terms(
    R: Tensor,
    t: Tensor,
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    dist: Tensor,
    hessian: bool = True,
    min_depth: Tensor | float = 0.0,
    loss: str = "l2",
    loss_scale: Tensor | float = 1.0,
    create_graph: bool = False,
) -> CostTerms:
    """:func:`cost_terms` for a camera with OpenCV's lens distortion, by automatic differentiation.

    The pixel of a point is ``K [distort(x/z, y/z; dist), 1]`` (:func:`bpnp.geometry.distort`).
    The chart derivatives are taken by reverse passes through a second-order chart
    ``R <- (I + [w] + [w]^2 / 2) R, t <- t + tau`` (it agrees with the exponential map to second
    order at ``xi = 0``, so gradient and Hessian there are exact): one pass for the gradient, six
    for the Hessian.

    Args:
        as :func:`cost_terms`, plus dist: ``(B|1, 5)`` coefficients ``(k1, k2, p1, p2, k3)``;
        create_graph: keep the graph from the inputs to the gradient and Hessian (the backward
            differentiates the gradient once more); otherwise every output is detached.
    Returns:
        :class:`CostTerms` (``hess`` None when ``hessian`` is False).
    """
    B = R.shape[0]
    with torch.enable_grad():
        xi = torch.zeros(B, 6, dtype=R.dtype, device=R.device, requires_grad=True)
        cost = distorted_cost(xi, R, t, x2d, x3d, K, weights, dist, loss_scale, min_depth, loss)
        (grad,) = torch.autograd.grad(cost.sum(), xi, create_graph=True)
        hess = None
        if hessian:
            rows = [
                torch.autograd.grad(grad[:, k].sum(), xi, retain_graph=True, create_graph=create_graph)[0]
                for k in range(6)
            ]
            hess = torch.stack(rows, 1)
    seen_depth = _nearest_weighted_depth(R, t, x3d, weights)
    if not create_graph:
        cost, grad = cost.detach(), grad.detach()
        hess = None if hess is None else hess.detach()
    return CostTerms(cost, grad, hess, seen_depth)


def distorted_cost_terms_composable(
    R: Tensor,
    t: Tensor,
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    dist: Tensor,
    hessian: bool = True,
    min_depth: Tensor | float = 0.0,
    loss: str = "l2",
    loss_scale: Tensor | float = 1.0,
) -> CostTerms:
    """:func:`distorted_cost_terms` by ``torch.func`` (slower; for the double backward).

    The pixel of a point is ``K [distort(x/z, y/z; dist), 1]`` (:func:`bpnp.geometry.distort`).
    The chart derivatives are those of a second-order chart ``R <- (I + [w] + [w]^2 / 2) R,
    t <- t + tau`` (it agrees with the exponential map to second order at ``xi = 0``, so gradient
    and Hessian there are exact), per problem (``vmap`` of ``grad`` and ``hessian``). The outputs
    are differentiable functions of every input (``torch.func`` composes with autograd): the
    backward and its double backward differentiate them.

    Args:
        as :func:`cost_terms`, plus dist: ``(B|1, 5)`` coefficients ``(k1, k2, p1, p2, k3)``.
    Returns:
        :class:`CostTerms` (``hess`` None when ``hessian`` is False).
    """
    B, n = x2d.shape[:2]
    dt = x2d.dtype
    floor = torch.as_tensor(min_depth, dtype=dt, device=x2d.device).reshape(-1)
    floor = floor if floor.numel() > 1 else floor.reshape(())
    scale = torch.as_tensor(loss_scale, dtype=dt, device=x2d.device).reshape(-1, 1)
    batched = [R, t, x2d, x3d, K, weights.expand(-1, n) if weights.dim() == 2 else weights, dist, scale, floor]
    args, dims = [], []
    for x in batched:
        shared = x.dim() == 0 or x.shape[0] == 1 and B > 1 or (x is floor and x.dim() == 0)
        args.append(x[0] if shared and x.dim() > 0 else x)
        dims.append(None if shared else 0)
    xi = torch.zeros(B, 6, dtype=dt, device=x2d.device)

    def cost_fn(xi_, *a):
        return distorted_cost(xi_, *a, loss)

    in_dims = (0, *dims)
    cost = torch.func.vmap(cost_fn, in_dims=in_dims)(xi, *args)
    grad = torch.func.vmap(torch.func.grad(cost_fn), in_dims=in_dims)(xi, *args)
    hess = torch.func.vmap(torch.func.hessian(cost_fn), in_dims=in_dims)(xi, *args) if hessian else None
    seen_depth = _nearest_weighted_depth(R, t, x3d, weights)
    return CostTerms(cost, grad, hess, seen_depth)


def residual_jacobians(
    R: Tensor, t: Tensor, x2d: Tensor, x3d: Tensor, K: Tensor, dist: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Each point's pixel residual ``(B, n, 2)`` and its chart Jacobian ``(B, n, 2, 6)`` at
    ``xi = 0``, with or without lens distortion.

    Two reverse passes with a chart of its own for every point (point ``i``'s residual reads
    only ``xi_i``), through the second-order chart of :func:`distorted_cost`.

    Args:
        R: ``(B, 3, 3)``; t: ``(B, 3)``; x2d: ``(B, n, 2)``; x3d: ``(B|1, n, 3)``; K: ``(B|1, 3, 3)``;
        dist: ``(B|1, 5)`` or None.
    """
    B, n = x2d.shape[:2]
    with torch.enable_grad():
        xi = torch.zeros(B, n, 6, dtype=R.dtype, device=R.device, requires_grad=True)
        Rx = _chart_rotation(xi[..., :3], R[:, None])  # BxNx3x3
        P = (Rx @ x3d.expand(B, n, 3)[..., None])[..., 0] + t[:, None] + xi[..., 3:]
        r = _camera_pixels(P, K, dist) - x2d
        rows = [torch.autograd.grad(r[..., k].sum(), xi, retain_graph=k == 0)[0] for k in range(2)]
    return r.detach(), torch.stack(rows, -2)
