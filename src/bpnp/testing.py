"""Finite-difference checks of the layer's gradients (used by the tests and the demo).

Central differences of fully converged solves; all perturbed copies of a batch are solved as
one batch, so a check costs a single batched solve per input.
"""

from __future__ import annotations

import torch

from .layer import solve_pnp

__all__ = ["STEPS", "loss_weights", "fd_gradient", "analytic_gradient"]

STEPS = {"x2d": 1e-3, "x3d": 1e-5, "K": 1e-3, "weights": 1e-5}


def loss_weights(B: int, seed: int = 0) -> torch.Tensor:
    """Random ``(B, 6)`` float64 weights of the test loss ``sum(v * pose)``."""
    return torch.randn(B, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def fd_gradient(inputs: dict, name: str, v: torch.Tensor, mask: torch.Tensor | None = None, **solve_kw) -> torch.Tensor:
    """d(sum v * pose)/d inputs[name] by central differences of fully converged solves.

    inputs: x2d (B,n,2), x3d (n,3)|(B,n,3), K (3,3)|(B,3,3), weights (n,)|(B,n); float64.
    The 2m perturbed copies of the whole batch are solved as one batch of 2m*B problems.
    solve_kw: extra options of :func:`~bpnp.solve_pnp` (e.g. ``backend``).
    """
    x = inputs[name]
    h = STEPS[name]
    active = torch.ones(x.numel(), dtype=torch.bool) if mask is None else mask.reshape(-1) > 0
    eye = torch.eye(x.numel(), dtype=x.dtype)[active].reshape(-1, *x.shape)
    m = eye.shape[0]
    copies = torch.cat([x + h * eye, x - h * eye], 0)  # 2m x shape
    B, n, _ = inputs["x2d"].shape
    C = 2 * m
    batched = {}
    for key, val in inputs.items():
        val = copies if key == name else val.expand(C, *val.shape)
        per_item = {"x2d": 3, "x3d": 3, "K": 3, "weights": 2}[key]
        if val.dim() - 1 < per_item:  # shared across the batch: give each item its copy
            val = val.unsqueeze(1).expand(C, B, *val.shape[1:])
        batched[key] = val.reshape(C * B, *val.shape[2:])
    pose = solve_pnp(batched["x2d"], batched["x3d"], batched["K"], batched["weights"], warn=False, **solve_kw).pose
    loss = (pose.reshape(C, B, 6) * v).sum((1, 2))
    grad = torch.zeros(x.numel(), dtype=x.dtype)
    grad[active] = (loss[:m] - loss[m:]) / (2 * h)
    return grad.reshape(x.shape)


def analytic_gradient(inputs: dict, name: str, v: torch.Tensor, **solve_kw) -> torch.Tensor:
    """d(sum v * pose)/d inputs[name] by the layer's backward (``solve_kw`` as in fd_gradient)."""
    leaf = {k: (t.clone().requires_grad_(k == name)) for k, t in inputs.items()}
    pose = solve_pnp(leaf["x2d"], leaf["x3d"], leaf["K"], leaf["weights"], warn=False, **solve_kw).pose
    (g,) = torch.autograd.grad((pose * v).sum(), [leaf[name]])
    return g
