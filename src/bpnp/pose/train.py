"""Training a keypoint heatmap network, optionally end to end through the PnP layer.

The run's settings are a :class:`~bpnp.pose.config.TrainConfig`; what it trains (the heatmap
loss alone, or plus a pose loss through the PnP layer, or a control) is the registered
:mod:`~bpnp.pose.objectives` variant it names. This module is the loop: batches, warm-up, the
loss weight, checkpoints, logs.

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..progress import progress as progress_bar
from .config import TrainConfig
from .data import PoseData, augment_image, crop_margin_for, load_split, object_outline
from .model import KeypointHeatmapNet, heatmap_loss, soft_argmax, split_outputs
from .objectives import StepOutputs, objective

__all__ = ["train", "load_checkpoint", "normalise_images", "read_log", "plot_log"]

MEAN, STD = 0.5, 0.25  # input normalisation of the network


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
    final.update(_framing(cfg))
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


def _checkpoint_state(net, opt, done: int, beta, seconds: float, cfg: TrainConfig, keypoints3d) -> dict:
    return {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "step": done,
        "beta": beta,
        "seconds": seconds,
        "config": asdict(cfg),
        "keypoints3d": keypoints3d,  # so that `bpnp evaluate` takes a checkpoint too
        **_framing(cfg),
    }


def _framing(cfg: TrainConfig) -> dict:
    """How crops of other images should frame the object (``crop_margin``) and what bounds its
    image box (``outline3d``, the model's hull vertices): for evaluate and predict."""
    return {"crop_margin": crop_margin_for(cfg.data), "outline3d": object_outline(cfg.data, cfg.obj_id)}


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
    network), ``loss.png``. Under torchrun only rank 0 writes; a process group this call started
    is destroyed when the run ends (one the caller started is left to the caller).
    """
    starts_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized()
    summary = _train(cfg, resume)
    if starts_group and torch.distributed.is_initialized():
        # Left alive, gloo's worker threads can abort the interpreter's exit (SIGABRT, "terminate
        # called without an active exception"; seen once in CI). Not on an exception: the other
        # ranks may still be in a collective, and the destroy would wait on them.
        torch.distributed.destroy_process_group()
    return summary


def _train(cfg: TrainConfig, resume: bool) -> dict[str, Any]:
    """The training run of :func:`train`."""
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
    pose_loss = objective(cfg)
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
        pose_phase = pose_loss.pose_loss and step >= cfg.warmup_steps
        if pose_phase:
            outputs = StepOutputs(coords, probs, weight_logits, net.stride, kp3d, K, kp_true, batch["pose"])
            l_p, failed = pose_loss(outputs)
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
