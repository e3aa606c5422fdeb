"""The answer of :func:`bpnp.solve_pnp`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["PnPResult"]


@dataclass
class PnPResult:
    """Answer of :func:`solve_pnp`.

    Attributes:
        pose: ``(B, 6)`` ``[rvec, t]``, OpenCV convention; differentiable.
        R: ``(B, 3, 3)`` rotation of the pose; differentiable.
        t: ``(B, 3)`` translation, the view ``pose[..., 3:]``; differentiable.
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
            the residual variance ``cost / (2 n - 6)`` (weights read as relative inverse variances),
            for huber and cauchy Huber's pooled sandwich (see :mod:`bpnp.covariance`); the 95%
            ellipsoid held 93-96% of noisy re-solves.
            Computed on first access.
        iterations: the most Levenberg-Marquardt iterations any item of the batch needed (inside
            :func:`torch.compile`, a 0-dim tensor: reading it would be a host sync).
        backend: the forward solver that ran: ``"native"``, ``"torch"`` or ``"opencv"``.
        inliers: ``(B, n)`` bool, the final inlier set of ``ransac`` (None without RANSAC): the
            points of positive weight within the threshold at the returned pose (in the image's
            pixels, also with ``dist``); with fewer than 4, or a consensus that chance explains,
            ``converged`` is False (the pose is then solved on the 4 nearest points).
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


def _translation(self: PnPResult) -> Tensor:
    found = self.__dict__.get("_t")
    if found is None:
        found = self.__dict__["_t"] = self.pose[..., 3:]
    return found


def _set_translation(self: PnPResult, t: Tensor | None) -> None:
    self.__dict__["_t"] = t


# A solver may pass t=None: the view pose[..., 3:] is then made on first access. A view of a
# differentiable tensor costs ~5% of a small problem's forward and backward (bpnp.fused).
# (A property set after @dataclass: set in the class body, it would be t's default value.)
PnPResult.t = property(_translation, _set_translation, doc="``(B, 3)`` translation, the view ``pose[..., 3:]``.")  # type: ignore[assignment,method-assign]  # fmt: skip
