"""The settings of the object-pose tool: how a data set is rendered (:class:`RenderSettings`) and
what a training run depends on (:class:`TrainConfig`, saved as ``config.json`` beside the run).

Each field carries its one-line help in its metadata (``help``): ``bpnp render`` and ``bpnp train``
build their options from these fields (``--batch-size`` for ``batch_size``; names, defaults and
help have this one source, :mod:`bpnp.cli_config`), and a ``--config`` JSON file uses the same names.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .objectives import OBJECTIVES

__all__ = ["RenderSettings", "TrainConfig", "option", "check_positive_ints"]


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its command-line help (``default_factory`` for a list default)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    """ValueError naming the first of ``names`` whose value in ``config`` is not an int >= 1."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")


@dataclass(frozen=True)
class RenderSettings:
    """How :func:`~bpnp.pose.synthesis.render_dataset` draws its images.

    - ``focal``: the focal length in units of ``size``; ``fill``: the range of the object's
      bounding-box side over the image side.
    - ``view_cone``: None: every viewpoint (rotations uniform on SO(3)); an angle in degrees: the
      camera sees the object's ``-z`` side from within this angle of its ``z`` axis (uniform over
      that cap, any in-plane angle): a planar target (a board, a marker) seen from the front and
      never edge-on.
    - ``photo``: look like photographs (:mod:`bpnp.pose.photo`): photo-like backgrounds for half
      the images, a hand over the object's edge instead of polygons for half the occluded ones,
      and a camera's exposure, gamma, vignetting, blur, noise, grayscale and JPEG.
    - ``lens``: each image is a window of a camera with this lens (OpenCV's distortion), centred
      at a random point up to ``lens_field`` off its axis: what a crop around an object in a
      wide-angle photograph sees. The window's ``K`` (its principal point then lies off the
      image) and the lens are recorded in ``scene_camera.json`` (``cam_K``, ``dist``).
    """

    size: int = option(128, "image side in pixels")
    focal: float = option(2.0, "focal length in units of the image side")
    fill: tuple[float, float] = (0.4, 0.8)
    occluder_prob: float = option(0.3, "share of images with occluders", flag="--occluders")
    background: str = option("procedural", "image backgrounds", choices=("procedural", "black"))
    view_cone: float | None = option(
        None,
        "views within DEG of the object's z axis (a planar target from the front); default: every view",
        metavar="DEG",
    )
    photo: bool = option(False, "look like photographs: camera effects, photo-like backgrounds, hands")
    lens: tuple[float, float, float, float, float] | None = option(
        None, "render through this lens: OpenCV's k1 k2 p1 p2 k3 (e.g. a wide-angle camera's)", nargs=5, metavar="K"
    )
    lens_field: float = option(
        0.6, "with --lens: the object appears up to this far off the lens axis (normalised image coordinates)"
    )

    def __post_init__(self) -> None:
        if self.lens is not None:
            lens = tuple(float(v) for v in self.lens)
            if len(lens) != 5 or not all(math.isfinite(v) for v in lens):
                raise ValueError(f"lens: expected 5 finite coefficients k1 k2 p1 p2 k3, got {self.lens!r}")
            object.__setattr__(self, "lens", lens)
        if not (math.isfinite(self.lens_field) and 0 <= self.lens_field <= 2):
            raise ValueError(f"lens_field: expected a number in [0, 2], got {self.lens_field!r}")
        check_positive_ints(self, ("size",))
        if not (math.isfinite(self.focal) and self.focal > 0):
            raise ValueError(f"focal: expected a finite positive number, got {self.focal!r}")
        if not 0 <= self.occluder_prob <= 1:
            raise ValueError(f"occluder_prob: expected a number in [0, 1], got {self.occluder_prob!r}")
        if self.view_cone is not None and not 0 < self.view_cone <= 180:
            raise ValueError(f"view_cone: expected an angle in (0, 180] degrees, got {self.view_cone}")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` beside each run.

    Every field's help is its metadata (``bpnp train --help`` prints it); longer notes:

    - ``variant``: a registered :mod:`~bpnp.pose.objectives` name (``heatmap``, ``bpnp``,
      ``bpnp-add``, ``coord``); ``bpnp-add`` helps most (docs/results.md).
    - ``beta``: weight of the pose loss; None: set once, at the first step after the warm-up, so
      that the two losses' gradient norms over the network's parameters stand in the ratio
      ``balance``. balance 0.3 with confidence weights is the best of a sweep on spot with
      ``bpnp``; with ``bpnp-add`` it gave betas of 0.44-2.03.
    - ``learn_weights``: the pose loss's gradient reaches the PnP weights (the heatmaps'
      confidences) through the layer's exact derivative with respect to ``w``, as EPro-PnP learns
      its weights. ``weight_head``: the confidences times a factor in (0, 2) that a 1x1 convolution
      predicts at each keypoint (:func:`~bpnp.pose.model.learned_weight_factor`), trained by the
      pose loss alone, so that the heatmaps keep their shape (EPro-PnP's design). Either needs
      ``confidence_weights`` and a variant through PnP; not both.
    - ``window``: :func:`~bpnp.pose.model.soft_argmax` over this many cells around each heatmap's
      peak (None: the whole map), in training and evaluation alike.
    - ``warm_start``: a checkpoint (e.g. a ``snapshot_steps`` one) of a run with the same data,
      seed and schedule, taken in this run's heatmap-only phase; training starts at its step.
    - Under torchrun ``batch_size`` is the global batch; each rank takes its share.
    """

    data: str = option("", "BOP split folder to train on")
    test_data: str | None = option(None, "BOP split folder to evaluate on afterwards")
    obj_id: int = option(1, "BOP object id to train on")
    out: str = option("runs/train", "run folder (checkpoints, log, plots, config)")
    variant: str = option(
        "bpnp-add",
        "training objective: " + ", ".join(f"{name} ({cls.label})" for name, cls in OBJECTIVES.items()),
        choices=tuple(OBJECTIVES),
    )
    steps: int = option(1000, "training steps")
    batch_size: int = option(32, "images per step")
    lr: float = option(3e-3, "Adam's initial learning rate")
    lr_final: float = option(0.01, "the cosine schedule's last learning rate, a fraction of --lr")
    clip_grad: float = option(10.0, "gradient-norm clip")
    warmup_frac: float = option(0.3, "share of the steps with the heatmap loss alone before the pose loss starts")
    beta: float | None = option(None, "weight of the pose loss, fixed instead of set by --balance")
    balance: float = option(
        0.3, "the pose loss's gradient norm over the heatmap loss's at the end of the warm-up, which sets beta"
    )
    confidence_weights: bool = option(True, "PnP weights from the heatmaps' confidences (bpnp, bpnp-add)")
    learn_weights: bool = option(False, "the pose loss trains the PnP weights (the confidences) too")
    weight_head: bool = option(
        False, "PnP weights: the confidences times factors from a head of their own that only the pose loss trains"
    )
    size: int = option(128, "input image side, a multiple of 16")
    width: int = option(32, "network width (channels of the first stage)")
    sigma: float = option(1.0, "heatmap target width (cells)")
    window: int | None = option(3, "soft-argmax window around each heatmap's peak (cells)")
    augment: bool = option(True, "photometric augmentation")
    workers: int = option(1, "data-loading worker processes")
    seed: int = option(0, "weights, batch order, augmentation")
    device: str = option("cpu", "cpu, cuda, cuda:1, ...")
    threads: int | None = option(None, "torch threads (default: torch's)")
    log_every: int = option(10, "steps between rows of log.csv")
    checkpoint_every: int = option(
        100, "steps between checkpoints, a multiple of --log-every: a kill loses at most this many"
    )
    progress: bool = option(True, "show a progress bar")
    snapshot_steps: list[int] = option([], "steps whose checkpoints are also kept, as checkpoint_step{N:06d}.pt")
    warm_start: str | None = option(
        None, "start from this checkpoint of a run with the same data, seed and schedule (its heatmap-only phase)"
    )

    def __post_init__(self) -> None:
        if self.variant not in OBJECTIVES:
            raise ValueError(f"variant: expected one of {tuple(OBJECTIVES)}, got {self.variant!r}")
        check_positive_ints(self, ("steps", "batch_size", "size", "width", "log_every", "checkpoint_every", "obj_id"))
        if self.size % 16:
            raise ValueError(f"size: expected a multiple of 16 (the network's stride), got {self.size}")
        if self.checkpoint_every % self.log_every:
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every ({self.log_every})"
            )
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac: expected in [0, 1), got {self.warmup_frac}")
        for name in ("lr", "sigma", "balance", "clip_grad"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta: expected a finite number >= 0 or None, got {self.beta!r}")
        self._check_weight_options()
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window: expected a positive integer or None, got {self.window!r}")
        if self.workers < 0:
            raise ValueError(f"workers: expected >= 0, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected a positive integer or None, got {self.threads}")
        self.snapshot_steps = [int(k) for k in self.snapshot_steps]
        if any(not 0 < k <= self.steps for k in self.snapshot_steps):
            raise ValueError(f"snapshot_steps: expected steps in [1, {self.steps}], got {self.snapshot_steps}")

    def _check_weight_options(self) -> None:
        through_pnp = [name for name, cls in OBJECTIVES.items() if cls.through_pnp]
        for name in ("learn_weights", "weight_head"):
            if getattr(self, name) and not (self.confidence_weights and self.variant in through_pnp):
                raise ValueError(
                    f"{name}: needs confidence_weights and a variant through PnP {tuple(through_pnp)}, "
                    f"got variant {self.variant!r}, confidence_weights {self.confidence_weights}"
                )
        if self.weight_head and self.learn_weights:
            raise ValueError("weight_head and learn_weights: choose one way to learn the PnP weights")

    @property
    def warmup_steps(self) -> int:
        """The steps of the heatmap-only phase (all of them for a variant without a pose loss)."""
        return int(round(self.warmup_frac * self.steps)) if OBJECTIVES[self.variant].pose_loss else self.steps

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a config file (JSON); ``overrides`` replace its entries. Unknown keys are an error."""
        data = json.loads(Path(path).read_text())
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown} (known: {sorted(known)})")
        return cls(**data)
