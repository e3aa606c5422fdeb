"""Losses through the PnP layer.

The keypoints a network predicts are turned into a pose by the layer, and the loss is measured
on that pose; its gradient reaches the keypoints exactly through the implicit function theorem.

- :class:`BPnPReprojectionLoss`, the paper's ``|| pi(z | BPnP(x_hat, z, K)) - x_gt ||^2``: the
  error in the image (pixels^2).
- :class:`BPnPADDLoss`: the error in the object's own space, the ADD of the model points under the
  BPnP pose against the true pose (a fraction of a length scale, e.g. the diameter). A pixel-space
  loss hardly sees the depth of a pose (a 1% depth error moves a 90 px object's rim by under
  half a pixel), and under rotation uncertainty its optimum is a constellation pulled towards its
  centre, which PnP places too far away; ADD weighs a depth error like any other error of that
  length (docs/objpose.md, "Where it stands: the depth bias, and a BPnP loss that sees it").
"""

from __future__ import annotations

from torch import Tensor, nn

from .geometry import project
from .layer import solve_pnp
from .metrics import add
from .options import SolverOptions
from .result import PnPResult

__all__ = ["BPnPReprojectionLoss", "BPnPADDLoss", "keypoint_loss"]


def keypoint_loss(x_pred: Tensor, x_true: Tensor) -> Tensor:
    """Mean squared pixel distance ``(B, n, 2), (B, n, 2) -> ()``: the same penalty as
    :class:`BPnPReprojectionLoss` put on the coordinates directly (no PnP)."""
    return (x_pred - x_true).pow(2).sum(-1).mean()


class _LossThroughPnP(nn.Module):
    """What every loss through the layer shares: the weight, the warm-up, the PnP weights, and
    leaving out the items whose PnP did not converge (arguments: :class:`BPnPReprojectionLoss`)."""

    def __init__(
        self,
        weight: float = 1.0,
        warmup_steps: int = 0,
        confidence_weighted: bool = False,
        options: SolverOptions | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.weight = float(weight)
        self.warmup_steps = int(warmup_steps)
        self.confidence_weighted = bool(confidence_weighted)
        self.options = options
        self.backend = backend
        self.last_failures = 0  # items of the last batch whose PnP did not converge

    def _warming_up(self, step: int | None) -> bool:
        return step is not None and step < self.warmup_steps

    def _solve(self, x_pred: Tensor, x3d: Tensor, K: Tensor, weights: Tensor | None) -> PnPResult:
        w = weights if self.confidence_weighted else None
        res = solve_pnp(x_pred, x3d, K, w, backend=self.backend, options=self.options, warn=False)
        self.last_failures = int((~res.converged).sum())
        return res

    def _weighted_mean(self, per_item: Tensor, converged: Tensor) -> Tensor:
        # Items without a converged pose still have finite gradients (the layer guarantees it), but
        # their loss says nothing about the keypoints: they do not count.
        keep = converged.to(per_item.dtype)
        return self.weight * (per_item * keep).sum() / keep.sum().clamp_min(1.0)


class BPnPReprojectionLoss(_LossThroughPnP):
    """``weight * mean_i || pi(x3d_i | BPnP(x_pred, x3d, K, w)) - x_true_i ||^2`` (pixels^2).

    Args:
        weight: the loss weight (the paper's beta); 0 before ``warmup_steps``.
        warmup_steps: steps (the ``step`` argument of ``forward``) during which the loss is 0 and
            no PnP is solved.
        confidence_weighted: use the ``weights`` passed to ``forward`` as PnP weights (e.g.
            heatmap confidences); otherwise all points weigh the same.
        options, backend: passed to :func:`bpnp.solve_pnp`.
    """

    def forward(
        self,
        x_pred: Tensor,
        x3d: Tensor,
        K: Tensor,
        x_true: Tensor,
        weights: Tensor | None = None,
        step: int | None = None,
    ) -> Tensor:
        """Args:
            x_pred: ``(B, n, 2)`` predicted keypoints (pixels); x3d: ``(n, 3)`` or ``(B, n, 3)``
                model keypoints; K: ``(3, 3)`` or ``(B, 3, 3)``; x_true: ``(B, n, 2)``.
            weights: ``(B, n)`` per-keypoint confidences (used when ``confidence_weighted``).
            step: the training step, for the warm-up (None: no warm-up).
        Returns:
            the scalar loss (0, with no PnP solved, during the warm-up).
        """
        if self._warming_up(step):
            return x_pred.sum() * 0.0
        res = self._solve(x_pred, x3d, K, weights)
        reproj = project(x3d, res.pose, K)  # Bxnx2
        return self._weighted_mean((reproj - x_true).pow(2).sum(-1).mean(-1), res.converged)


class BPnPADDLoss(_LossThroughPnP):
    """``weight * mean_b ADD(BPnP(x_pred, x3d, K, w)_b, pose_true_b; points) / scale``.

    The pose error measured on the object: the mean distance between the model ``points`` under
    the BPnP pose and under the true pose, divided by ``scale`` (the object's diameter, say, so
    that the loss is a fraction of it, like ADD-0.1d's threshold). Its gradient per item is at
    most ``1 / scale`` per unit of point displacement, so a gross failure cannot dominate a batch.

    Args:
        scale: the length the ADD is divided by, in the units of ``x3d`` (> 0).
        weight, warmup_steps, confidence_weighted, options, backend: as for
            :class:`BPnPReprojectionLoss`.
    """

    def __init__(self, scale: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not scale > 0:
            raise ValueError(f"scale: expected a length > 0, got {scale!r}")
        self.scale = float(scale)

    def forward(
        self,
        x_pred: Tensor,
        x3d: Tensor,
        K: Tensor,
        pose_true: Tensor,
        weights: Tensor | None = None,
        step: int | None = None,
        points: Tensor | None = None,
    ) -> Tensor:
        """Args:
            x_pred: ``(B, n, 2)`` predicted keypoints (pixels); x3d: ``(n, 3)`` model keypoints;
                K: ``(3, 3)`` or ``(B, 3, 3)``; pose_true: ``(B, 6)`` ``[rvec, t]``.
            weights: ``(B, n)`` per-keypoint confidences (used when ``confidence_weighted``).
            step: the training step, for the warm-up (None: no warm-up).
            points: ``(m, 3)`` the points the ADD is taken over (default: ``x3d``).
        Returns:
            the scalar loss (0, with no PnP solved, during the warm-up).
        """
        if self._warming_up(step):
            return x_pred.sum() * 0.0
        if x3d.dim() != 2 or (points is not None and points.dim() != 2):
            raise ValueError("x3d and points: expected one (n, 3) model shared by the batch")
        if pose_true.shape != (x_pred.shape[0], 6):
            raise ValueError(f"pose_true: expected ({x_pred.shape[0]}, 6) [rvec, t], got {tuple(pose_true.shape)}")
        res = self._solve(x_pred, x3d, K, weights)
        pts = x3d if points is None else points
        per_item = add(res.pose, pose_true.to(res.pose.dtype), pts.to(res.pose.dtype)) / self.scale
        return self._weighted_mean(per_item, res.converged)
