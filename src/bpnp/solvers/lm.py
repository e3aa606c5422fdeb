"""Batched Levenberg-Marquardt with the exact Hessian, on a manifold chart.

The loop is generic: ``evaluate(state)`` returns the cost, the chart gradient and Hessian of
every batch item, ``retract(state, step)`` moves along the chart. Every item carries its own
damping and stops on its own (masked updates, no Python loop over the batch); the loop ends
when all items have stopped or ``max_iter`` is reached. With the exact Hessian the final
iterations are Newton steps, which converge quadratically to float64 precision.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

State = Sequence[Tensor]


class LMResult(NamedTuple):
    state: tuple[Tensor, ...]
    cost: Tensor  # (B,)
    grad: Tensor  # (B, d)
    hess: Tensor  # (B, d, d)
    converged: Tensor  # (B,) bool: stationarity reached to tolerance
    iterations: int


def _where_state(mask: Tensor, new: State, old: State) -> tuple[Tensor, ...]:
    out = []
    for a, b in zip(new, old):
        m = mask.reshape(mask.shape + (1,) * (a.dim() - 1))
        out.append(torch.where(m, a, b))
    return tuple(out)


def levenberg_marquardt(
    state: State,
    evaluate: Callable[[State], tuple[Tensor, Tensor, Tensor]],
    retract: Callable[[State, Tensor], tuple[Tensor, ...]],
    max_iter: int = 100,
    rtol: float = 1e-15,
    atol: Tensor | float = 0.0,
    lam0: float = 1e-4,
    check_every: int = 1,
    polish_steps: int = 2,
) -> LMResult:
    """Minimise a batch of smooth costs from ``state``.

    An item has converged when the Newton decrement ``-g.step`` of an accepted undamped-ish step
    falls below ``rtol * cost + atol``; it then stays frozen.

    Args:
        state: tensors with leading batch dimension B.
        evaluate: ``state -> (cost (B,), grad (B,d), hess (B,d,d))``.
        retract: ``(state, step (B,d)) -> state``.
        max_iter: iteration cap.
        rtol, atol: convergence tolerances on the decrement (``atol`` scalar or ``(B,)``).
        lam0: initial Marquardt damping (relative to the Hessian diagonal).
        check_every: how often the host looks whether all items are done (a GPU sync).
        polish_steps: undamped Newton steps after the loop, for converged items.
    Returns:
        :class:`LMResult`.
    """
    state = tuple(state)
    cost, grad, hess = evaluate(state)
    B, d = grad.shape
    dtype, device = grad.dtype, grad.device
    lam = torch.full((B,), lam0, dtype=dtype, device=device)
    nu = torch.full((B,), 2.0, dtype=dtype, device=device)
    done = ~torch.isfinite(cost)
    converged = torch.zeros(B, dtype=torch.bool, device=device)
    eye = torch.eye(d, dtype=dtype, device=device)
    it = 0
    for it in range(1, max_iter + 1):
        diag = torch.diagonal(hess, dim1=-2, dim2=-1).abs()
        floor = 1e-12 * diag.amax(-1, keepdim=True) + torch.finfo(dtype).tiny
        damp = lam[:, None] * torch.maximum(diag, floor)
        A = hess + torch.diag_embed(damp)
        L, info = torch.linalg.cholesky_ex(A)
        pd = info == 0
        L = torch.where(pd[:, None, None], L, eye)
        step = -torch.cholesky_solve(grad[..., None], L)[..., 0]
        step = torch.where(pd[:, None], step, torch.zeros_like(step))
        trial = retract(state, step)
        t_cost, t_grad, t_hess = evaluate(trial)
        g_step = (grad * step).sum(-1)
        predicted = -(g_step + 0.5 * (step[:, None, :] @ hess @ step[:, :, None])[:, 0, 0])
        actual = cost - t_cost
        ok = pd & torch.isfinite(t_cost) & (t_cost <= cost) & ~done
        rho = actual / torch.where(predicted.abs() > 0, predicted, torch.ones_like(predicted))
        # Nielsen's damping update.
        shrink = torch.clamp(1.0 - (2.0 * rho - 1.0) ** 3, min=0.1)
        lam = torch.where(ok, lam * shrink, torch.where(done, lam, lam * nu))
        nu = torch.where(ok, torch.full_like(nu, 2.0), torch.where(done, nu, nu * 2.0))
        lam = lam.clamp(1e-15, 1e30)
        decrement = -g_step
        newly = ok & (decrement <= rtol * cost + atol)
        # A pd, undamped-looking step that cannot lower the cost any more: at the floor of
        # float precision; also stop items whose damping exploded (a stall).
        stalled = (~ok & ~done & pd & (decrement <= 1e3 * (rtol * cost + atol))) | (lam >= 1e20)
        state = _where_state(ok, trial, state)
        cost = torch.where(ok, t_cost, cost)
        grad = torch.where(ok[:, None], t_grad, grad)
        hess = torch.where(ok[:, None, None], t_hess, hess)
        converged = converged | newly | (stalled & ~(lam >= 1e20))
        done = done | newly | stalled
        if it % check_every == 0 and bool(done.all()):
            break
    # Newton polish: a damped last step only shrinks the error by the damping factor, so finish
    # with undamped Newton steps. Near the optimum the cost change is rounding noise, so a
    # step is taken when the cost does not rise beyond that noise.
    for _ in range(polish_steps):
        L, info = torch.linalg.cholesky_ex(hess)
        pd = (info == 0) & converged
        L = torch.where(pd[:, None, None], L, eye)
        step = -torch.cholesky_solve(grad[..., None], L)[..., 0]
        step = torch.where(pd[:, None], step, torch.zeros_like(step))
        trial = retract(state, step)
        t_cost, t_grad, t_hess = evaluate(trial)
        noise = 1e-12 * cost.abs() + 1e3 * (atol if isinstance(atol, Tensor) else torch.full_like(cost, atol))
        ok = pd & torch.isfinite(t_cost) & (t_cost <= cost + noise)
        state = _where_state(ok, trial, state)
        cost = torch.where(ok, t_cost, cost)
        grad = torch.where(ok[:, None], t_grad, grad)
        hess = torch.where(ok[:, None, None], t_hess, hess)
    return LMResult(state, cost, grad, hess, converged, it)
