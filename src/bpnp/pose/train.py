"""Training a keypoint heatmap network, optionally end to end through the PnP layer.

Variants (``TrainConfig.variant``):

- ``"heatmap"``: the heatmap loss alone (KL to Gaussian targets, :func:`~bpnp.pose.model.heatmap_loss`);
- ``"bpnp"``: heatmap loss + ``beta`` x :class:`~bpnp.losses.BPnPReprojectionLoss` on the
  soft-argmax keypoints, after ``warmup_frac`` of the steps with the heatmap loss alone;
- ``"bpnp-add"``: heatmap loss + ``beta`` x :class:`~bpnp.losses.BPnPADDLoss`, the keypoints'
  ADD under the BPnP pose against the true pose, divided by the object's diameter: the pose error
  measured on the object (mm), where ``"bpnp"`` measures it in the image (px), which hardly sees
  depth;
- ``"coord"``: the control, heatmap loss + ``beta`` x the same squared pixel error put on the
  soft-argmax coordinates directly (no PnP).

``beta=None`` sets beta once, at the first step after the warm-up, so that the two losses'
gradient norms (over the network's parameters) stand in the ratio ``balance`` (default 0.3).

Every batch is a pure function of ``(seed, step)`` (which images, which augmentation), and
checkpoints hold the model, the optimiser and beta: ``resume`` after a ``kill -9`` continues to
the same weights as an uninterrupted run. Under ``torchrun`` (several processes) each rank takes
its share of every global batch and DistributedDataParallel averages the gradients.

The warm-up of a pose variant is step for step the heatmap-only run with the same seed and
schedule, so it need not be trained twice: a heatmap run with ``snapshot_steps=[k]`` keeps its
checkpoint of step ``k``, and a run with ``warm_start=<that file>`` starts there (to the same
weights as training from scratch; tested). ``bpnp experiment`` does this for every seed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..losses import BPnPADDLoss, BPnPReprojectionLoss, keypoint_loss
from ..progress import progress as progress_bar
from . import bop
from .data import PoseData, augment_image, load_split
from .model import (
    KeypointHeatmapNet,
    heatmap_confidence,
    heatmap_loss,
    learned_weight_factor,
    soft_argmax,
    split_outputs,
)

__all__ = ["TrainConfig", "train", "load_checkpoint", "normalise_images", "VARIANTS"]

VARIANTS = ("heatmap", "bpnp", "bpnp-add", "coord")
# The variants whose extra loss goes through the PnP layer.
THROUGH_PNP = ("bpnp", "bpnp-add")
MEAN, STD = 0.5, 0.25  # input normalisation of the network


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` beside each run.

    Attributes:
        data: BOP split folder of the training images; test_data: split to evaluate on at the end
            (optional); obj_id: the object.
        out: the run folder (checkpoints, log, plots, config).
        variant: ``"heatmap"``, ``"bpnp"``, ``"bpnp-add"`` or ``"coord"`` (see the module).
        steps, batch_size, lr: Adam on ``batch_size`` images per step (the global batch under
            torchrun), cosine decay to ``lr * lr_final``; clip_grad: gradient-norm clip.
        warmup_frac: share of the steps before the pose/coordinate loss starts.
        beta: weight of that loss; None: balanced by gradient norms (``balance``) at the end of
            the warm-up. balance 0.3 and confidence weights are the best of a sweep on spot
            with ``"bpnp"``; with ``"bpnp-add"`` the balance gave betas of 0.44-2.03, and those
            above 1 cost keypoint accuracy (docs/objpose.md, "The loss weight, measured").
        confidence_weights: BPnP weights from the heatmaps' confidences (``bpnp``, ``bpnp-add``).
        learn_weights: let the pose loss's gradient reach those weights too (through the layer's
            exact derivative with respect to ``w``), so that training can lower the weight of the
            keypoints PnP should trust less, as EPro-PnP learns its weights; False: the weights
            are constants of each step. Needs ``confidence_weights`` and a PnP variant.
        weight_head: PnP weights from a head of their own instead: the confidences times a factor
            in (0, 2) that a 1x1 convolution predicts at each keypoint
            (:func:`~bpnp.pose.model.learned_weight_factor`), trained by the pose loss alone, so
            that the heatmaps keep the shape the heatmap loss gives them (EPro-PnP's design).
            Needs ``confidence_weights`` and a PnP variant; not with ``learn_weights``.
        size: input image side; width: network width; sigma: heatmap target width (cells).
        window: keypoint readout, :func:`~bpnp.pose.model.soft_argmax` over this many cells
            around each heatmap's peak (None: the whole map), in training and evaluation alike.
        augment: photometric augmentation; workers: data-loading worker processes.
        seed: weights, batch order and augmentation; device: torch device; threads: torch
            threads (None: torch's default).
        log_every, checkpoint_every: steps between CSV rows / checkpoints (a multiple of log_every).
        progress: show a progress bar.
        snapshot_steps: steps whose checkpoints are also kept, as ``checkpoint_step{N:06d}.pt``.
        warm_start: a checkpoint (e.g. such a snapshot) of a run with the same data, seed and
            schedule, taken in this run's heatmap-only phase; training starts at its step.
    """

    data: str = ""
    test_data: str | None = None
    obj_id: int = 1
    out: str = "runs/train"
    variant: str = "bpnp-add"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    lr_final: float = 0.01
    clip_grad: float = 10.0
    warmup_frac: float = 0.3
    beta: float | None = None
    balance: float = 0.3
    confidence_weights: bool = True
    learn_weights: bool = False
    weight_head: bool = False
    size: int = 128
    width: int = 32
    sigma: float = 1.0
    window: int | None = 3
    augment: bool = True
    workers: int = 1
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    log_every: int = 10
    checkpoint_every: int = 100
    progress: bool = True
    snapshot_steps: list[int] = field(default_factory=list)
    warm_start: str | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        for name in ("steps", "batch_size", "size", "width", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
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
        if self.learn_weights and not (self.confidence_weights and self.variant in THROUGH_PNP):
            raise ValueError(
                f"learn_weights: needs confidence_weights and a variant through PnP {THROUGH_PNP}, "
                f"got variant {self.variant!r}, confidence_weights {self.confidence_weights}"
            )
        if self.weight_head and not (self.confidence_weights and self.variant in THROUGH_PNP):
            raise ValueError(
                f"weight_head: needs confidence_weights and a variant through PnP {THROUGH_PNP}, "
                f"got variant {self.variant!r}, confidence_weights {self.confidence_weights}"
            )
        if self.weight_head and self.learn_weights:
            raise ValueError("weight_head and learn_weights: choose one way to learn the PnP weights")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window: expected a positive integer or None, got {self.window!r}")
        if self.workers < 0:
            raise ValueError(f"workers: expected >= 0, got {self.workers}")
        self.snapshot_steps = [int(k) for k in self.snapshot_steps]
        if any(not 0 < k <= self.steps for k in self.snapshot_steps):
            raise ValueError(f"snapshot_steps: expected steps in [1, {self.steps}], got {self.snapshot_steps}")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_frac * self.steps)) if self.variant != "heatmap" else self.steps

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


def normalise_images(images: Tensor) -> Tensor:
    """``(B, S, S, 3)`` uint8 or float in [0, 1] -> ``(B, 3, S, S)`` float32 network input."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return ((x - MEAN) / STD).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _batch_indices(seed: int, step: int, n: int, batch: int) -> np.ndarray:
    per_epoch = max(1, n // batch)
    epoch, j = divmod(step, per_epoch)
    if n < batch:
        return np.random.default_rng([seed, 7, step]).integers(0, n, batch)
    perm = np.random.default_rng([seed, 11, epoch]).permutation(n)
    return perm[j * batch : (j + 1) * batch]


class _StepBatches(torch.utils.data.Dataset):
    """Item ``i`` is this rank's share of the global batch of step ``start + i``."""

    def __init__(self, data: PoseData, cfg: TrainConfig, start: int, rank: int, world: int) -> None:
        self.data, self.cfg, self.start, self.rank, self.world = data, cfg, start, rank, world

    def __len__(self) -> int:
        return self.cfg.steps - self.start

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        step = self.start + i
        idx = _batch_indices(self.cfg.seed, step, len(self.data), self.cfg.batch_size)
        positions = np.arange(len(idx))[self.rank :: self.world]
        idx = idx[positions]
        imgs = self.data.images[idx]
        if self.cfg.augment:
            imgs = np.stack(
                [
                    augment_image(im, np.random.default_rng([self.cfg.seed, 13, step, int(p)]))
                    for im, p in zip(imgs, positions)
                ]
            )
        return {
            "image": torch.from_numpy(np.ascontiguousarray(imgs)),
            "kp2d": torch.from_numpy(self.data.keypoints2d[idx]),
            "K": torch.from_numpy(self.data.K[idx]),
            "pose": torch.from_numpy(self.data.pose[idx]),
        }


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("BPNP_DDP_BACKEND") != "gloo" else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _lr(cfg: TrainConfig, step: int) -> float:
    progress = step / max(1, cfg.steps - 1)
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill -9 leaves the old checkpoint or the new one, never half of one


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[KeypointHeatmapNet, dict]:
    """A trained network (eval mode) and its checkpoint dict (``config``, ``keypoints3d``, ...):
    ``model.pt`` of a run, or one of its checkpoints (``checkpoint.pt``, snapshots)."""
    try:
        ckpt = torch.load(Path(path), map_location=device, weights_only=False)
    except Exception as exc:  # pickle, zip or torch errors: the file is not a checkpoint
        raise ValueError(f"{path}: not a bpnp checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or not {"config", "keypoints3d", "model"} <= set(ckpt):
        raise ValueError(f"{path}: not a bpnp checkpoint (no config, keypoints3d and model in it)")
    cfg = ckpt["config"]
    net = KeypointHeatmapNet(len(ckpt["keypoints3d"]), cfg["width"], cfg.get("weight_head", False)).to(device)
    net.load_state_dict(ckpt["model"])
    net.eval()
    return net, ckpt


# The settings that decide the weights of the heatmap-only steps: a warm start must agree on them.
_SHARED_BY_WARMUP = (
    "data", "obj_id", "steps", "batch_size", "lr", "lr_final", "clip_grad",
    "size", "width", "sigma", "window", "augment", "seed", "device",
)  # fmt: skip


def _warm_start_state(cfg: TrainConfig, device: torch.device) -> dict:
    """The checkpoint ``cfg.warm_start``, checked to be a state this run would have reached itself."""
    path = Path(cfg.warm_start)
    if not path.is_file():
        raise FileNotFoundError(f"warm_start: {path}: no such checkpoint")
    state = torch.load(path, map_location=device, weights_only=False)
    source = state.get("config")
    if source is None:
        raise ValueError(f"warm_start: {path} records no config (written by an older version?)")
    differ = [k for k in _SHARED_BY_WARMUP if source.get(k) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"warm_start: {path} was trained with other {', '.join(differ)}")
    source_warmup = TrainConfig(**{**source, "snapshot_steps": [], "warm_start": None}).warmup_steps
    if state["step"] > min(cfg.warmup_steps, source_warmup):
        raise ValueError(
            f"warm_start: {path} is of step {state['step']}, past the heatmap-only phase "
            f"(this run's warm-up ends at step {cfg.warmup_steps})"
        )
    return state


def _grad_norm(loss: Tensor, params: list[Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def _network(cfg: TrainConfig, keypoints: int, device) -> tuple[KeypointHeatmapNet, torch.optim.Optimizer, list]:
    """The network (seeded), its optimizer and the weight head's parameters (an empty list without one)."""
    torch.manual_seed(cfg.seed)
    net = KeypointHeatmapNet(keypoints, cfg.width, cfg.weight_head)
    net = net.to(device).to(memory_format=torch.channels_last)
    head = list(net.weight_head.parameters()) if net.weight_head is not None else []
    # The weight head in a group of its own, after the rest: a heatmap-only snapshot's optimizer
    # state (which has no such head) then loads into the first group as it is.
    opt = torch.optim.Adam([p for n, p in net.named_parameters() if not n.startswith("weight_head.")], lr=cfg.lr)
    return net, opt, head


def _balance(cfg: TrainConfig, l_h: Tensor, l_p: Tensor, params: list, world: int) -> float:
    """beta = balance x |grad heatmap loss| / |grad pose loss| at the first pose step (averaged over ranks)."""
    ratio = _grad_norm(l_h, params) / max(_grad_norm(l_p, params), 1e-30)
    beta_t = torch.tensor(cfg.balance * ratio, dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(beta_t)
        beta_t /= world
    return float(beta_t)


def _log(path: Path, columns: list[str], row: dict, bar) -> None:
    _append_log(path, columns, row)
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{row['loss']:.3f}", kp=f"{row['kp_error_px']:.2f}px")


def _save_final(out: Path, net: KeypointHeatmapNet, cfg: TrainConfig, keypoints3d, summary: dict) -> None:
    """``model.pt``, ``train_summary.json`` and ``loss.png`` of a finished run."""
    final = {"model": net.state_dict(), "config": asdict(cfg), "keypoints3d": keypoints3d, "summary": summary}
    _save_atomic(final, out / "model.pt")
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_log(out / "log.csv", out / "loss.png")


def _restore(
    cfg: TrainConfig, net: KeypointHeatmapNet, opt: torch.optim.Optimizer, head: list, checkpoint: Path | None, device
) -> tuple[int, float | None, float, dict | None]:
    """Load the run's own checkpoint (``checkpoint``, resuming) or a warm start into ``net`` and
    ``opt``; returns ``(start step, beta, seconds before, the warm-start state or None)``."""
    start, beta, seconds_before = 0, cfg.beta, 0.0
    warm = None
    if checkpoint is not None and checkpoint.is_file():
        ckpt = torch.load(checkpoint, map_location=device, weights_only=False)
    elif cfg.warm_start:
        ckpt = warm = _warm_start_state(cfg, device)
    else:
        ckpt = None
    if head and warm is None:
        opt.add_param_group({"params": head})
    if ckpt is not None:
        missing, unexpected = net.load_state_dict(ckpt["model"], strict=warm is None or not head)
        if unexpected or any(not k.startswith("weight_head.") for k in missing):
            raise ValueError(f"{cfg.warm_start}: not this network's weights ({missing + unexpected})")
        opt.load_state_dict(ckpt["optimizer"])
        if head and warm is not None:
            opt.add_param_group({"params": head})
        start, seconds_before = ckpt["step"], ckpt.get("seconds", 0.0)
        # A warm-up snapshot was taken before any beta was set: this run's own (fixed or None) holds.
        beta = cfg.beta if warm is not None else ckpt["beta"]
    return start, beta, seconds_before, warm


def _pnp_loss(cfg: TrainConfig):
    """The loss through the PnP layer of a pose variant."""
    if cfg.variant == "bpnp-add":
        diameter = float(bop.read_models_info(bop.find_models_dir(cfg.data))[cfg.obj_id]["diameter"])
        return BPnPADDLoss(scale=diameter, confidence_weighted=cfg.confidence_weights)
    return BPnPReprojectionLoss(confidence_weighted=cfg.confidence_weights)


def _batch_bar(data, cfg: TrainConfig, start: int, rank: int, world: int):
    """The step batches from ``start`` on, through a loader and a progress bar (rank 0)."""
    batches = _StepBatches(data, cfg, start, rank, world)
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        shuffle=False,
        num_workers=cfg.workers,
        prefetch_factor=2 if cfg.workers else None,
    )
    return progress_bar(loader, total=len(batches), desc=f"train {cfg.variant}", disable=not cfg.progress or rank != 0)


def _pose_loss(cfg: TrainConfig, pnp_loss, stride: int, coords, probs, weight_logits, kp3d, K, kp_true, batch):
    """The pose phase's extra loss and the number of PnP failures in it: through the layer
    (weighted by the heatmaps' confidences, times a weight head's factors), or the coord control."""
    if cfg.variant not in THROUGH_PNP:
        return keypoint_loss(coords, kp_true), 0
    w = None
    if cfg.confidence_weights:
        w = heatmap_confidence(probs, coords, stride).double()
        w = w if cfg.learn_weights else w.detach()
        if weight_logits is not None:
            w = w * learned_weight_factor(weight_logits, probs).double()
    target = batch["pose"].to(K.device) if cfg.variant == "bpnp-add" else kp_true.double()
    loss = pnp_loss(coords.double(), kp3d, K, target, weights=w).float()
    return loss, pnp_loss.last_failures


def _checkpoint_state(net, opt, done: int, beta, seconds: float, cfg: TrainConfig, keypoints3d) -> dict:
    return {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "step": done,
        "beta": beta,
        "seconds": seconds,
        "config": asdict(cfg),
        "keypoints3d": keypoints3d,  # so that `bpnp evaluate` takes a checkpoint too
    }


def _summary(cfg: TrainConfig, start: int, beta, failures: int, nonfinite: int, seconds: float, world: int) -> dict:
    return {
        "steps": cfg.steps,
        "resumed_from": start,
        "warm_start": cfg.warm_start,
        "beta": beta,
        "pnp_failures": failures,
        "nonfinite_steps": nonfinite,
        # A resumed or warm-started run counts the seconds of the steps it took over.
        "seconds": seconds,
        "world_size": world,
        # What the seconds and the bitwise result depend on, for a record read in another sitting.
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # The same torch and threads on another CPU can part from the first steps: the SIMD
        # kernels torch picks (AVX2, AVX512) sum in another order.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) the run of ``cfg``; returns a summary dict.

    Writes into ``cfg.out``: ``config.json``, ``log.csv`` (a row per ``log_every`` steps),
    ``checkpoint.pt`` (every ``checkpoint_every`` steps, atomically), ``model.pt`` (the final
    network), ``loss.png``. Under torchrun only rank 0 writes.
    """
    rank, world = _distributed()
    out = Path(cfg.out)
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_split(cfg.data, obj_id=cfg.obj_id, size=cfg.size)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    net, opt, head = _network(cfg, len(data.keypoints3d), device)
    ckpt_path = out / "checkpoint.pt"
    start, beta, seconds_before, warm = _restore(cfg, net, opt, head, ckpt_path if resume else None, device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_json(out / "config.json")
    # The weight head has no gradient in the heatmap-only steps: DDP must expect unused parameters.
    model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=bool(head)) if world > 1 else net
    params = [p for p in net.parameters() if p.requires_grad]
    kp3d = torch.from_numpy(data.keypoints3d).to(device)
    pnp_loss = _pnp_loss(cfg)
    log_path = out / "log.csv"
    columns = ["step", "lr", "loss", "loss_heatmap", "loss_pose", "kp_error_px", "pnp_failures", "beta", "seconds"]
    if rank == 0:
        source_log = Path(cfg.warm_start).parent / "log.csv" if warm is not None else log_path
        _truncate_log(source_log, columns, start, log_path)
    bar = _batch_bar(data, cfg, start, rank, world)
    window: dict[str, list[float]] = {c: [] for c in ("loss", "loss_heatmap", "loss_pose", "kp_error_px")}
    failures_window = total_failures = nonfinite = 0
    t0 = time.perf_counter()
    net.train()
    step = start
    for step, batch in enumerate(bar, start=start):
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        image = normalise_images(batch["image"].to(device))
        kp_true = batch["kp2d"].to(device).float()
        K = batch["K"].to(device)
        logits, weight_logits = split_outputs(model(image))
        coords, probs = soft_argmax(logits, net.stride, cfg.window)
        l_h = heatmap_loss(logits, kp_true, net.stride, cfg.sigma)
        l_p = torch.zeros((), device=device)
        pose_phase = cfg.variant != "heatmap" and step >= cfg.warmup_steps
        if pose_phase:
            l_p, failed = _pose_loss(cfg, pnp_loss, net.stride, coords, probs, weight_logits, kp3d, K, kp_true, batch)
            failures_window += failed
            total_failures += failed
            if beta is None:
                beta = _balance(cfg, l_h, l_p, params, world)
        loss = l_h + (beta or 0.0) * l_p if pose_phase else l_h
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            nonfinite += 1  # skipped, and counted: the run's summary reports it
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            opt.step()
        kp_err = (coords.detach() - kp_true).norm(dim=-1).mean()
        for key, value in (("loss", loss), ("loss_heatmap", l_h), ("loss_pose", l_p), ("kp_error_px", kp_err)):
            window[key].append(float(value.detach()))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = {k: float(np.mean(v)) for k, v in window.items()}
            row.update(step=done, lr=_lr(cfg, step), pnp_failures=failures_window, beta=beta or 0.0)
            row["seconds"] = seconds_before + time.perf_counter() - t0
            if rank == 0:
                _log(log_path, columns, row, bar)
            window, failures_window = {k: [] for k in window}, 0
        snapshot = done in cfg.snapshot_steps
        if rank == 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps or snapshot):
            seconds = seconds_before + time.perf_counter() - t0
            state = _checkpoint_state(net, opt, done, beta, seconds, cfg, data.keypoints3d)
            _save_atomic(state, ckpt_path)
            if snapshot:
                _save_atomic(state, out / f"checkpoint_step{done:06d}.pt")
    seconds = seconds_before + time.perf_counter() - t0
    summary = _summary(cfg, start, beta, total_failures, nonfinite, seconds, world)
    if rank == 0:
        _save_final(out, net, cfg, data.keypoints3d, summary)
    summary["model"] = net
    return summary


def _truncate_log(source: Path, columns: list[str], start: int, path: Path) -> None:
    """Write ``path`` with the rows of ``source`` up to the step the run starts from (rows written
    after the last checkpoint are redone; a warm start takes the rows of its source run)."""
    rows = []
    if start > 0 and source.is_file():
        with source.open() as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def _append_log(path: Path, columns: list[str], row: dict) -> None:
    with path.open("a", newline="") as f:
        csv.DictWriter(f, columns).writerow({c: row[c] for c in columns})


def read_log(path: str | Path) -> dict[str, np.ndarray]:
    """``log.csv`` as columns of floats."""
    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in (rows[0] if rows else {})}


def plot_log(paths: str | Path | dict[str, str | Path], out: str | Path) -> None:
    """Loss and keypoint-error curves of one run's ``log.csv`` (or several: ``{label: path}``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - plots are optional
        return
    runs = paths if isinstance(paths, dict) else {"": paths}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharex=True)
    for i, (label, path) in enumerate(runs.items()):
        log = read_log(path)
        if not log:
            continue
        colour = f"C{i}"  # one colour per run in every panel
        axes[0].plot(log["step"], log["loss_heatmap"], color=colour, label=label or "heatmap loss")
        on = log["loss_pose"] > 0  # the pose/coordinate loss starts after the warm-up
        if on.any():
            axes[1].plot(log["step"][on], log["loss_pose"][on], color=colour, label=label)
        axes[2].plot(log["step"], log["kp_error_px"], color=colour, label=label)
    axes[0].set_title("heatmap loss (KL)")
    axes[1].set_title("pose / coordinate loss (px$^2$; bpnp-add: ADD / diameter)")
    axes[2].set_title("train keypoint error (px)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if isinstance(paths, dict) and ax.get_legend_handles_labels()[0]:  # heatmap-only: no pose loss
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
