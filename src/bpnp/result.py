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
        t: ``(B, 3)`` translation (``pose[..., 3:]``); differentiable.
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

    @classmethod
    def with_views(
        cls,
        pose: Tensor,
        R: Tensor,
        cost: Tensor,
        flags: Tensor,
        iterations: int,
        backend: str,
        second_cost: Tensor,
        covariance: Any,
        unbatched: bool,
    ) -> PnPResult:
        """A result whose ``t`` and ``converged``, ``ambiguous``, ``trusted`` are views of ``pose``
        and ``flags`` made on first access: a small solve's forward and backward spent ~12% on
        making (and freeing) those views, which a training loop seldom reads.

        Args:
            pose: ``(B, 6)``; R: ``(B, 3, 3)``; cost, second_cost: ``(B,)``.
            flags: ``(B, k)`` bool, k >= 3: converged, ambiguous, trusted in its first columns.
            unbatched: the fields are the first item's (shapes without B); the views too.
        """
        result = cls.__new__(cls)
        if unbatched:
            pose, R, cost, second_cost, flags = pose[0], R[0], cost[0], second_cost[0], flags[0]
        result.__dict__.update(
            pose=pose, R=R, cost=cost, iterations=iterations, backend=backend, second_cost=second_cost,
            _covariance=covariance, inliers=None, _views=flags,
        )  # fmt: skip
        return result

    def __getattr__(self, name: str) -> Any:
        # Reached only for an attribute not set: one of with_views' fields, made now.
        column = _VIEW_COLUMNS.get(name)
        flags = self.__dict__.get("_views")
        if column is None or flags is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = self.__dict__["pose"][..., 3:] if column < 0 else flags[..., column]
        self.__dict__[name] = value
        return value


#: The fields PnPResult.with_views leaves to first access: a column of the flags, -1 for t.
_VIEW_COLUMNS = {"t": -1, "converged": 0, "ambiguous": 1, "trusted": 2}
# A field's default is a class attribute, which __getattr__ would never see missing; __init__ keeps
# the defaults in its signature.
del PnPResult.ambiguous, PnPResult.trusted
