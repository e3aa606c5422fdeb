"""The backward of the PnP layer by the implicit function theorem.

At the optimum ``y*`` the chart gradient ``g(xi = 0; theta)`` vanishes, so for any input
``theta`` in ``{x2d, x3d, K, weights}``: ``d xi*/d theta = -H^-1 d g / d theta`` with ``H`` the
exact chart Hessian. The output pose ``y = (log(exp(omega) R*), t* + tau)`` is a function of the
chart coordinates with Jacobian ``blockdiag(J_l^-1(rvec*), I)``, so with the incoming gradient
``v = dL/dy``:

    u = H^-1 [J_l^-T v_rot, v_t]          (one batched 6x6 solve)
    dL/dtheta = -d (u . g(theta)) / dtheta  (one vector-Jacobian product, O(B n))
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cost import gradient_in_chart
from .geometry import skew


def inverse_left_jacobian(rvec: Tensor) -> Tensor:
    """``J_l^-1`` of SO(3): ``d rvec' / d omega`` for ``exp(rvec') = exp(omega) exp(rvec)``.

    Args:
        rvec: ``(..., 3)``.
    Returns:
        ``(..., 3, 3)``.
    """
    theta2 = (rvec * rvec).sum(-1)
    small = theta2 < 1e-6
    th = torch.where(small, torch.ones_like(theta2), theta2).sqrt()
    coef_big = 1.0 / th**2 - (1.0 + torch.cos(th)) / (2.0 * th * torch.sin(th))
    coef_small = 1.0 / 12.0 + theta2 / 720.0 + theta2 * theta2 / 30240.0
    coef = torch.where(small, coef_small, coef_big)[..., None, None]
    k = skew(rvec)
    eye = torch.eye(3, dtype=rvec.dtype, device=rvec.device)
    return eye - 0.5 * k + coef * (k @ k)


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
    u = torch.cholesky_solve(rhs[..., None], torch.where(good[:, None, None], L, torch.eye(6, dtype=H.dtype, device=H.device)))[..., 0]
    if bool(good.all()):
        return u, ~good
    evals, evecs = torch.linalg.eigh(H)
    floor = rel_floor * evals.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    inv = 1.0 / torch.maximum(evals.abs(), floor)
    u_reg = evecs @ (inv[..., None] * (evecs.transpose(-1, -2) @ rhs[..., None]))
    return torch.where(good[:, None], u, u_reg[..., 0]), ~good


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
) -> tuple[Tensor | None, ...]:
    """Gradients of a loss w.r.t. ``(x2d, x3d, K, weights)`` given ``dL/dpose``.

    Args:
        grad_pose: ``(B, 6)``; rvec: ``(B, 3)`` returned rotation vectors; R, t: ``(B,3,3)``,
        ``(B,3)`` the optimum; hess: ``(B,6,6)`` exact chart Hessian; x2d ``(B,n,2)``,
        x3d ``(B|1,n,3)``, K ``(B|1,3,3)``, weights ``(B|1,n)``; needs: which inputs need grads.
    Returns:
        Gradients shaped like the inputs (None where not needed).
    """
    rhs = torch.cat(
        [(inverse_left_jacobian(rvec).transpose(-1, -2) @ grad_pose[:, :3, None])[..., 0],
         grad_pose[:, 3:]], -1)
    u, _ = solve_hessian(hess, rhs)
    inputs = [x.detach().requires_grad_(need) for x, need in zip((x2d, x3d, K, weights), needs)]
    with torch.enable_grad():
        g = gradient_in_chart(R, t, inputs[1], inputs[0], inputs[2], inputs[3])
        wanted = [x for x, need in zip(inputs, needs) if need]
        grads = torch.autograd.grad((g * u).sum(), wanted, allow_unused=True)
    it = iter(grads)
    out = []
    for x, need in zip(inputs, needs):
        if not need:
            out.append(None)
            continue
        gx = next(it)
        out.append(torch.zeros_like(x) if gx is None else -gx)
    return tuple(out)
