"""The differentiable PnP layer: ``solve_pnp`` (functional) and ``BPnP`` (module)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .cost import cost_terms
from .fused import solve_least_squares_fused
from .implicit import implicit_vjp, robust_vjp
from .options import RansacOptions, SolverOptions
from .result import PnPResult
from .solvers.native import native_available
from .stages import Settings, Solved, check_settings, finish, forward_solve, prepare, robust_start

__all__ = ["PnPResult", "solve_pnp", "BPnP"]


class _PnPFunction(torch.autograd.Function):
    """Forward: global solve in float64. Backward: the implicit function theorem.

    The backward is written in differentiable tensor ops on the saved inputs and outputs, so a
    double backward (``create_graph=True``) differentiates it exactly: then the Hessian is
    recomputed from the (graph-connected) optimum instead of taken from the forward.
    """

    @staticmethod
    def forward(x2d, x3d, K, weights, loss_scale, dist, x2d_start, init_pose, config):  # type: ignore[override]
        sol = forward_solve(x2d, x3d, K, weights, init_pose, config, loss_scale, dist, x2d_start)
        return tuple(Solved.from_solution(sol))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x2d, x3d, K, weights, loss_scale, dist, _, _, config = inputs
        pose, cost, converged, R, hess, iters, second, trusted = output
        ctx.save_for_backward(x2d, x3d, K, weights, loss_scale, dist, pose, R, hess)
        ctx.loss = config.loss
        # pose and R are differentiable outputs (R directly, which spares a Rodrigues map).
        ctx.mark_non_differentiable(cost, converged, hess, iters, second, trusted)

    @staticmethod
    def backward(ctx: Any, grad_pose: Tensor | None, _c: Any, _v: Any, grad_R: Tensor | None, *_: Any):  # type: ignore[override]
        x2d, x3d, K, weights, loss_scale, dist, pose, R, hess = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:6])
        none = (None,) * 9
        if (grad_pose is None and grad_R is None) or not any(needs):
            return none
        if grad_pose is None:
            grad_pose = torch.zeros_like(pose)
        # An item whose answer is not finite (a degenerate problem the solver could not handle) gets
        # zero gradients; it never touches the other items' (or a shared input's) gradients.
        keep = (
            torch.isfinite(pose).all(-1)
            & torch.isfinite(R).flatten(1).all(-1)
            & torch.isfinite(hess).flatten(1).all(-1)
        )
        if not bool(keep.all()):
            eye = torch.eye(3, dtype=R.dtype, device=R.device).expand_as(R)
            safe_t = torch.tensor([0.0, 0.0, 1.0], dtype=R.dtype, device=R.device).expand(R.shape[0], 3)
            pose = torch.where(keep[:, None], pose, torch.cat([torch.zeros_like(safe_t), safe_t], -1))
            R = torch.where(keep[:, None, None], R, eye)
            hess = torch.where(keep[:, None, None], hess, torch.eye(6, dtype=R.dtype, device=R.device))
            grad_pose = torch.where(keep[:, None], grad_pose, torch.zeros_like(grad_pose))
            if grad_R is not None:
                grad_R = torch.where(keep[:, None, None], grad_R, torch.zeros_like(grad_R))
        t = pose[:, 3:]
        if ctx.loss != "l2" or dist is not None:
            grads = robust_vjp(
                grad_pose, pose[:, :3], R, t, x2d, x3d, K, weights, loss_scale, ctx.loss, needs, grad_R, keep, dist
            )
            return (*grads, *none[6:])
        if torch.is_grad_enabled():
            # create_graph: the Hessian as a differentiable function of the optimum and the inputs.
            hess = cost_terms(R, t, x2d, x3d, K, weights).hess
        grads = implicit_vjp(grad_pose, pose[:, :3], R, t, hess, x2d, x3d, K, weights, needs[:4], grad_R, keep)
        return (*grads, *none[4:])


def solve_pnp(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor | None = None,
    *,
    init_pose: Tensor | None = None,
    method: str = "global",
    backend: str = "auto",
    options: SolverOptions | None = None,
    loss: str = "l2",
    loss_scale: float | Tensor = 1.0,
    ransac: bool | RansacOptions = False,
    dist: Tensor | None = None,
    warn: bool = True,
) -> PnPResult:
    """Pose that minimises the weighted reprojection error; differentiable in every input.

    Minimises ``sum_i w_i rho(||pi(R x3d_i + t; K) - x2d_i||^2)`` (pixels; ``rho(s) = s`` for
    the default ``loss="l2"``). The least-squares forward solve is batched and global
    (object-space multi-start, then exact-Hessian Levenberg-Marquardt in float64); the backward
    is exact, by the implicit function theorem at the optimum, and so is the double backward.

    Outliers: ``ransac=True`` (or a :class:`~bpnp.options.RansacOptions`) first finds the inliers
    by batched RANSAC (P3P samples, MSAC scores, local optimisation; see
    :mod:`bpnp.solvers.ransac`), then solves on them (weights ``w * inliers``, warm-started at
    RANSAC's pose); the gradient is exact for that inlier set (``PnPResult.inliers``), held fixed.
    A robust ``loss`` (``"huber"`` or ``"cauchy"``, with ``loss_scale`` in pixels) is minimised by
    exact-Hessian LM from the least-squares (or RANSAC) answer, and its backward uses the robust
    cost's exact Hessian; gradients also flow to ``loss_scale`` when it is a tensor.

    Lens distortion: with ``dist`` (OpenCV's ``k1, k2, p1, p2, k3``) the cost is the error in the
    distorted pixels ``K [distort(x/z, y/z), 1]`` (as ``cv2.solvePnP`` with ``distCoeffs``): the
    global search runs on the undistorted pixels, then exact-Hessian LM on the distorted cost;
    the backward differentiates that cost, also with respect to ``dist``.

    Args:
        x2d: ``(B, n, 2)`` or ``(n, 2)`` image points in pixels, n >= 4.
        x3d: ``(n, 3)`` shared by the batch or ``(B, n, 3)`` object points.
        K: ``(3, 3)`` or ``(B, 3, 3)`` upper-triangular camera matrices.
        weights: ``(n,)`` or ``(B, n)`` non-negative per-point weights (default all ones).
        init_pose: ``(B, 6)`` (or ``(6,)``) warm start ``[rvec, t]``: an extra candidate of the
            global search, or the only start with ``SolverOptions(global_search=False)``.
        method: ``"global"`` (default) or ``"opencv"`` (``cv2.solvePnP`` SQPnP per item, then the
            same LM; for comparison; needs ``opencv-python``).
        backend: forward solver of ``method="global"``: ``"auto"`` (default: the compiled C
            solver for CPU tensors when it was built, see :mod:`bpnp.solvers.native`; the torch
            solver otherwise, e.g. on GPU), ``"torch"`` (batched tensor ops on any device) or
            ``"native"`` (the C solver; for device tensors with ``loss="l2"`` and no RANSAC it
            solves a host copy, and the backward runs on the device). Same algorithm, same
            options, same answers.
        options: :class:`~bpnp.options.SolverOptions` (default: ``SolverOptions()``).
        loss: ``"l2"`` (default), ``"huber"`` or ``"cauchy"`` (see :func:`bpnp.cost.robust_loss`).
        loss_scale: the robust loss's scale in pixels (the units of x2d): a positive float, or a
            tensor of shape ``()`` or ``(B,)`` (differentiable). Ignored for ``"l2"``.
        ransac: False (default), True (``RansacOptions()``) or a :class:`~bpnp.options.RansacOptions`
            (``method="global"`` only).
        dist: ``(5,)`` or ``(B, 5)`` distortion coefficients ``(k1, k2, p1, p2, k3)`` (or None);
            differentiable. ``method="global"`` only.
        warn: emit a :class:`~bpnp.errors.PnPConvergenceWarning` when some items did not converge.
    Returns:
        :class:`PnPResult` in the dtype and on the device of the inputs (unbatched if ``x2d``
        was ``(n, 2)``).
    Raises:
        PnPInputError (a ValueError): bad shapes, n < 4, NaN/inf, negative weights, bad K, mixed
            devices or dtypes, unknown method/backend, options not a SolverOptions.
        BackendUnavailableError (a RuntimeError): ``backend="native"`` where the compiled solver
            is missing or the tensors are not on the CPU; ``method="opencv"`` without OpenCV.
    """
    settings = check_settings(method, backend, options, loss, ransac, warn)
    solver = _fused_solver(settings, x2d, init_pose, loss_scale, dist)
    if solver is not None:
        return solve_least_squares_fused(x2d, x3d, K, weights, init_pose, settings.options, warn, solver, dist)
    problem = prepare(x2d, x3d, K, weights, init_pose, loss_scale, dist, settings)
    start = robust_start(problem, settings)
    p = problem
    solved = Solved(
        *_PnPFunction.apply(
            p.x2d_n, p.x3d_n, p.K_n, start.w_solve, p.scale_n, p.dist_n, p.x2d_start, start.init_n,
            start.config._replace(loss=loss),
        )
    )  # fmt: skip
    return finish(problem, start, solved, settings)


#: Whether solve_pnp may take the fused path (the tests compare it with the staged one).
_FUSED = True


def _fused_solver(
    settings: Settings, x2d: Tensor, init_pose: Tensor | None, loss_scale: float | Tensor, dist: Tensor | None
) -> str | None:
    """The solver of :mod:`bpnp.fused` for this solve: ``"native"`` for the C solver's least
    squares on CPU tensors, or with ``backend="native"`` on a host copy of device tensors (with
    ``dist`` too, unless a warm start is only refined); under
    :func:`torch.compile` also ``"torch"`` (the staged path's data-dependent control flow cannot
    be traced); None: the staged path (same answers)."""
    if not (
        _FUSED
        and settings.method == "global"
        and settings.loss == "l2"
        and settings.ransac is None
        and isinstance(loss_scale, float)
        and loss_scale == 1.0
        and isinstance(x2d, Tensor)
    ):
        return None
    on_host = x2d.device.type == "cpu" or settings.backend == "native"  # native: a host copy of device tensors
    if settings.backend != "torch" and on_host and native_available():
        # (a refined warm start with dist is checked in the staged path's own way)
        if dist is None or init_pose is None or settings.options.global_search:
            return "native"
        return None
    if torch.compiler.is_compiling() and settings.backend != "native" and dist is None:
        return "torch"
    return None


class BPnP(nn.Module):
    """The PnP layer as a module: ``layer(x2d, x3d, K, weights=None, init_pose=None) -> pose``.

    Stateless: a warm start is passed explicitly as ``init_pose`` (e.g. the poses a data set
    stores per item), so a shuffled loader never refines one item from another item's pose.

    Args:
        options: :class:`~bpnp.options.SolverOptions` (default: ``SolverOptions()``).
        backend: as in :func:`solve_pnp`.
        method: as in :func:`solve_pnp`.
        loss, loss_scale, ransac: as in :func:`solve_pnp`.
    """

    def __init__(
        self,
        options: SolverOptions | None = None,
        backend: str = "auto",
        method: str = "global",
        loss: str = "l2",
        loss_scale: float = 1.0,
        ransac: bool | RansacOptions = False,
    ) -> None:
        super().__init__()
        settings = check_settings(method, backend, options, loss, ransac)
        self.loss = loss
        self.loss_scale = loss_scale
        self.ransac = ransac
        self.options = settings.options
        self.backend = backend
        self.method = method

    def forward(
        self,
        x2d: Tensor,
        x3d: Tensor,
        K: Tensor,
        weights: Tensor | None = None,
        init_pose: Tensor | None = None,
        dist: Tensor | None = None,
    ) -> Tensor:
        """Solve and return the pose ``(B, 6)`` (or ``(6,)`` for unbatched input); shapes as in
        :func:`solve_pnp` (``dist``: the lens distortion, a per-call input like ``K``)."""
        return solve_pnp(
            x2d,
            x3d,
            K,
            weights,
            init_pose=init_pose,
            method=self.method,
            backend=self.backend,
            options=self.options,
            loss=self.loss,
            loss_scale=self.loss_scale,
            ransac=self.ransac,
            dist=dist,
        ).pose

    def extra_repr(self) -> str:
        robust = "" if self.loss == "l2" else f", loss={self.loss!r}, loss_scale={self.loss_scale}"
        ransac = "" if self.ransac is False else f", ransac={self.ransac}"
        return f"method={self.method!r}, backend={self.backend!r}{robust}{ransac}, options={self.options}"
