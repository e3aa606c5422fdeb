"""Batched Levenberg-Marquardt with the exact Hessian, on a manifold chart.

The loop is generic: ``evaluate(state, idx)`` returns the cost, the chart gradient and Hessian
of the items ``idx`` of the batch (``None``: all), ``retract(state, step)`` moves along the
chart. Every item carries its own damping and stops on its own (masked updates, no Python loop
over the batch). Items that have stopped are dropped from the working set once they are the
majority, so stragglers do not cost a full batch per iteration. With the exact Hessian the
final iterations are Newton steps, and undamped Newton polish steps finish the job, so the
answer is stationary to float64 precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

State = Sequence[Tensor]
Evaluate = Callable[[State, Optional[Tensor]], "tuple[Tensor, Tensor, Tensor]"]


class LMResult(NamedTuple):
    state: tuple[Tensor, ...]
    cost: Tensor  # (B,)
    grad: Tensor  # (B, d)
    hess: Tensor  # (B, d, d)
    converged: Tensor  # (B,) bool: stationarity reached to tolerance
    iterations: int


def _select(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(mask.reshape(mask.shape + (1,) * (new.dim() - 1)), new, old)


def _damped_step(hess: Tensor, grad: Tensor, damp: Tensor | None) -> tuple[Tensor, Tensor]:
    A = hess if damp is None else hess + torch.diag_embed(damp)
    L, info = torch.linalg.cholesky_ex(A)
    pd = info == 0
    # Where A is not positive definite L holds garbage and so may the solve: the step is zero.
    step = torch.cholesky_solve(grad[..., None], L)[..., 0]
    return torch.where(pd[:, None], step, 0.0).neg(), pd


def _newton_polish(
    state: State,
    cost: Tensor,
    grad: Tensor,
    hess: Tensor,
    conv: Tensor,
    evaluate: Evaluate,
    retract: Callable[[State, Tensor], tuple[Tensor, ...]],
    steps: int,
    atol: Tensor,
    negligible: Callable[[State, Tensor], Tensor] | None,
) -> tuple[State, Tensor, Tensor, Tensor]:
    """Undamped Newton steps for the converged items: a damped last step only shrinks the error
    by the damping factor. Near the optimum the cost change is rounding noise, so a step is taken
    unless the cost rises beyond that noise."""
    polishing = conv.clone()
    polish_start = state
    for _ in range(steps):
        step, pd = _damped_step(hess, grad, None)
        polishing = polishing & pd
        if negligible is not None:
            polishing = polishing & ~negligible(polish_start, step)
        trial = retract(state, step)
        t_cost, t_grad, t_hess = evaluate(trial, None)
        ok = polishing & torch.isfinite(t_cost) & (t_cost <= cost + 1e-12 * cost.abs() + 1e3 * atol)
        state = tuple(_select(ok, a, b) for a, b in zip(trial, state))
        cost = torch.where(ok, t_cost, cost)
        grad = _select(ok, t_grad, grad)
        hess = _select(ok, t_hess, hess)
    return state, cost, grad, hess


def levenberg_marquardt(
    state: State,
    evaluate: Evaluate,
    retract: Callable[[State, Tensor], tuple[Tensor, ...]],
    max_iter: int = 100,
    rtol: float = 1e-15,
    atol: Tensor | float = 0.0,
    lam0: float = 1e-4,
    check_every: int = 1,
    polish_steps: int = 2,
    compact: bool = True,
    negligible: Callable[[State, Tensor], Tensor] | None = None,
) -> LMResult:
    """Minimise a batch of smooth costs from ``state``.

    An item has converged when the decrement ``-g.step`` of an accepted step falls below
    ``rtol * cost + atol``; it then stays frozen.

    Args:
        state: tensors with leading batch dimension B.
        evaluate: ``(state, idx) -> (cost (b,), grad (b,d), hess (b,d,d))`` for the items
            ``idx`` (a LongTensor into the full batch, or None for all) given their state.
        retract: ``(state, step (b,d)) -> state``.
        max_iter: iteration cap.
        rtol, atol: convergence tolerances on the decrement (``atol`` scalar or ``(B,)``).
        lam0: initial Marquardt damping (relative to the Hessian diagonal).
        check_every: how often the host looks whether items are done (a GPU sync).
        polish_steps: undamped Newton steps after the loop, for converged items.
        compact: drop stopped items from the working set.
        negligible: ``(state, step) -> (B,) bool``, steps that cannot move the state in float
            precision (``state`` is the one the polish started from); they end the polish.
    Returns:
        :class:`LMResult`.
    """
    full_state = tuple(state)
    cost, grad, hess = evaluate(full_state, None)
    B, d = grad.shape
    dtype, device = grad.dtype, grad.device
    atol_full = atol if isinstance(atol, Tensor) else torch.full((B,), float(atol), dtype=dtype, device=device)
    full = {"cost": cost, "grad": grad, "hess": hess}
    full_done = ~torch.isfinite(cost)
    full_conv = torch.zeros(B, dtype=torch.bool, device=device)
    lam_full = torch.full((B,), lam0, dtype=dtype, device=device)
    nu_full = torch.full((B,), 2.0, dtype=dtype, device=device)

    idx: Tensor | None = None  # working set; None = everything
    st, done, conv, lam, nu, at = full_state, full_done, full_conv, lam_full, nu_full, atol_full

    def scatter_back():
        nonlocal full_state, full_done, full_conv, lam_full, nu_full
        if idx is None:
            full_state, full_done, full_conv, lam_full, nu_full = st, done, conv, lam, nu
            full.update(cost=cost, grad=grad, hess=hess)
            return
        full_state = tuple(f.index_copy(0, idx, s) for f, s in zip(full_state, st))
        full_done = full_done.index_copy(0, idx, done)
        full_conv = full_conv.index_copy(0, idx, conv)
        lam_full = lam_full.index_copy(0, idx, lam)
        nu_full = nu_full.index_copy(0, idx, nu)
        for key, val in (("cost", cost), ("grad", grad), ("hess", hess)):
            full[key] = full[key].index_copy(0, idx, val)

    it = 0
    for it in range(1, max_iter + 1):
        diag = torch.diagonal(hess, dim1=-2, dim2=-1).abs()
        floor = 1e-12 * diag.amax(-1, keepdim=True) + torch.finfo(dtype).tiny
        step, pd = _damped_step(hess, grad, lam[:, None] * torch.maximum(diag, floor))
        trial = retract(st, step)
        t_cost, t_grad, t_hess = evaluate(trial, idx)
        g_step = (grad * step).sum(-1)
        # -(g.step + step.H.step / 2)
        predicted = -(step * torch.add(grad, (hess @ step[..., None])[..., 0], alpha=0.5)).sum(-1)
        trying = pd & ~done
        # (a trial cost that is not finite never passes: active items have finite costs)
        ok = trying & (t_cost <= cost)
        rho = (cost - t_cost) / torch.where(predicted.abs() > 0, predicted, 1.0)
        # Nielsen's damping update (with a faster shrink, so we reach Newton steps sooner).
        shrink = torch.clamp(1.0 - (2.0 * rho - 1.0) ** 3, min=0.1)
        lam = (lam * torch.where(ok, shrink, torch.where(done, 1.0, nu))).clamp(1e-15, 1e30)
        nu = torch.where(ok, 2.0, torch.where(done, nu, 2.0 * nu))
        # Converged: the decrement -g.step is within rtol * cost + atol (as g.step >= -that).
        neg_tol = cost * -rtol - at
        newly = ok & (g_step >= neg_tol)
        # A step that cannot lower the cost any more is at the floor of float precision; an item
        # whose damping exploded has stalled.
        at_floor = (trying ^ ok) & (g_step >= 1e3 * neg_tol)
        blown = lam >= 1e20
        st = tuple(_select(ok, a, b) for a, b in zip(trial, st))
        cost = torch.where(ok, t_cost, cost)
        grad = _select(ok, t_grad, grad)
        hess = _select(ok, t_hess, hess)
        conv = conv | newly | (at_floor & ~blown)
        done = done | newly | at_floor | blown
        if it % check_every == 0:
            active = done.numel() - int(done.sum())
            if active == 0:
                break
            if compact and active <= done.numel() // 2:
                scatter_back()
                keep = (~done).nonzero()[:, 0]
                idx = keep if idx is None else idx[keep]
                st = tuple(f[idx] for f in full_state)
                cost, grad, hess = full["cost"][idx], full["grad"][idx], full["hess"][idx]
                done, conv = full_done[idx], full_conv[idx]
                lam, nu, at = lam_full[idx], nu_full[idx], atol_full[idx]
    scatter_back()
    state, cost, grad, hess, conv = full_state, full["cost"], full["grad"], full["hess"], full_conv

    state, cost, grad, hess = _newton_polish(
        state, cost, grad, hess, conv, evaluate, retract, polish_steps, atol_full, negligible
    )
    return LMResult(state, cost, grad, hess, conv, it)
