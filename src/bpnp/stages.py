"""The stages of :func:`bpnp.solve_pnp`, each with one job: check the settings, prepare the
inputs (canonical shapes, the unit-free float64 problem, stand-ins for degenerate items, the
undistorted start), the robust start (RANSAC and its inliers), the forward solve (the solver a
backend names), and the post-processing (flags, fallbacks, units, covariance, unbatching).
:mod:`bpnp.layer` strings them together around the autograd function.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from .checks import canonical_pnp_inputs
from .cost import LOSSES, point_terms, residual_jacobians
from .covariance import pose_covariance, robust_spread
from .errors import BackendUnavailableError, PnPConvergenceWarning, PnPInputError
from .geometry import project, rotmat_to_rvec, rvec_to_rotmat, undistort_points
from .normalise import Normalisation, normalise_problem, pose_from_normalised, pose_to_normalised
from .options import RansacOptions, SolverOptions
from .result import PnPResult
from .solvers.candidates import normalised_rays, warm_start_trusted
from .solvers.native import native_available, native_unavailable_reason, solve_pnp_native, warn_unavailable_once
from .solvers.pnp import PnPSolution, refine_robust, solve_pnp_forward
from .solvers.ransac import MIN_CONSENSUS, item_keys
from .solvers.ransac import ransac as run_ransac

METHODS = ("global", "opencv")
BACKENDS = ("auto", "torch", "native")


#: Frozen: one instance serves every call without options (building one checks 31 fields).
_DEFAULT_OPTIONS = SolverOptions()


class Settings(NamedTuple):
    """The non-tensor arguments of :func:`bpnp.solve_pnp`, checked."""

    method: str
    backend: str
    options: SolverOptions
    loss: str
    ransac: RansacOptions | None
    warn: bool


def check_settings(
    method: str, backend: str, options: SolverOptions | None, loss: str, ransac: bool | RansacOptions, warn: bool = True
) -> Settings:
    """The settings of a solve (or of a :class:`bpnp.BPnP`), checked; ``PnPInputError`` names a bad one."""
    if backend not in BACKENDS:
        raise PnPInputError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if method not in METHODS:
        raise PnPInputError(f"method: expected one of {METHODS}, got {method!r}")
    if options is None:
        options = _DEFAULT_OPTIONS
    elif not isinstance(options, SolverOptions):
        raise PnPInputError(f"options: expected a bpnp.SolverOptions, got {type(options).__name__}")
    if not isinstance(warn, bool):
        raise PnPInputError(f"warn: expected a bool, got {warn!r}")
    robust = _robust_options(loss, ransac)
    if robust and method != "global":
        raise PnPInputError("ransac: runs with method='global'")
    return Settings(method, backend, options, loss, robust, warn)


class Forward(NamedTuple):
    """What the autograd function needs to know besides the tensors."""

    method: str
    solver: str  # "native", "torch" or "opencv"
    options: SolverOptions
    check_every: int
    loss: str = "l2"


def pick_solver(method: str, backend: str, device: torch.device) -> str:
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


def forward_solve(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor,
    init_pose: Tensor | None,
    config: Forward,
    loss_scale: Tensor | None = None,
    dist: Tensor | None = None,
    x2d_start: Tensor | None = None,
) -> PnPSolution:
    # With distortion the least-squares search runs on the undistorted pixels (x2d_start).
    sol = least_squares_solve(x2d if dist is None else x2d_start, x3d, K, weights, init_pose, config)
    if (config.loss == "l2" and dist is None) or x2d.shape[0] == 0:
        return sol
    # The robust (or distorted) cost: Levenberg-Marquardt from the least-squares answer (a
    # minimum near it; with outliers, RANSAC's pose and inliers are that start).
    return refine_robust(
        sol.R, sol.t, x2d, x3d, K, weights, config.loss, loss_scale, config.options, config.check_every, dist
    )


def least_squares_solve(
    x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor, init_pose: Tensor | None, config: Forward
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


class Problem(NamedTuple):
    """A batch of problems as the solvers see it, with what is needed to map answers back."""

    x2d: Tensor  # (B, n, 2) canonical inputs, the user's units and dtype
    x3d: Tensor  # (B|1, n, 3)
    K: Tensor  # (B|1, 3, 3)
    w: Tensor  # (B|1, n) float64
    unbatched: bool
    dtype: torch.dtype
    x2d_n: Tensor  # the unit-free float64 problem (bpnp.normalise), degenerate items replaced
    x3d_n: Tensor
    K_n: Tensor
    w_n: Tensor
    norm: Normalisation
    init_n: Tensor | None  # (B, 6) warm start, normalised
    degenerate: Tensor  # (B,) items with no pose to find
    scale_n: Tensor  # (B|1, 1) robust loss scale, normalised
    dist_n: Tensor | None  # (B|1, 5)
    x2d_start: Tensor | None  # (B, n, 2) undistorted normalised pixels (with dist)
    start_ok: Tensor | None  # (B, n) where the undistortion has an answer
    config: Forward
    own_n: tuple[Tensor, Tensor, Tensor]  # x2d_n, K_n, w_n before the stand-ins (detached)


def prepare(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor | None,
    init_pose: Tensor | None,
    loss_scale: float | Tensor,
    dist: Tensor | None,
    settings: Settings,
) -> Problem:
    """Check the tensors and build the problem the solvers see (shapes as :func:`bpnp.solve_pnp`)."""
    x2d_b, x3d_b, K_b, w_b, pose_b, unbatched = canonical_pnp_inputs(x2d, x3d, K, weights, init_pose)
    scale_b = _loss_scale(loss_scale, x2d_b, unbatched)
    dist_b = check_distortion(dist, x2d_b, unbatched)
    if dist_b is not None and settings.method != "global":
        raise PnPInputError("dist: runs with method='global'")
    f64 = torch.float64
    if w_b is None:
        w_b = torch.ones(1, x2d_b.shape[1], dtype=f64, device=x2d_b.device)
    options = settings.options
    check_every = options.check_every or (1 if x2d_b.device.type == "cpu" else 4)
    config = Forward(
        settings.method, pick_solver(settings.method, settings.backend, x2d_b.device), options, check_every
    )
    # float64 inside: float32 Jacobians cannot locate the optimum to float64 quality. The solver
    # sees the problem in unit-free form (bpnp.normalise): every tolerance is unit-invariant.
    x2d_n, x3d_n, K_n, w_n, norm = normalise_problem(x2d_b.to(f64), x3d_b.to(f64), K_b.to(f64), w_b.to(f64))
    init_n = None if pose_b is None else pose_to_normalised(pose_b.detach().to(f64), norm)
    degenerate = _degenerate(x2d_n.detach(), x3d_n.detach(), w_n.detach())
    own_n = (x2d_n.detach(), K_n.detach(), w_n.detach())
    if bool(degenerate.any()):
        x2d_n, x3d_n, K_n, w_n = _stand_in(degenerate, x2d_n, x3d_n, K_n, w_n)
        if init_n is not None:
            init_n = torch.where(degenerate[:, None], torch.zeros_like(init_n), init_n)
    scale_n = scale_b.to(f64) / norm.focal  # (B|1, 1): pixels to the normalised units
    dist_n = None if dist_b is None else dist_b.to(f64)  # acts on x/z: no change of units
    x2d_start = start_ok = None
    if dist_n is not None:
        x2d_start, start_ok = _undistorted(x2d_n.detach(), K_n.detach(), dist_n.detach())
    return Problem(
        x2d_b, x3d_b, K_b, w_b, unbatched, x2d_b.dtype, x2d_n, x3d_n, K_n, w_n, norm, init_n, degenerate, scale_n,
        dist_n, x2d_start, start_ok, config, own_n,
    )  # fmt: skip


class Start(NamedTuple):
    """Where the final solve starts and on which points."""

    init_n: Tensor | None  # (B, 6) normalised warm start
    w_solve: Tensor  # (B|1, n) the weights it solves with
    inliers: Tensor | None  # (B, n) RANSAC's inliers (None without RANSAC)
    enough: Tensor | None  # (B,) RANSAC found a consensus chance does not explain
    config: Forward


def robust_start(problem: Problem, settings: Settings) -> Start:
    """RANSAC's inliers and pose (with ``dist``, read again in the image), or the plain start."""
    ransac = settings.ransac
    if not ransac:
        return Start(problem.init_n, problem.w_n, None, None, problem.config)
    p = problem
    with torch.no_grad():
        found = run_ransac(
            p.x2d_n.detach() if p.x2d_start is None else p.x2d_start,
            p.x3d_n.detach(),
            p.K_n.detach(),
            # Points without an undistorted start are never sampled and never count.
            p.w_n.detach() if p.start_ok is None else p.w_n.detach() * p.start_ok,
            ransac.threshold / p.norm.focal,
            ransac,
            _local_solver(p.config),
            native=p.config.solver == "native",
            keys=item_keys(p.x2d, ransac.seed),
        )
    inliers, support = found.inliers, found.support
    init_n = torch.cat([rotmat_to_rvec(found.R), found.t], -1)
    # The final solve refines RANSAC's pose on its inliers (a global search there could choose
    # another basin than the one the inliers were read in).
    options = dataclasses.replace(settings.options, global_search=False, check_warm_start=False)
    config = p.config._replace(options=options)
    if p.dist_n is not None:
        inliers, support, init_n = _distorted_inliers(
            p.x2d_n, p.x3d_n, p.K_n, p.w_n, p.dist_n, p.x2d_start, init_n, inliers, support,
            ransac.threshold / p.norm.focal, config,
        )  # fmt: skip
    return Start(init_n, p.w_n * support.to(p.w_n.dtype), inliers, found.enough, config)


class Solved(NamedTuple):
    """What the autograd function returns (normalised units)."""

    pose_n: Tensor  # (B, 6)
    cost: Tensor  # (B,)
    converged: Tensor  # (B,)
    R: Tensor  # (B, 3, 3)
    hess: Tensor  # (B, 6, 6)
    iterations: Tensor  # ()
    second: Tensor  # (B,)
    checked: Tensor  # (B,) int8: the C solver's warm-start check (1/0), else -1

    @classmethod
    def from_solution(cls, sol: PnPSolution) -> Solved:
        """A forward solver's answer as the autograd function returns it."""
        rvec = sol.rvec if sol.rvec is not None else rotmat_to_rvec(sol.R)
        second = sol.second_cost if sol.second_cost is not None else torch.full_like(sol.cost, float("inf"))
        # trusted: the solver's own check of warm-started answers (the C solver), else unknown (-1)
        checked = (
            sol.trusted.to(torch.int8)
            if sol.trusted is not None
            else torch.full_like(sol.converged, -1, dtype=torch.int8)
        )
        pose = torch.cat([rvec, sol.t], -1)
        return cls(pose, sol.cost, sol.converged, sol.R, sol.hess, torch.tensor(sol.iterations), second, checked)


def finish(
    problem: Problem, start: Start, solved: Solved, settings: Settings, flags: tuple[Tensor, ...] | None = None
) -> PnPResult:
    """Flags, fallbacks for items without an answer, the user's units and dtype, the covariance
    (on demand), the warning, and the unbatched view (``flags``: :func:`answer_flags`' answer,
    when the caller has it already)."""
    p, options = problem, settings.options
    w_n = start.w_solve
    if flags is None:
        flags = answer_flags(p, start, solved, options)
    pose_n, R, converged, ambiguous, trusted, bad, dof = flags
    R_n = R.detach()
    pose = pose_from_normalised(pose_n, R, p.norm)
    unit = p.norm.weight[:, 0] * p.norm.focal[:, 0] ** 2
    cost, second = solved.cost * unit, solved.second * unit
    if bool((bad | ~torch.isfinite(cost)).any()):
        # The cost at the returned pose, also for points behind the camera (finite, documented).
        redo = bad | ~torch.isfinite(cost)
        data = (x.detach().to(torch.float64) for x in (p.x2d, p.x3d, p.K, p.w))
        cost = torch.where(redo, _plain_cost(pose.detach(), R.detach(), *data), cost)
        converged = converged & ~redo
    if settings.warn and not bool(converged.all()):
        warnings.warn(
            f"solve_pnp: {int((~converged).sum())} of {converged.numel()} problems did not reach a well-posed "
            "optimum (points behind the camera, degenerate geometry, a singular Hessian, or too few RANSAC "
            "inliers); their gradients are regularised. See PnPResult.converged.",
            PnPConvergenceWarning,
            stacklevel=3,
        )
    cov_args = (solved.hess, solved.cost.detach(), dof, pose_n[:, :3].detach(), R_n, p.norm)
    robust_args = None
    if settings.loss != "l2":
        at = (R_n, pose_n[:, 3:].detach(), p.x2d_n.detach(), p.x3d_n.detach(), p.K_n.detach(), p.dist_n)
        robust_args = (at, w_n.detach(), settings.loss, p.scale_n.detach())
    covariance = functools.partial(_covariance, cov_args, robust_args, p.dtype, p.unbatched)
    pose = pose.to(p.dtype)
    fields = [pose, R.to(p.dtype), pose[..., 3:], cost.to(p.dtype), converged]
    rest = [second.to(p.dtype), ambiguous, trusted]
    inliers = start.inliers
    if p.unbatched:
        fields, rest = [x[0] for x in fields], [x[0] for x in rest]
        inliers = None if inliers is None else inliers[0]
    return PnPResult(*fields, int(solved.iterations), p.config.solver, *rest, covariance, inliers)


def _covariance(cov_args: tuple, robust_args: tuple | None, dtype: torch.dtype, unbatched: bool) -> Tensor:
    """:attr:`PnPResult.covariance` of :func:`finish`, computed on first access (a module function
    and its arguments, so that a result pickles): ``cov_args`` as
    :func:`bpnp.covariance.pose_covariance` takes them; ``robust_args``: for a robust loss (None
    for l2) :func:`bpnp.cost.residual_jacobians`' arguments (the normalised answer and problem),
    the weights, the loss and its scale."""
    robust = None
    if robust_args is not None:
        at, w, loss, scale = robust_args
        r, J = residual_jacobians(*at)
        robust = robust_spread(r, J, w, loss, scale)
    cov = pose_covariance(*cov_args, robust=robust).to(dtype)
    return cov[0] if unbatched else cov


def answer_flags(p: Problem, start: Start, solved: Solved, options: SolverOptions) -> tuple[Tensor, ...]:
    """``pose_n, R, converged, ambiguous, trusted, bad, dof``: the answer with a fallback where it
    is not finite, and the per-item flags."""
    w_n = start.w_solve
    converged = solved.converged
    if start.inliers is not None:
        converged = converged & start.enough & (start.inliers.sum(-1) >= MIN_CONSENSUS)
    # Ambiguity, in the normalised units: the residual variance, floored at float64's resolution
    # of a fit (residuals of 1e-8 focal lengths), so exact fits of several minima count too.
    cost = solved.cost
    dof = ((w_n > 0).sum(-1) * 2 - 6).clamp_min(1).to(cost.dtype)
    variance = torch.maximum(cost / dof, 1e-16 * w_n.detach().sum(-1))
    ambiguous = torch.isfinite(solved.second) & (solved.second - cost <= options.ambiguity_threshold * variance)
    pose_n, R = solved.pose_n, solved.R
    bad = p.degenerate | ~torch.isfinite(pose_n).all(-1) | ~torch.isfinite(R).flatten(1).all(-1)
    if bool(bad.any()):
        # A finite, meaningful answer for items without one: the object's centre on the mean ray
        # of its pixels, at the depth where its size matches theirs; converged False.
        # from the item's own pixels (a degenerate item's stand-in has none of its data)
        x2d_own, K_own, w_own = p.own_n
        w_fb = torch.where(p.degenerate[:, None], w_own, w_n.detach())
        fb_pose, fb_R = _fallback_pose(x2d_own, K_own, w_fb)
        pose_n = torch.where(bad[:, None], fb_pose, pose_n)
        R = torch.where(bad[:, None, None], fb_R, R)
        converged = converged & ~bad
    trusted = converged
    config = start.config
    if start.init_n is not None and not config.options.global_search and config.method == "global":
        if config.options.check_warm_start:
            if bool((solved.checked >= 0).all()):  # the C solver checked them
                trusted = converged & (solved.checked > 0)
            else:
                data = (p.x2d_n.detach(), p.x3d_n.detach(), p.K_n.detach(), w_n.detach(), R.detach())
                trusted = converged & warm_start_trusted(*data, config.options, ratio=config.options.warm_start_ratio)
    return pose_n, R, converged, ambiguous & ~bad, trusted, bad, dof


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


def check_distortion(dist: Tensor | None, x2d: Tensor, unbatched: bool) -> Tensor | None:
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
    config: Forward,
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
            sol = forward_solve(x2d_n.detach(), x3d_n.detach(), K_n.detach(), w, init_n, local, 1.0, dist_n, x2d_start)
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


def _local_solver(config: Forward):
    """Least squares from a warm start with the layer's forward solver (RANSAC's local step)."""
    local = config._replace(
        options=dataclasses.replace(config.options, global_search=False, check_warm_start=False), loss="l2"
    )

    def solve(x2d: Tensor, x3d: Tensor, K: Tensor, w: Tensor, R: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        sol = least_squares_solve(x2d, x3d, K, w, torch.cat([rotmat_to_rvec(R), t], -1), local)
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
