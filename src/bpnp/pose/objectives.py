"""The training objectives of the keypoint network, one registered object per variant.

Every variant trains the heatmap loss (KL to Gaussian targets,
:func:`~bpnp.pose.model.heatmap_loss`); all but ``"heatmap"`` add ``beta`` x a pose loss after
the warm-up (``TrainConfig.warmup_frac`` of the steps). A variant is an :class:`Objective`
subclass decorated with :func:`register`: its name is what ``TrainConfig.variant``, ``bpnp train
--variant`` and ``bpnp experiment --variants`` accept, its label what reports print. A new variant
is a class here and its test; nothing else changes.

- ``"heatmap"``: the heatmap loss alone (the baseline);
- ``"bpnp"``: :class:`~bpnp.losses.BPnPReprojectionLoss` on the soft-argmax keypoints (pixels);
- ``"bpnp-add"``: :class:`~bpnp.losses.BPnPADDLoss`, the keypoints' ADD under the BPnP pose
  against the true pose over the object's diameter: the pose error measured on the object (mm),
  where ``"bpnp"`` measures it in the image, which hardly sees depth;
- ``"coord"``: the control, the same squared pixel error put on the soft-argmax coordinates
  directly (no PnP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import Tensor

    from .config import TrainConfig

__all__ = ["Objective", "StepOutputs", "register", "objective", "OBJECTIVES"]

#: Every registered objective by name, in the order of registration.
OBJECTIVES: dict[str, type[Objective]] = {}


@dataclass
class StepOutputs:
    """What one training step knows when the pose loss is computed.

    Attributes:
        coords: ``(B, k, 2)`` soft-argmax keypoints (pixels of the crop); probs: ``(B, k, h, w)``
            their heatmap distributions; weight_logits: the weight head's ``(B, 1, h, w)`` map or
            None; stride: pixels per heatmap cell.
        keypoints3d: ``(k, 3)`` object keypoints (mm); K: ``(B, 3, 3)``; keypoints2d: ``(B, k, 2)``
            true keypoints; pose: ``(B, 6)`` true poses ``[rvec, t]`` (mm).
    """

    coords: Tensor
    probs: Tensor
    weight_logits: Tensor | None
    stride: int
    keypoints3d: Tensor
    K: Tensor
    keypoints2d: Tensor
    pose: Tensor


class Objective:
    """A training variant: its name, report label and pose loss.

    Class attributes: ``name`` (the variant's name), ``label`` (how a report names it),
    ``through_pnp`` (its loss goes through the PnP layer: the PnP-weight options apply),
    ``pose_loss`` (False: the heatmap loss alone, no warm-up phase).
    """

    name: ClassVar[str]
    label: ClassVar[str]
    through_pnp: ClassVar[bool] = False
    pose_loss: ClassVar[bool] = True

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def __call__(self, out: StepOutputs) -> tuple[Tensor, int]:
        """The pose loss of a step (a scalar) and the number of its PnP problems that failed."""
        raise NotImplementedError(f"{type(self).__name__} has no pose loss")


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` a variant under ``cls.name`` (a second one of that name is an error)."""
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective {cls.name!r} is registered already ({OBJECTIVES[cls.name].__name__})")
    OBJECTIVES[cls.name] = cls
    return cls


def objective(cfg: TrainConfig) -> Objective:
    """The objective of ``cfg.variant``, built for the run."""
    return OBJECTIVES[cfg.variant](cfg)


@register
class HeatmapOnly(Objective):
    name, label, pose_loss = "heatmap", "heatmap-only", False


class _ThroughPnP(Objective):
    """A pose loss through the PnP layer, its weights from the heatmaps' confidences (optionally
    learnt, or times a weight head's factors)."""

    through_pnp = True

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.loss = self._loss()

    def _loss(self) -> Any:
        raise NotImplementedError

    def _target(self, out: StepOutputs) -> Tensor:
        raise NotImplementedError

    def __call__(self, out: StepOutputs) -> tuple[Tensor, int]:
        loss = self.loss(out.coords.double(), out.keypoints3d, out.K, self._target(out), weights=self._weights(out))
        return loss.float(), self.loss.last_failures

    def _weights(self, out: StepOutputs) -> Tensor | None:
        from .model import heatmap_confidence, learned_weight_factor

        if not self.cfg.confidence_weights:
            return None
        w = heatmap_confidence(out.probs, out.coords, out.stride).double()
        w = w if self.cfg.learn_weights else w.detach()
        if out.weight_logits is not None:
            w = w * learned_weight_factor(out.weight_logits, out.probs).double()
        return w


@register
class Reprojection(_ThroughPnP):
    name, label = "bpnp", "+ BPnP reprojection loss"

    def _loss(self) -> Any:
        from ..losses import BPnPReprojectionLoss

        return BPnPReprojectionLoss(confidence_weighted=self.cfg.confidence_weights)

    def _target(self, out: StepOutputs) -> Tensor:
        return out.keypoints2d.double()


@register
class ADD(_ThroughPnP):
    name, label = "bpnp-add", "+ BPnP ADD loss"

    def _loss(self) -> Any:
        from ..losses import BPnPADDLoss
        from . import bop

        models = bop.read_models_info(bop.find_models_dir(self.cfg.data))
        diameter = float(models[self.cfg.obj_id]["diameter"])
        return BPnPADDLoss(scale=diameter, confidence_weighted=self.cfg.confidence_weights)

    def _target(self, out: StepOutputs) -> Tensor:
        return out.pose.to(out.K.device)


@register
class CoordinateControl(Objective):
    name, label = "coord", "coordinate control"

    def __call__(self, out: StepOutputs) -> tuple[Tensor, int]:
        from ..losses import keypoint_loss

        return keypoint_loss(out.coords, out.keypoints2d), 0
