"""The differentiable PnP layer: ``solve_pnp`` (functional) and ``BPnP`` (module)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .checks import canonical_pnp_inputs
from .cost import LOSSES, cost_terms, point_terms, residual_jacobians
from .covariance import pose_covariance, robust_spread
from .errors import BackendUnavailableError, PnPConvergenceWarning, PnPInputError
from .geometry import project, rotmat_to_rvec, rvec_to_rotmat, undistort_points
from .implicit import implicit_vjp, robust_vjp
from .normalise import normalise_problem, pose_from_normalised, pose_to_normalised
from .options import RansacOptions, SolverOptions
from .solvers.init import normalised_rays, warm_start_trusted
from .solvers.native import native_available, native_unavailable_reason, solve_pnp_native, warn_unavailable_once
from .solvers.pnp import PnPSolution, refine_robust, solve_pnp_forward
from .solvers.ransac import MIN_CONSENSUS, item_keys
from .solvers.ransac import ransac as run_ransac

__all__ = ["PnPResult", "solve_pnp", "BPnP"]

METHODS = ("global", "opencv")
BACKENDS = ("auto", "torch", "native")


@dataclass
class PnPResult:
    """Answer of :func:`solve_pnp`.

    Attributes:
        pose: ``(B, 6)`` ``[rvec, t]``, OpenCV convention; differentiable.
        R: ``(B, 3, 3)`` rotation of the pose; differentiable.
        t: ``(B, 3)`` translation; differentiable.
        cost: ``(B,)`` weighted squared reprojection error at the answer (no gradient).
        converged: ``(B,)`` bool, the same meaning for every method and backend: the answer is
            stationary to float64 precision, every point of positive weight lies in front of the
            camera, and the Hessian is well posed (not singular).
        second_cost: ``(B,)`` cost of the best other distinct local minimum the search found
            (inf: none found; always inf for warm-started local refinement and ``method="opencv"``).
        ambiguous: ``(B,)`` bool: that other minimum fits the data about as well (its cost exceeds
            the answer's by at most ``options.ambiguity_threshold`` residual variances): the data
            do not single out one pose (e.g. the P3P branches of three distinct points).
        trusted: ``(B,)`` bool: ``converged``, and for a warm-started local refinement
            (``SolverOptions(global_search=False)``) also confirmed by the object-space check
            (its object-space error within ``options.warm_start_ratio`` of the best object-space
            minimum): an item refined
            from a pose of another basin (e.g. a reshuffled batch) is not trusted; solve it again
            with the global search.
        covariance: ``(B, 6, 6)`` covariance of ``pose`` (no gradient), from the exact Hessian and
            the residual variance ``cost / (2 n - 6)`` (weights read as relative inverse variances;
            see :mod:`bpnp.covariance`); the 95% ellipsoid held 93-97% of noisy re-solves.
            Computed on first access.
        iterations: the most Levenberg-Marquardt iterations any item of the batch needed.
        backend: the forward solver that ran: ``"native"``, ``"torch"`` or ``"opencv"``.
        inliers: ``(B, n)`` bool, the final inlier set of ``ransac`` (None without RANSAC): the
            points of positive weight within the threshold at RANSAC's pose (at least 6 where the
            problem has them: with fewer inliers, the 6 nearest; ``converged`` is then False).
    """

    pose: Tensor
    R: Tensor
    t: Tensor
    cost: Tensor
    converged: Tensor
    iterations: int
    backend: str = "torch"
    second_cost: Tensor | None = None
    ambiguous: Tensor | None = None
    trusted: Tensor | None = None
    _covariance: Any = field(default=None, repr=False)
    inliers: Tensor | None = None

    @property
    def covariance(self) -> Tensor:
        if callable(self._covariance):
            self._covariance = self._covariance()
        return self._covariance


class _Forward(NamedTuple):
    """What the autograd function needs to know besides the tensors."""

    method: str
    solver: str  # "native", "torch" or "opencv"
    options: SolverOptions
    check_every: int
    loss: str = "l2"


def _pick_solver(method: str, backend: str, device: torch.device) -> str:
    if method == "opencv":
        if backend == "native":
            raise PnPInputError(
                "backend: 'native' runs method='global'; method='opencv' takes backend='auto' or 'torch'"
            )
        return "opencv"
    if backend == "torch":
        return "torch"
    if backend == "native":
        if device.type != "cpu":
            raise BackendUnavailableError(f"backend='native' runs on CPU tensors, got device {device}")
        if not native_available():
            raise BackendUnavailableError(f"backend='native': {native_unavailable_reason()}")
        return "native"
    if device.type != "cpu":
        return "torch"
    if native_available():
        return "native"
    warn_unavailable_once()
    return "torch"


def _forward_solve(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    init_pose: Tensor | None,
    config: _Forward,
    loss_scale: Tensor | None = None,
    dist: Tensor | None = None,
    x2d_start: Tensor | None = None,
) -> PnPSolution:
    # With distortion the least-squares search runs on the undistorted pixels (x2d_start).
    sol = _least_squares_solve(x2d if dist is None else x2d_start, x3d, K, weights, init_pose, config)
    if (config.loss == "l2" and dist is None) or x2d.shape[0] == 0:
        return sol
    # The robust (or distorted) cost: Levenberg-Marquardt from the least-squares answer (a
    # minimum near it; with outliers, RANSAC's pose and inliers are that start).
    return refine_robust(
        sol.R, sol.t, x2d, x3d, K, weights, config.loss, loss_scale, config.options, config.check_every, dist
    )


def _least_squares_solve(
    x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor, init_pose: Tensor | None, config: _Forward
) -> PnPSolution:
    init_R = init_t = None
    if init_pose is not None:
        init_R, init_t = rvec_to_rotmat(init_pose[:, :3]), init_pose[:, 3:]
    if x2d.shape[0] == 0:  # an empty batch (e.g. no detections left): empty answers
        e = x2d.new_empty
        return PnPSolution(
            e(0, 3, 3), e(0, 3), e(0), e(0, 6, 6), torch.zeros(0, dtype=torch.bool, device=x2d.device), 0, e(0, 3)
        )
    if config.solver == "opencv":
        from .solvers.opencv import solve_pnp_opencv

        return solve_pnp_opencv(x2d, x3d, K, weights, config.options)
    if config.solver == "native":
        return solve_pnp_native(x2d, x3d, K, weights, init_R, init_t, config.options)
    return solve_pnp_forward(x2d, x3d, K, weights, init_R, init_t, config.options, check_every=config.check_every)


class _PnPFunction(torch.autograd.Function):
    """Forward: global solve in float64. Backward: the implicit function theorem.

    The backward is written in differentiable tensor ops on the saved inputs and outputs, so a
    double backward (``create_graph=True``) differentiates it exactly: then the Hessian is
    recomputed from the (graph-connected) optimum instead of taken from the forward.
    """

    @staticmethod
    def forward(x2d, x3d, K, weights, loss_scale, dist, x2d_start, init_pose, config):  # type: ignore[override]
        sol = _forward_solve(x2d, x3d, K, weights, init_pose, config, loss_scale, dist, x2d_start)
        rvec = sol.rvec if sol.rvec is not None else rotmat_to_rvec(sol.R)
        pose = torch.cat([rvec, sol.t], -1)
        second = sol.second_cost if sol.second_cost is not None else torch.full_like(sol.cost, float("inf"))
        # trusted: the solver's own check of warm-started answers (the C solver), else unknown (-1)
        trusted = (
            sol.trusted.to(torch.int8)
            if sol.trusted is not None
            else torch.full_like(sol.converged, -1, dtype=torch.int8)
        )
        return pose, sol.cost, sol.converged, sol.R, sol.hess, torch.tensor(sol.iterations), second, trusted

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
            ``"native"`` (CPU only). Same algorithm, same options, same answers.
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
    if backend not in BACKENDS:
        raise PnPInputError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if method not in METHODS:
        raise PnPInputError(f"method: expected one of {METHODS}, got {method!r}")
    if options is None:
        options = SolverOptions()
    elif not isinstance(options, SolverOptions):
        raise PnPInputError(f"options: expected a bpnp.SolverOptions, got {type(options).__name__}")
    if not isinstance(warn, bool):
        raise PnPInputError(f"warn: expected a bool, got {warn!r}")
    ransac = _robust_options(loss, ransac)
    if ransac and method != "global":
        raise PnPInputError("ransac: runs with method='global'")
    x2d_b, x3d_b, K_b, w_b, pose_b, unbatched = canonical_pnp_inputs(x2d, x3d, K, weights, init_pose)
    scale_b = _loss_scale(loss_scale, x2d_b, unbatched)
    dist_b = _distortion(dist, x2d_b, unbatched)
    if dist_b is not None and method != "global":
        raise PnPInputError("dist: runs with method='global'")
    dtype = x2d_b.dtype
    f64 = torch.float64
    if w_b is None:
        w_b = torch.ones(1, x2d_b.shape[1], dtype=f64, device=x2d_b.device)
    check_every = options.check_every or (1 if x2d_b.device.type == "cpu" else 4)
    config = _Forward(method, _pick_solver(method, backend, x2d_b.device), options, check_every)
    # float64 inside: float32 Jacobians cannot locate the optimum to float64 quality. The solver
    # sees the problem in unit-free form (bpnp.normalise): every tolerance is unit-invariant.
    x2d_n, x3d_n, K_n, w_n, norm = normalise_problem(x2d_b.to(f64), x3d_b.to(f64), K_b.to(f64), w_b.to(f64))
    init_n = None if pose_b is None else pose_to_normalised(pose_b.detach().to(f64), norm)
    degenerate = _degenerate(x2d_n.detach(), x3d_n.detach(), w_n.detach())
    if bool(degenerate.any()):
        x2d_n, x3d_n, K_n, w_n = _stand_in(degenerate, x2d_n, x3d_n, K_n, w_n)
        if init_n is not None:
            init_n = torch.where(degenerate[:, None], torch.zeros_like(init_n), init_n)
    scale_n = scale_b.to(f64) / norm.focal  # (B|1, 1): pixels to the normalised units
    dist_n = None if dist_b is None else dist_b.to(f64)  # acts on x/z: no change of units
    x2d_start = start_ok = None
    if dist_n is not None:
        x2d_start, start_ok = _undistorted(x2d_n.detach(), K_n.detach(), dist_n.detach())
    inliers = None
    w_solve = w_n
    if ransac:
        with torch.no_grad():
            found = run_ransac(
                x2d_n.detach() if x2d_start is None else x2d_start,
                x3d_n.detach(),
                K_n.detach(),
                # Points without an undistorted start are never sampled and never count.
                w_n.detach() if start_ok is None else w_n.detach() * start_ok,
                ransac.threshold / norm.focal,
                ransac,
                _local_solver(config),
                native=config.solver == "native",
                keys=item_keys(x2d_b, ransac.seed),
            )
        inliers, support = found.inliers, found.support
        init_n = torch.cat([rotmat_to_rvec(found.R), found.t], -1)
        # The final solve refines RANSAC's pose on its inliers (a global search there could
        # choose another basin than the one the inliers were read in).
        config = config._replace(options=dataclasses.replace(options, global_search=False, check_warm_start=False))
        if dist_n is not None:
            inliers, support, init_n = _distorted_inliers(
                x2d_n,
                x3d_n,
                K_n,
                w_n,
                dist_n,
                x2d_start,
                init_n,
                inliers,
                support,
                ransac.threshold / norm.focal,
                config,
            )
        w_solve = w_n * support.to(f64)
    pose_n, cost, converged, R, hess_n, iters, second, checked = _PnPFunction.apply(
        x2d_n, x3d_n, K_n, w_solve, scale_n, dist_n, x2d_start, init_n, config._replace(loss=loss)
    )
    if inliers is not None:
        converged = converged & found.enough & (inliers.sum(-1) >= MIN_CONSENSUS)
        w_n = w_solve
    # Ambiguity, in the normalised units: the residual variance, floored at float64's resolution
    # of a fit (residuals of 1e-8 focal lengths), so exact fits of several minima count too.
    dof = ((w_n > 0).sum(-1) * 2 - 6).clamp_min(1).to(cost.dtype)
    variance = torch.maximum(cost / dof, 1e-16 * w_n.detach().sum(-1))
    ambiguous = torch.isfinite(second) & (second - cost <= options.ambiguity_threshold * variance)
    bad = degenerate | ~torch.isfinite(pose_n).all(-1) | ~torch.isfinite(R).flatten(1).all(-1)
    if bool(bad.any()):
        # A finite, meaningful answer for items without one: the object's centre on the mean ray
        # of its pixels, at the depth where its size matches theirs; converged False.
        fb_pose, fb_R = _fallback_pose(x2d_n.detach(), K_n.detach(), w_n.detach())
        pose_n = torch.where(bad[:, None], fb_pose, pose_n)
        R = torch.where(bad[:, None, None], fb_R, R)
        converged = converged & ~bad
    trusted = converged
    if init_n is not None and not options.global_search and method == "global" and options.check_warm_start:
        if bool((checked >= 0).all()):  # the C solver checked them
            trusted = converged & (checked > 0)
        else:
            data = (x2d_n.detach(), x3d_n.detach(), K_n.detach(), w_n.detach(), R.detach())
            trusted = converged & warm_start_trusted(*data, options, ratio=options.warm_start_ratio)
    R_n = R.detach()
    pose = pose_from_normalised(pose_n, R, norm)
    cov_args = (hess_n, cost.detach(), dof, pose_n[:, :3].detach(), R.detach(), norm)
    unit = norm.weight[:, 0] * norm.focal[:, 0] ** 2
    cost, second = cost * unit, second * unit
    ambiguous = ambiguous & ~bad
    if bool((bad | ~torch.isfinite(cost)).any()):
        # The cost at the returned pose, also for points behind the camera (finite, documented).
        redo = bad | ~torch.isfinite(cost)
        data = (x2d_b, x3d_b, K_b, w_b)
        real = _plain_cost(pose.detach(), R.detach(), *(x.detach().to(f64) for x in data))
        cost = torch.where(redo, real, cost)
        converged = converged & ~redo
    if warn and not bool(converged.all()):
        bad = int((~converged).sum())
        warnings.warn(
            f"solve_pnp: {bad} of {converged.numel()} problems did not reach a well-posed optimum "
            "(points behind the camera, degenerate geometry or a singular Hessian); their "
            "gradients are regularised. See PnPResult.converged.",
            PnPConvergenceWarning,
            stacklevel=2,
        )
    pose = pose.to(dtype)
    R = R.to(dtype)
    t = pose[..., 3:]
    cost, second = cost.to(dtype), second.to(dtype)

    def covariance() -> Tensor:
        robust = None
        if loss != "l2":
            data = (x2d_n.detach(), x3d_n.detach(), K_n.detach())
            r, J = residual_jacobians(R_n, pose_n[:, 3:].detach(), *data, dist_n)
            robust = robust_spread(r, J, w_n.detach(), loss, scale_n.detach())
        cov = pose_covariance(*cov_args, robust=robust).to(dtype)
        return cov[0] if unbatched else cov

    if unbatched:
        pose, R, t, cost, converged, second, ambiguous, trusted = (
            x[0] for x in (pose, R, t, cost, converged, second, ambiguous, trusted)
        )
        inliers = None if inliers is None else inliers[0]
    return PnPResult(
        pose, R, t, cost, converged, int(iters), config.solver, second, ambiguous, trusted, covariance, inliers
    )


def _robust_options(loss: str, ransac: bool | RansacOptions) -> RansacOptions | None:
    """Check ``loss`` and ``ransac``; the RANSAC options to run (None: no RANSAC)."""
    if loss not in LOSSES:
        raise PnPInputError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if ransac is True:
        return RansacOptions()
    if ransac is False:
        return None
    if not isinstance(ransac, RansacOptions):
        raise PnPInputError(f"ransac: expected a bool or a bpnp.RansacOptions, got {ransac!r}")
    return ransac


def _loss_scale(loss_scale: float | Tensor, x2d: Tensor, unbatched: bool) -> Tensor:
    """``(B|1, 1)`` loss scale tensor (differentiable when given as a tensor), checked."""
    if isinstance(loss_scale, Tensor):
        if loss_scale.device != x2d.device:
            raise PnPInputError(f"loss_scale: expected a tensor on {x2d.device}, got {loss_scale.device}")
        if not loss_scale.is_floating_point():
            raise PnPInputError(f"loss_scale: expected a floating-point tensor, got {loss_scale.dtype}")
        B = x2d.shape[0]
        if loss_scale.dim() == 0:
            scale = loss_scale.reshape(1, 1)
        elif loss_scale.dim() == 1 and loss_scale.shape[0] == B and not unbatched:
            scale = loss_scale[:, None]
        else:
            raise PnPInputError(f"loss_scale: expected shape () or ({B},), got {tuple(loss_scale.shape)}")
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise PnPInputError("loss_scale: expected positive finite values")
        return scale
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)):
        raise PnPInputError(f"loss_scale: expected a positive number or a tensor, got {loss_scale!r}")
    if not math.isfinite(loss_scale) or loss_scale <= 0:
        raise PnPInputError(f"loss_scale: expected a positive finite number, got {loss_scale!r}")
    return torch.full((1, 1), float(loss_scale), dtype=x2d.dtype, device=x2d.device)


def _distortion(dist: Tensor | None, x2d: Tensor, unbatched: bool) -> Tensor | None:
    """``(B|1, 5)`` distortion coefficients, checked (None stays None)."""
    if dist is None:
        return None
    if not isinstance(dist, Tensor):
        raise PnPInputError(f"dist: expected a tensor of shape (5,) or (B, 5), got {type(dist).__name__}")
    if dist.device != x2d.device or dist.dtype != x2d.dtype:
        raise PnPInputError(f"dist: expected {x2d.dtype} on {x2d.device} like x2d, got {dist.dtype} on {dist.device}")
    B = x2d.shape[0]
    if dist.dim() == 1 and dist.shape[0] == 5:
        dist = dist[None]
    elif not (dist.dim() == 2 and dist.shape == (B, 5) and not unbatched):
        raise PnPInputError(f"dist: expected shape (5,) or ({B}, 5) = (k1, k2, p1, p2, k3), got {tuple(dist.shape)}")
    if not bool(torch.isfinite(dist).all()):
        raise PnPInputError("dist: expected finite coefficients")
    return dist


def _undistorted(x2d_n: Tensor, K_n: Tensor, dist: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, n, 2)`` normalised pixels with the distortion removed (the start of the search) and
    ``(B, n)`` where that worked; where the model cannot be inverted, the distorted pixels
    themselves (LM corrects the start; RANSAC leaves such points out)."""
    xd = normalised_rays(x2d_n, K_n)[..., :2]
    xu, ok = undistort_points(xd, dist)
    k22 = K_n[:, 2:3, 2:3]
    xu = xu @ (K_n[:, :2, :2] / k22).transpose(-1, -2) + (K_n[:, :2, 2] / K_n[:, 2:3, 2])[:, None]
    return torch.where(ok[..., None], xu, x2d_n), ok


def _distorted_inliers(
    x2d_n: Tensor,
    x3d_n: Tensor,
    K_n: Tensor,
    w_n: Tensor,
    dist_n: Tensor,
    x2d_start: Tensor,
    init_n: Tensor,
    inliers: Tensor,
    support: Tensor,
    threshold: Tensor,
    config: _Forward,
) -> tuple[Tensor, Tensor, Tensor]:
    """RANSAC's inliers read again in the image (the distorted pixels, where the threshold is
    given): solve on the inliers with the distorted cost, read them at that pose, until they stay
    the same. Returns the inliers, the points to solve on and the pose to start from."""
    local = config._replace(loss="l2")
    pos = w_n > 0
    tau2 = threshold * threshold  # (B|1, 1)
    with torch.no_grad():
        for _ in range(_DISTORTED_ROUNDS):
            w = (w_n * support.to(w_n.dtype)).detach()
            sol = _forward_solve(x2d_n.detach(), x3d_n.detach(), K_n.detach(), w, init_n, local, 1.0, dist_n, x2d_start)
            pose = torch.cat([rotmat_to_rvec(sol.R), sol.t], -1)
            e = (project(x3d_n.detach(), pose, K_n.detach(), dist_n) - x2d_n.detach()).pow(2).sum(-1)
            found = pos & (e < tau2)
            enough = found.sum(-1) >= MIN_CONSENSUS
            usable = enough & torch.isfinite(pose).all(-1)
            changed = usable & (found != inliers).any(-1)
            init_n = torch.where(usable[:, None], pose, init_n)
            inliers = torch.where(usable[:, None], found, inliers)
            support = torch.where(usable[:, None], found, support)
            if not bool(changed.any()):
                break
    return inliers, support, init_n


#: Rounds of reading RANSAC's inliers again in the distorted image.
_DISTORTED_ROUNDS = 3


def _local_solver(config: _Forward):
    """Least squares from a warm start with the layer's forward solver (RANSAC's local step)."""
    local = config._replace(
        options=dataclasses.replace(config.options, global_search=False, check_warm_start=False), loss="l2"
    )

    def solve(x2d: Tensor, x3d: Tensor, K: Tensor, w: Tensor, R: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        sol = _least_squares_solve(x2d, x3d, K, w, torch.cat([rotmat_to_rvec(R), t], -1), local)
        return sol.R, sol.t

    return solve


def _degenerate(x2d_n: Tensor, x3d_n: Tensor, w_n: Tensor) -> Tensor:
    """``(B,)`` items with no pose to find: all 3D points in one place, or all pixels on one point
    (to float64 resolution of the normalised units). Degeneracy that only the weights create
    (e.g. every point but one weighted ~0) is left to the solver's flags and the finite fallback."""
    B = x2d_n.shape[0]
    if B == 0:
        return torch.zeros(0, dtype=torch.bool, device=x2d_n.device)
    spread3 = torch.var(x3d_n, dim=-2, correction=0).sum(-1).expand(B)
    spread2 = torch.var(x2d_n, dim=-2, correction=0).sum(-1)
    return (spread3 <= 1e-24) | (spread2 <= 1e-24)


def _stand_in(degenerate: Tensor, x2d: Tensor, x3d: Tensor, K: Tensor, w: Tensor) -> tuple[Tensor, ...]:
    """Replace the degenerate items by a fixed well-posed problem (same n), so that the solvers
    never see them; their answers are replaced afterwards."""
    B, n, _ = x2d.shape
    i = torch.arange(n, dtype=x2d.dtype, device=x2d.device)
    # Points on a twisted curve in the unit box: non-planar for any n >= 4.
    pts = torch.stack([torch.cos(2.4 * i), torch.sin(2.4 * i), torch.remainder(0.618 * i, 1.0) * 2 - 1], -1)
    pts = pts - pts.mean(0)
    K_d = torch.eye(3, dtype=x2d.dtype, device=x2d.device)
    uv = pts[:, :2] / (pts[:, 2:] + 5.0)  # the identity rotation, t = (0, 0, 5)
    sel3 = degenerate[:, None, None]
    x2d = torch.where(sel3, uv.expand(B, n, 2), x2d)
    x3d = torch.where(sel3, pts.expand(B, n, 3), x3d.expand(B, n, 3))
    K = torch.where(sel3, K_d.expand(B, 3, 3), K.expand(B, 3, 3))
    w = torch.where(degenerate[:, None], torch.ones_like(x2d[..., 0]), w.expand(B, n))
    return x2d, x3d, K, w


def _fallback_pose(x2d_n: Tensor, K_n: Tensor, w_n: Tensor) -> tuple[Tensor, Tensor]:
    """``[rvec, t_n] (B, 6)`` and ``R (B, 3, 3)``: identity rotation, the (unit-size, centred)
    object on the weighted mean ray of the pixels at the depth that matches their spread."""
    B = x2d_n.shape[0]
    w = w_n.expand(B, -1)
    rays = normalised_rays(x2d_n, K_n)  # BxNx3
    wsum = w.sum(-1, keepdim=True).clamp_min(1e-300)
    mean = (w[..., None] * rays).sum(1) / wsum  # Bx3
    spread = ((w * (rays - mean[:, None]).pow(2).sum(-1)).sum(-1) / wsum[:, 0]).sqrt()
    depth = (1.0 / spread.clamp_min(1e-300)).clamp(1.0, 1e6)
    t = torch.nan_to_num(mean * depth[:, None], nan=0.0, posinf=0.0, neginf=0.0)
    t[:, 2] = torch.where(t[:, 2] > 0, t[:, 2], torch.ones_like(t[:, 2]))
    R = torch.eye(3, dtype=x2d_n.dtype, device=x2d_n.device).expand(B, 3, 3)
    return torch.cat([torch.zeros_like(t), t], -1), R


def _plain_cost(pose: Tensor, R: Tensor, x2d: Tensor, x3d: Tensor, K: Tensor, w: Tensor) -> Tensor:
    """``(B,)`` weighted squared reprojection error at the poses, points behind the camera
    projected as they are (the shared per-point kernel, unclamped); the largest float where it
    overflows (a point at depth 0)."""
    pt = point_terms(R, pose[:, 3:], x2d, x3d, K)
    cost = (w.expand_as(pt.ru) * (pt.ru * pt.ru + pt.rv * pt.rv)).sum(-1)
    big = torch.finfo(cost.dtype).max
    return torch.nan_to_num(cost, nan=big, posinf=big)


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
        _robust_options(loss, ransac)
        self.loss = loss
        self.loss_scale = loss_scale
        self.ransac = ransac
        if options is not None and not isinstance(options, SolverOptions):
            raise PnPInputError(f"options: expected a bpnp.SolverOptions, got {type(options).__name__}")
        if backend not in BACKENDS:
            raise PnPInputError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if method not in METHODS:
            raise PnPInputError(f"method: expected one of {METHODS}, got {method!r}")
        self.options = SolverOptions() if options is None else options
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
