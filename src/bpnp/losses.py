"""Losses through the PnP layer.

:class:`BPnPReprojectionLoss` is the paper's pose loss ``|| pi(z | BPnP(x_hat, z, K)) - x_gt ||^2``:
the keypoints a network predicts are turned into a pose by the layer, the model keypoints are
projected with that pose and compared with the true keypoints. Its gradient reaches ``x_hat``
exactly through the implicit function theorem.
"""

from __future__ import annotations

from torch import Tensor, nn

from .geometry import project
from .layer import solve_pnp
from .options import SolverOptions

__all__ = ["BPnPReprojectionLoss", "keypoint_loss"]


def keypoint_loss(x_pred: Tensor, x_true: Tensor) -> Tensor:
    """Mean squared pixel distance ``(B, n, 2), (B, n, 2) -> ()``: the same penalty as
    :class:`BPnPReprojectionLoss` put on the coordinates directly (no PnP)."""
    return (x_pred - x_true).pow(2).sum(-1).mean()


class BPnPReprojectionLoss(nn.Module):
    """``weight * mean_i || pi(x3d_i | BPnP(x_pred, x3d, K, w)) - x_true_i ||^2`` (pixels^2).

    Args:
        weight: the loss weight (the paper's beta); 0 before ``warmup_steps``.
        warmup_steps: steps (the ``step`` argument of ``forward``) during which the loss is 0 and
            no PnP is solved.
        confidence_weighted: use the ``weights`` passed to ``forward`` as PnP weights (e.g.
            heatmap confidences); otherwise all points weigh the same.
        options, backend: passed to :func:`bpnp.solve_pnp`.
    """

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
        if step is not None and step < self.warmup_steps:
            return x_pred.sum() * 0.0
        w = weights if self.confidence_weighted else None
        res = solve_pnp(x_pred, x3d, K, w, backend=self.backend, options=self.options, warn=False)
        self.last_failures = int((~res.converged).sum())
        reproj = project(x3d, res.pose, K)  # Bxnx2
        per_item = (reproj - x_true).pow(2).sum(-1).mean(-1)
        # Items without a converged pose still have finite gradients (the layer guarantees it), but
        # their loss says nothing about the keypoints: they do not count.
        keep = res.converged.to(per_item.dtype)
        return self.weight * (per_item * keep).sum() / keep.sum().clamp_min(1.0)
