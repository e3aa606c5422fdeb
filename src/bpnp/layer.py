"""The differentiable PnP layer: ``solve_pnp`` (functional) and ``BPnP`` (module)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .checks import PnPInputError, canonical_pnp_inputs
from .geometry import rotmat_to_rvec, rvec_to_rotmat
from .implicit import implicit_vjp
from .solvers.native import native_available, native_unavailable_reason, solve_pnp_native
from .solvers.pnp import PnPSolution, solve_pnp_forward

__all__ = ["PnPResult", "solve_pnp", "BPnP", "PnPConvergenceWarning"]

_METHODS = ("global", "opencv")
_BACKENDS = ("auto", "torch", "native")


class PnPConvergenceWarning(RuntimeWarning):
    """Some items of a batch did not reach a well-posed optimum (see ``PnPResult.converged``)."""


@dataclass
class PnPResult:
    """Answer of :func:`solve_pnp`.

    Attributes:
        pose: ``(B, 6)`` ``[rvec, t]``, OpenCV convention; differentiable.
        R: ``(B, 3, 3)`` rotation of the pose; differentiable.
        t: ``(B, 3)`` translation; differentiable.
        cost: ``(B,)`` weighted squared reprojection error at the answer (no gradient).
        converged: ``(B,)`` bool; False when the solve did not reach a well-posed optimum
            (points behind the camera, degenerate points, singular Hessian).
        iterations: Levenberg-Marquardt iterations the batch ran.
    """

    pose: Tensor
    R: Tensor
    t: Tensor
    cost: Tensor
    converged: Tensor
    iterations: int


def _use_native(backend: str, x2d: Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "native":
        if x2d.device.type != "cpu":
            raise PnPInputError(f"backend='native' runs on CPU tensors, got device {x2d.device}")
        if not native_available():
            raise RuntimeError(f"backend='native': {native_unavailable_reason()}")
        return True
    return x2d.device.type == "cpu" and native_available()


class _PnPFunction(torch.autograd.Function):
    """Forward: global solve in float64. Backward: implicit function theorem."""

    @staticmethod
    def forward(x2d, x3d, K, weights, init_pose, options):  # type: ignore[override]
        init_R = init_t = None
        if init_pose is not None:
            init_R = rvec_to_rotmat(init_pose[:, :3])
            init_t = init_pose[:, 3:]
        if x2d.shape[0] == 0:  # an empty batch (e.g. no detections left): empty answers
            e = x2d.new_empty
            sol = PnPSolution(e(0, 3, 3), e(0, 3), e(0), e(0, 6, 6),
                              torch.zeros(0, dtype=torch.bool, device=x2d.device), 0, e(0, 3))
        elif options["method"] == "opencv":
            from .solvers.opencv import solve_pnp_opencv

            sol = solve_pnp_opencv(x2d, x3d, K, weights)
        elif _use_native(options["backend"], x2d):
            sol = solve_pnp_native(
                x2d, x3d, K, weights, init_R, init_t, num_candidates=options["num_candidates"],
                max_iter=options["max_iter"], global_search=options["global_search"],
            )
        else:
            sol = solve_pnp_forward(
                x2d, x3d, K, weights, init_R, init_t,
                num_candidates=options["num_candidates"], max_iter=options["max_iter"],
                global_search=options["global_search"], check_every=options["check_every"],
            )
        rvec = sol.rvec if sol.rvec is not None else rotmat_to_rvec(sol.R)
        pose = torch.cat([rvec, sol.t], -1)
        return pose, sol.cost, sol.converged, sol.R, sol.t, sol.hess, torch.tensor(sol.iterations)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x2d, x3d, K, weights, _, _ = inputs
        pose, cost, converged, R, t, hess, _ = output
        ctx.save_for_backward(x2d, x3d, K, weights, pose, R, t, hess)
        # pose and R are differentiable outputs (R directly, which spares a Rodrigues map).
        ctx.mark_non_differentiable(cost, converged, t, hess, output[6])

    @staticmethod
    def backward(ctx: Any, grad_pose: Tensor | None, _c: Any, _v: Any, grad_R: Tensor | None,
                 *_: Any):  # type: ignore[override]
        x2d, x3d, K, weights, pose, R, t, hess = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        if (grad_pose is None and grad_R is None) or not any(needs):
            return None, None, None, None, None, None
        if grad_pose is None:
            grad_pose = torch.zeros_like(pose)
        grads = implicit_vjp(grad_pose, pose[:, :3], R, t, hess, x2d, x3d, K, weights, needs, grad_R)
        return (*grads, None, None)


def solve_pnp(
    x2d: Tensor,
    x3d: Tensor,
    K: Tensor,
    weights: Tensor | None = None,
    init_pose: Tensor | None = None,
    method: str = "global",
    num_candidates: int = 4,
    max_iter: int = 100,
    warn: bool = True,
    global_search: bool = True,
    check_every: int | None = None,
    backend: str = "auto",
) -> PnPResult:
    """Pose that minimises the weighted reprojection error; differentiable in every input.

    Minimises ``sum_i w_i ||pi(R x3d_i + t; K) - x2d_i||^2`` (pixels). The forward solve is
    batched and global (object-space multi-start, then exact-Hessian Levenberg-Marquardt in
    float64); the backward is exact, by the implicit function theorem at the optimum.

    Args:
        x2d: ``(B, n, 2)`` or ``(n, 2)`` image points in pixels, n >= 4.
        x3d: ``(n, 3)`` shared by the batch or ``(B, n, 3)`` object points.
        K: ``(3, 3)`` or ``(B, 3, 3)`` upper-triangular camera matrices.
        weights: ``(n,)`` or ``(B, n)`` non-negative per-point weights (default all ones).
        init_pose: ``(B, 6)`` warm start ``[rvec, t]`` (an extra candidate; the answer does not
            depend on it when the optimum is unique).
        method: ``"global"`` (default) or ``"opencv"`` (``cv2.solvePnP`` SQPnP + our LM per item,
            for comparison; needs ``opencv-python``).
        num_candidates: object-space minima refined per item (more is safer, slower).
        max_iter: Levenberg-Marquardt iteration cap.
        warn: emit a :class:`PnPConvergenceWarning` when some items did not converge.
        global_search: with ``init_pose``, ``False`` skips the global initialisation and only
            refines the warm start: several times faster, meant for training loops whose
            problems change little per step, but without the global-optimum guarantee.
        check_every: the torch solver's loop asks the device whether all items are done every
            this many iterations (each ask is a host-device synchronisation on a GPU); stopped
            items stay frozen meanwhile, so the answer does not depend on it. Default: 1 on the
            CPU, 4 on other devices.
        backend: ``"auto"`` (default: the compiled C solver for CPU tensors when it could be
            built, see :mod:`bpnp.solvers.native`; the torch solver otherwise, e.g. on GPU),
            ``"torch"`` (batched tensor ops on any device) or ``"native"`` (CPU only; an error
            when no C compiler is available). Same algorithm, same answers to ~1e-12.
    Returns:
        :class:`PnPResult` in the dtype and on the device of the inputs (unbatched if ``x2d``
        was ``(n, 2)``).
    Raises:
        PnPInputError (a ValueError): bad shapes, n < 4, NaN/inf, negative weights, bad K,
        mixed devices or dtypes.
    """
    if backend not in _BACKENDS:
        raise PnPInputError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if method not in _METHODS:
        raise PnPInputError(f"method: expected one of {_METHODS}, got {method!r}")
    x2d_b, x3d_b, K_b, w_b, pose_b, unbatched = canonical_pnp_inputs(x2d, x3d, K, weights, init_pose)
    dtype = x2d_b.dtype
    f64 = torch.float64
    if w_b is None:
        w_b = torch.ones(1, x2d_b.shape[1], dtype=f64, device=x2d_b.device)
    # float64 inside: float32 Jacobians cannot locate the optimum to float64 quality.
    if check_every is None:
        check_every = 1 if x2d_b.device.type == "cpu" else 4
    if not isinstance(check_every, int) or check_every < 1:
        raise PnPInputError(f"check_every: expected a positive int, got {check_every!r}")
    options = {"method": method, "num_candidates": num_candidates, "max_iter": max_iter,
               "global_search": global_search, "check_every": check_every, "backend": backend}
    pose, cost, converged, R, _, _, iters = _PnPFunction.apply(
        x2d_b.to(f64), x3d_b.to(f64), K_b.to(f64), w_b.to(f64),
        None if pose_b is None else pose_b.detach().to(f64), options,
    )
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
    t = pose[:, 3:]
    cost = cost.to(dtype)
    if unbatched:
        pose, R, t, cost, converged = pose[0], R[0], t[0], cost[0], converged[0]
    return PnPResult(pose, R, t, cost, converged, int(iters))


class BPnP(nn.Module):
    """The PnP layer as a module: ``layer(x2d, x3d, K, weights=None) -> pose (B, 6)``.

    Args:
        method, num_candidates, max_iter, backend: as in :func:`solve_pnp`.
        warm_start: pass the previous call's poses as ``init_pose`` when the batch shape
            matches (handy in training loops that re-solve similar problems).
        global_search: as in :func:`solve_pnp`; ``False`` with ``warm_start`` refines only
            from the previous poses after the first call.
    """

    def __init__(self, method: str = "global", num_candidates: int = 4, max_iter: int = 100,
                 warm_start: bool = False, global_search: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend
        self.method = method
        self.num_candidates = num_candidates
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.global_search = global_search
        self._last: Tensor | None = None

    def forward(self, x2d: Tensor, x3d: Tensor, K: Tensor, weights: Tensor | None = None) -> Tensor:
        """Solve and return the pose ``(B, 6)`` (or ``(6,)`` for unbatched input)."""
        init = None
        if self.warm_start and self._last is not None and self._last.shape[:-1] == x2d.shape[:-2]:
            init = self._last.to(x2d)
        res = solve_pnp(x2d, x3d, K, weights, init_pose=init, method=self.method,
                        num_candidates=self.num_candidates, max_iter=self.max_iter,
                        global_search=self.global_search, backend=self.backend)
        if self.warm_start:
            self._last = res.pose.detach()
        return res.pose

    def extra_repr(self) -> str:
        return f"method={self.method!r}, num_candidates={self.num_candidates}, max_iter={self.max_iter}"
