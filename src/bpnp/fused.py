"""The least-squares layer as one forward and one backward operation.

The staged :func:`bpnp.solve_pnp` (:mod:`bpnp.stages`) runs hundreds of small tensor operations
around the solve: checks, the change of units, stand-ins for degenerate items, flags, fallbacks,
the closed-form backward. For one problem they cost ten times the solve. For the common case
(``loss="l2"``, no RANSAC, no lens distortion, CPU tensors, the C solver built) this module does
all of it in ``bpnp_layer_forward`` and ``bpnp_layer_backward`` (``solvers/native_pnp.c``): the
same checks in the same order, the same unit-free problem, the same flags and fallbacks, and the
implicit-function backward, so the answers equal the staged path's. A double backward
(``create_graph=True``) runs the backward in differentiable tensor ops instead, exactly as the
staged path does.

Under :func:`torch.compile` the two calls are ``torch.library`` custom ops (``bpnp::layer_forward``,
``bpnp::layer_backward``) with fake kernels and a registered autograd formula, so a model with
:class:`bpnp.BPnP` inside compiles with ``fullgraph=True``; in eager mode a plain
:class:`torch.autograd.Function` calls them (the custom-op dispatch costs more than the solve of
a small problem). The forward op also runs the torch solver (``backend="torch"``, any device):
its data-dependent control flow stays inside the op, where the compiler does not trace it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from typing import Any

import torch
from torch import Tensor

from .checks import canonical_pnp_shapes, check_pnp_values
from .compiler import constant_for_compiler
from .cost import cost_terms
from .covariance import pose_covariance
from .errors import PnPConvergenceWarning, PnPInputError
from .implicit import implicit_vjp, robust_vjp
from .normalise import Normalisation, apply_normalisation
from .options import SolverOptions, _Tuning
from .result import PnPResult
from .solvers.native import (
    layer_backward_native,
    layer_forward_native,
    layer_forward_outputs,
    native_available,
)
from .stages import Solved, answer_flags, check_distortion, check_settings, finish, forward_solve, prepare, robust_start

__all__ = ["solve_least_squares_fused"]

_F64 = torch.float64


def solve_least_squares_fused(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor | None,
    init_pose: Tensor | None,
    options: SolverOptions,
    warn: bool,
    solver: str = "native",
    dist: Tensor | None = None,
) -> PnPResult:
    """:func:`bpnp.solve_pnp` with ``loss="l2"`` and no RANSAC, as one forward and one backward
    operation (shapes, dtypes and answers as :func:`bpnp.solve_pnp`).

    Args:
        solver: ``"native"`` (the C solver, CPU tensors) or ``"torch"`` (the torch solver, run
            inside the custom op, without ``dist``; for :func:`torch.compile`).
        dist: ``(5,)`` or ``(B, 5)`` lens distortion (the C solver), or None.
    """
    x2d_b, x3d_b, K_b, w_b, pose_b, unbatched = canonical_pnp_shapes(x2d, x3d, K, weights, init_pose)
    dist_b = None if dist is None else check_distortion(dist, x2d_b, unbatched)
    dtype = x2d_b.dtype
    compiling = torch.compiler.is_compiling()
    if compiling:
        key = _options_key(options)
        outputs = torch.ops.bpnp.layer_forward(x2d_b, x3d_b, K_b, w_b, pose_b, dist_b, key, solver)
    else:
        rest: list[Tensor] = []
        outputs = (*_Layer.apply(x2d_b, x3d_b, K_b, w_b, pose_b, dist_b, options, solver, rest), *rest)
    pose, R, cost, second, hess, units, flags, summary = outputs
    if compiling:
        steps: Any = summary[0]
        failed = 0
    else:
        steps, failed = summary.tolist()
    if warn and failed:
        warnings.warn(
            f"solve_pnp: {failed} of {pose.shape[0]} problems did not reach a well-posed "
            "optimum (points behind the camera, degenerate geometry or a singular Hessian); their gradients "
            "are regularised. See PnPResult.converged.",
            PnPConvergenceWarning,
            stacklevel=3,
        )

    covariance = functools.partial(_covariance, x2d_b, w_b, pose, R, cost, hess, units, unbatched)
    cost_out, second_out = (cost, second) if dtype == _F64 else (cost.to(dtype), second.to(dtype))
    return PnPResult.with_views(pose, R, cost_out, flags, steps, solver, second_out, covariance, unbatched)


def _covariance(
    x2d: Tensor,
    weights: Tensor | None,
    pose: Tensor,
    R: Tensor,
    cost: Tensor,
    hess: Tensor,
    units: Tensor,
    unbatched: bool,
) -> Tensor:
    """:attr:`PnPResult.covariance` of a fused solve, computed on first access (a module function
    and its arguments, so that a result pickles): the batched inputs and the C call's outputs, as
    :func:`solve_least_squares_fused` has them."""
    w_n = torch.ones_like(x2d[..., 0], dtype=_F64) if weights is None else weights.detach().to(_F64)
    dof = ((w_n > 0).sum(-1) * 2 - 6).clamp_min(1).to(_F64).expand(cost.shape[0])
    norm = _normalisation(units)
    cost_n = cost / (norm.weight[:, 0] * norm.focal[:, 0] ** 2)
    cov = pose_covariance(hess, cost_n, dof, pose[:, :3].detach().to(_F64), R.detach().to(_F64), norm).to(x2d.dtype)
    return cov[0] if unbatched else cov


def _normalisation(units: Tensor) -> Normalisation:
    return Normalisation(units[:, :3], units[:, 3:4], units[:, 4:6], units[:, 6:7], units[:, 7:8])


def _forward(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor | None,
    init_pose: Tensor | None,
    dist: Tensor | None,
    options: SolverOptions,
    solver: str,
) -> tuple[Tensor, ...]:
    """The forward (C on float64 copies, or the staged torch solver); the pose and rotation in
    the inputs' dtype."""
    if solver == "torch":
        return _forward_torch(x2d, x3d, K, weights, init_pose, options)
    if x2d.device.type != "cpu":
        # The C solver on a host copy (backend="native" with device tensors): one copy each way;
        # the backward then runs on the device in tensor ops.
        host = (None if x is None else x.detach().cpu() for x in (x2d, x3d, K, weights, init_pose, dist))
        return tuple(out.to(x2d.device) for out in _forward(*host, options, solver))
    code, out = layer_forward_native(x2d, x3d, K, weights, init_pose, dist, options)
    if code:
        _raise_input_error(x2d, x3d, K, weights, init_pose)
    if x2d.dtype == _F64:
        return out
    pose, R, *rest = out
    return (pose.to(x2d.dtype), R.to(x2d.dtype), *rest)


def _forward_torch(
    x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor | None, init_pose: Tensor | None, options: SolverOptions
) -> tuple[Tensor, ...]:
    """The outputs of ``bpnp_layer_forward`` from the staged path with the torch solver."""
    settings = check_settings("global", "torch", options, "l2", False, warn=False)
    with torch.no_grad():
        p = prepare(x2d, x3d, K, weights, init_pose, 1.0, None, settings)
        start = robust_start(p, settings)
        sol = forward_solve(p.x2d_n, p.x3d_n, p.K_n, start.w_solve, start.init_n, start.config)
        solved = Solved.from_solution(sol)
        answer = answer_flags(p, start, solved, settings.options)
        res = finish(p, start, solved, settings, answer)
        pose_n, bad = answer[0], answer[5]
        B = x2d.shape[0]
        units = torch.cat([*(x.expand(B, -1) for x in p.norm), pose_n[:, 3:]], -1)
        flags = torch.stack([res.converged, res.ambiguous, res.trusted, bad], -1)
        hess = torch.where(bad[:, None, None], torch.eye(6, dtype=_F64, device=x2d.device), sol.hess)
        summary = torch.stack([solved.iterations.to(x2d.device), (~res.converged).sum()]).to(torch.int32)
        return res.pose, res.R, res.cost.to(_F64), res.second_cost.to(_F64), hess, units, flags, summary


def _raise_input_error(x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor | None, init_pose: Tensor | None) -> None:
    # The C checks are bpnp.checks' in the same order: the Python ones name the problem.
    check_pnp_values(x2d, x3d, K, weights, init_pose)
    raise PnPInputError("invalid input values")  # pragma: no cover - the checks above raise first


def _backward(
    inputs: tuple[Tensor | None, ...],
    outputs: tuple[Tensor, ...],
    grad_pose: Tensor | None,
    grad_R: Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """Gradients of ``(x2d, x3d, K, weights)``: the C backward, or (with ``create_graph``) the
    same formulas in differentiable tensor ops."""
    x2d, x3d, K, weights, dist = inputs
    pose, R, hess, units, flags = outputs
    if grad_pose is None:
        grad_pose = torch.zeros_like(pose)
    if torch.is_grad_enabled():
        grads = _graph_backward(inputs, pose, R, units, flags, grad_pose, grad_R, needs)
    elif x2d.device.type != "cpu" or not native_available():
        with torch.no_grad():
            grads = _graph_backward(inputs, pose, R, units, flags, grad_pose, grad_R, needs)
    else:
        grads = layer_backward_native(*inputs, (pose, R, hess, units, flags), grad_pose, grad_R, needs)
    return tuple(None if g is None else _like(g, x) for g, x in zip(grads, inputs))


def _like(g: Tensor, x: Tensor) -> Tensor:
    """A per-item gradient summed over the batch for a shared input, in the input's dtype."""
    if x.shape[0] == 1 and g.shape[0] > 1:
        g = g.sum(0, keepdim=True)
    return g if g.dtype == x.dtype else g.to(x.dtype)


def _graph_backward(
    inputs: tuple[Tensor | None, ...],
    pose: Tensor,
    R: Tensor,
    units: Tensor,
    flags: Tensor,
    grad_pose: Tensor,
    grad_R: Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """The backward as a differentiable function of the inputs, the answer and the incoming
    gradients (a double backward differentiates it): the normalised problem with the forward's
    constants, its Hessian recomputed from the graph-connected optimum, :func:`bpnp.implicit.implicit_vjp`,
    and the change of units undone."""
    norm = _normalisation(units)
    centre, scale, principal, focal, wmax = norm
    x2d, x3d, K, weights, dist = inputs
    x2d, x3d, K, pose, R, grad_pose = (x.to(_F64) for x in (x2d, x3d, K, pose, R, grad_pose))
    w = torch.ones_like(x2d[..., 0]) if weights is None else weights.to(_F64)
    x2d_n, x3d_n, K_n, w_n = apply_normalisation(x2d, x3d, K, w, norm)
    t_n = (pose[:, 3:] + (R @ centre[..., None])[..., 0]) / scale
    # t = s t_n - R c: the normalised pose's gradients
    grad_t = grad_pose[:, 3:]
    grad_R_n = -grad_t[:, :, None] * centre[:, None, :]
    if grad_R is not None:
        grad_R_n = grad_R_n + grad_R.to(_F64)
    grad_pose_n = torch.cat([grad_pose[:, :3], scale * grad_t], -1)
    keep = flags[:, 3] == 0
    if dist is None:
        hess = cost_terms(R, t_n, x2d_n, x3d_n, K_n, w_n).hess
        g2, g3, gK, gw = implicit_vjp(
            grad_pose_n, pose[:, :3], R, t_n, hess, x2d_n, x3d_n, K_n, w_n, tuple(needs[:4]), grad_R_n, keep
        )
        gd = None
    else:
        # (dist acts on x/z: the change of units leaves it as it is)
        one = torch.ones(1, 1, dtype=_F64, device=x2d.device)
        needs6 = (*needs[:4], False, needs[4])
        g2, g3, gK, gw, _, gd = robust_vjp(
            grad_pose_n, pose[:, :3], R, t_n, x2d_n, x3d_n, K_n, w_n, one, "l2", needs6, grad_R_n, keep,
            dist.to(_F64),
        )  # fmt: skip
    if g2 is not None:
        g2 = g2 / focal[:, :, None]
    if g3 is not None:
        g3 = g3 / scale[:, :, None]
    if gw is not None:
        gw = gw / wmax
    if gK is not None:
        top = gK[:, :2] / focal[:, :, None]
        gK = torch.cat([top, gK[:, 2:] - (principal[:, :, None] * top).sum(1, keepdim=True)], 1)
    return g2, g3, gK, gw, gd


class _Layer(torch.autograd.Function):
    """Eager mode: the C forward and backward as one autograd function of two outputs, the pose
    and its rotation; the forward's other outputs (no gradient) go to the list ``rest``, outside
    autograd's bookkeeping of outputs."""

    # The forward takes ctx (no separate setup_context): Function.apply then skips binding the
    # arguments to a signature, a tenth of a small solve.
    @staticmethod
    def forward(ctx: Any, x2d, x3d, K, weights, init_pose, dist, options, solver, rest):  # type: ignore[override]
        pose, R, *others = _forward(x2d, x3d, K, weights, init_pose, dist, options, solver)
        rest.extend(others)
        ctx.save_for_backward(x2d, x3d, K, weights, dist, pose, R)
        _, _, hess, units, flags, _ = others
        # Constants of the backward (no gradient flows through them): kept on ctx, which spares
        # the saved-tensor checks of a small solve's backward.
        ctx.constants = (hess, units, flags)
        # An output without a gradient stays None in the backward (not a tensor of zeros).
        ctx.set_materialize_grads(False)
        return pose, R

    @staticmethod
    def backward(ctx: Any, grad_pose: Tensor | None, grad_R: Tensor | None):  # type: ignore[override]
        x2d, x3d, K, weights, dist, pose, R = ctx.saved_tensors
        needs = (*ctx.needs_input_grad[:4], ctx.needs_input_grad[5])
        if (grad_pose is None and grad_R is None) or not any(needs):
            return (None,) * 9
        grads = _backward((x2d, x3d, K, weights, dist), (pose, R, *ctx.constants), grad_pose, grad_R, needs)
        return (*grads[:4], None, grads[4], None, None, None)


# ---------------------------------------------------------------- torch.compile: custom ops


@constant_for_compiler
def _options_key(options: SolverOptions) -> str:
    """The options as a string (a custom op takes no Python objects): their fields in JSON."""
    return json.dumps(dataclasses.asdict(options), sort_keys=True)


@functools.lru_cache(maxsize=64)
def _options_from_key(key: str) -> SolverOptions:
    fields = json.loads(key)
    tuning = _Tuning(**fields.pop("_tuning"))
    return SolverOptions(**fields, _tuning=tuning)


@torch.library.custom_op("bpnp::layer_forward", mutates_args=())
def _layer_forward_op(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor | None,
    init_pose: Tensor | None,
    dist: Tensor | None,
    options: str,
    solver: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward(x2d, x3d, K, weights, init_pose, dist, _options_from_key(options), solver)


@_layer_forward_op.register_fake
def _(x2d, x3d, K, weights, init_pose, dist, options, solver):
    return layer_forward_outputs(x2d.shape[0], x2d.new_empty, x2d.dtype)


@torch.library.custom_op("bpnp::layer_backward", mutates_args=())
def _layer_backward_op(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor | None,
    dist: Tensor | None,
    pose: Tensor,
    R: Tensor,
    hess: Tensor,
    units: Tensor,
    flags: Tensor,
    grad_pose: Tensor,
    grad_R: Tensor,
    needs: list[bool],
) -> list[Tensor]:
    inputs = (x2d, x3d, K, weights, dist)
    grads = _backward(inputs, (pose, R, hess, units, flags), grad_pose, grad_R, tuple(needs))
    # one tensor per input given (an op returns no None): zeros where no gradient was asked
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs) if x is not None]


@_layer_backward_op.register_fake
def _(x2d, x3d, K, weights, dist, pose, R, hess, units, flags, grad_pose, grad_R, needs):
    return [torch.empty_like(x) for x in (x2d, x3d, K, weights, dist) if x is not None]


def _setup_op_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x2d, x3d, K, weights, _, dist = inputs[:6]
    pose, R, _, _, hess, units, flags, _ = output
    ctx.save_for_backward(x2d, x3d, K, weights, dist, pose, R, hess, units, flags)


def _op_backward(ctx: Any, grad_pose: Tensor, grad_R: Tensor, *_: Any) -> tuple:
    x2d, x3d, K, weights, dist, pose, R, hess, units, flags = ctx.saved_tensors
    needs = [*ctx.needs_input_grad[:4], ctx.needs_input_grad[5]]
    grad_pose = torch.zeros_like(pose) if grad_pose is None else grad_pose
    grad_R = torch.zeros_like(R) if grad_R is None else grad_R
    inputs = (x2d, x3d, K, weights, dist)
    given = iter(torch.ops.bpnp.layer_backward(*inputs, pose, R, hess, units, flags, grad_pose, grad_R, needs))
    grads = [None if x is None else next(given) for x in inputs]
    grads = [g if need else None for g, need in zip(grads, needs)]
    return (*grads[:4], None, grads[4], None, None)


_layer_forward_op.register_autograd(_op_backward, setup_context=_setup_op_context)
