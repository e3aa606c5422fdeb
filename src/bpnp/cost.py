"""The PnP cost and its closed-form derivatives in a local pose chart.

The cost of a pose ``(R, t)`` is ``f = sum_i w_i ||pi(R X_i + t; K) - x_i||^2`` (pixels).
Derivatives are taken with respect to a local perturbation ``xi = (omega, tau)`` that acts as
``R <- exp([omega]_x) R``, ``t <- t + tau``; at ``xi = 0`` the first and second derivatives of
``f`` are given here in closed form (no autograd), per point and summed, O(B n) work:

- ``grad``: ``df/dxi`` (B, 6);
- ``hess``: the exact ``d2f/dxi2`` (B, 6, 6): Gauss-Newton term plus the residual curvature
  of the projection and of the rotation.

The per-point projection and residual (``_projection``) is the one kernel the torch solver, the
cost and the backward (:mod:`bpnp.implicit`, through :func:`point_terms`) share; the C solver
(``solvers/native_pnp.c``) is its translation. :func:`cost_terms` is written for a GPU: about 40
tensor operations (kernel launches) for the exact Hessian of any batch. Everything is written
with differentiable tensor ops: the backward's double-backward differentiates :func:`cost_terms`
(the Hessian) through autograd, and the tests check the closed-form backward against autograd
through :func:`gradient_in_chart`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor


class CostTerms(NamedTuple):
    """Cost and its chart derivatives for a batch of poses."""

    cost: Tensor  # (B,)
    grad: Tensor  # (B, 6)
    hess: Tensor | None  # (B, 6, 6) exact, or None
    min_depth: Tensor  # (B,) smallest camera-frame depth among points with weight > 0


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
    P, depth, iz, ab, M, centre, pm, r = _projection(R, t, x2d, x3d, K, min_depth)
    P0, P1, P2 = P.unbind(-2)
    a, b = ab.unbind(-2)
    ru, rv = r.unbind(-2)
    m00, m01, m11 = M[:, 0, 0:1], M[:, 0, 1:2], M[:, 1, 1:2]
    return PointTerms(P, P0, P1, P2, depth, iz, a, b, pm[:, 0], ru, rv, m00, m01, m11, centre[:, 0], centre[:, 1])


class _Projection(NamedTuple):
    P: Tensor  # (B, 3, n) R X, without t
    depth: Tensor  # (B, n) z of R X + t (unclamped)
    iz: Tensor  # (B, n) 1 / depth (clamped to min_depth)
    ab: Tensor  # (B, 2, n) normalised image coordinates
    M: Tensor  # (B|1, 2, 2) K[:2, :2] / K[2, 2]
    centre: Tensor  # (B|1, 2, 1) K[:2, 2] / K[2, 2]
    pm: Tensor  # (B, 2, n) M ab
    r: Tensor  # (B, 2, n) pixel residuals (projection - x2d)


def _projection(R: Tensor, t: Tensor, x2d: Tensor, x3d: Tensor, K: Tensor, min_depth: Tensor | float) -> _Projection:
    """The one projection and residual kernel: :func:`point_terms` and :func:`cost_terms` read it."""
    P = R @ x3d.transpose(-1, -2)  # Bx3xN: R X, the lever arm of the rotation
    depth = P[:, 2] + t[:, 2:3]
    z = depth if isinstance(min_depth, float) and min_depth == 0.0 else torch.maximum(depth, min_depth)
    iz = z.reciprocal()
    ab = (P[:, :2] + t[:, :2, None]) * iz[:, None]
    M = K[..., :2, :2].triu() / K[..., 2:, 2:]  # K[1, 0] is not read: K is upper triangular
    centre = K[..., :2, 2:] / K[..., 2:, 2:]
    pm = M @ ab
    return _Projection(P, depth, iz, ab, M, centre, pm, (pm + centre) - x2d.transpose(-1, -2))


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
    # Structure of arrays: per-point quantities are (B, k, n) tensors with the points last, and
    # every sum over points is one batched matmul; the whole evaluation is ~45 tensor operations
    # for any batch (each a kernel launch on a GPU).
    P, depth, iz, _, M, _, pm, r = _projection(R, t, x2d, x3d, K, min_depth)
    w0 = weights[:, None, :]
    seen_depth = depth.masked_fill(weights <= 0, torch.finfo(depth.dtype).max).amin(-1)
    if loss == "l2":
        w = w0
    else:
        rho, d1, d2 = robust_loss((r * r).sum(1), loss, loss_scale)
        w = w0 * d1[:, None]
    wr = w * r
    cost = (wr * r).sum((1, 2)) if loss == "l2" else (weights * rho).sum(-1)
    # G[:, :, k] = d pixel_k / d(R X + t) and J[:, :, k] = d pixel_k / d xi = [P x G_k, G_k].
    G = torch.cat([M.transpose(-1, -2)[..., None] * iz[:, None, None], (pm * -iz[:, None])[:, None]], 1)  # Bx3x2xN
    J = torch.cat([torch.linalg.cross(P[:, :, None], G, dim=1), G], 1).flatten(2)  # Bx6x2N
    grad = 2.0 * (J @ wr.flatten(1)[..., None])[..., 0]
    if not hessian:
        return CostTerms(cost, grad, None, seen_depth)
    gn = (J * w.expand(-1, 2, -1).flatten(1)[:, None]) @ J.transpose(-1, -2)  # Gauss-Newton / 2
    if loss != "l2":
        # rho'' term: ds_i/dxi = 2 J_i^T r_i, so (1/2) sum w rho'' (2 J^T r)(2 J^T r)^T.
        Jr = (J.unflatten(2, (2, -1)) * r[:, None]).sum(2)  # Bx6xN
        gn = gn + (Jr * (2.0 * weights * d2)[:, None]) @ Jr.transpose(-1, -2)
    if hessian == "gauss-newton":
        return CostTerms(cost, grad, 2.0 * gn, seen_depth)

    # Residual curvature. With s = sum_k G_k w r_k (d cost / d(R X + t), halved), the weighted
    # second derivatives of the pixels have three non-zero entries, (c02, c12, c22 / 2) = -s / z;
    # with j2 = d depth / d xi = [P x e2, e2] = (P1, -P0, 0, 0, 0, 1) their pull-back is
    # sum j2 b^T + b j2^T, b = [P x c, c], and sum j2 b^T = D sum (P0, P1, 1) b^T. The rotation
    # adds sym(s P^T) - (s.P) I to its block.
    s = (G * wr[:, None]).sum(2)  # Bx3xN
    c = s * iz[:, None]
    b = torch.cat([torch.linalg.cross(P, c, dim=1), c], 1)  # Bx6xN, the negated b
    depth_map, rot_block = _hessian_constants(P.dtype, P.device)
    j2_b = depth_map @ (torch.nn.functional.pad(P[:, :2], (0, 0, 0, 1), value=1.0) @ b.transpose(-1, -2))
    sP = s @ P.transpose(-1, -2)  # Bx3x3
    half = 0.5 * gn - j2_b + torch.nn.functional.pad(0.5 * sP, (0, 3, 0, 3))
    hess = half + half.transpose(-1, -2) - sP.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] * rot_block
    return CostTerms(cost, grad, 2.0 * hess, seen_depth)


@functools.cache
def _hessian_constants(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Constants of :func:`cost_terms`' Hessian on ``device`` (made once): ``D (6, 3)`` with
    ``D (P0, P1, 1) = (P1, -P0, 0, 0, 0, 1) = d depth / d xi``, and the ``(6, 6)`` identity of the
    rotation block."""
    D = torch.zeros(6, 3, dtype=dtype, device=device)
    D[0, 1], D[1, 0], D[5, 2] = 1.0, -1.0, 1.0
    rot = torch.zeros(6, 6, dtype=dtype, device=device)
    rot[:3, :3] = torch.eye(3, dtype=dtype, device=device)
    return D, rot


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
