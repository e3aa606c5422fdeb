"""``bpnp demo objpose`` and ``bpnp experiment``: object pose estimation trained end to end through
the PnP layer, against its heatmap-only baseline (and a coordinate-penalty control).

Each run: render a training and a test split of a mesh (BOP format), train every variant with the
same data, budget and seed, evaluate each on the same test images, and write ``report.md``,
``metrics.json``, loss curves and pose overlays. Paired comparisons: per-image differences
on the same test images; over several seeds a t-interval of the per-seed mean differences.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..reporting import markdown_table, output_dir, write_json
from .config import check_positive_ints, option
from .objectives import OBJECTIVES

if TYPE_CHECKING:
    from .config import TrainConfig

SPOT = "spot/spot_triangulated.obj"

# Meshes of the experiment: the shipped spot and two read from the shared data folder.
MESHES = {
    "spot": {"path": None, "symmetric": None},
    "cow": {"path": "meshes/cow/cow.obj", "symmetric": None},
    "teapot": {"path": "meshes/teapot/teapot.obj", "symmetric": "y"},  # nearly: about its up axis
}


def spot_mesh() -> Path:
    """The shipped "Spot" mesh (Keenan Crane, public domain)."""
    return Path(str(resources.files("bpnp") / "data" / SPOT))


def mesh_path(name: str, data_root: str | Path | None = None) -> Path:
    """The file of an experiment mesh: spot ships with the package; cow and teapot lie under
    ``data_root`` (a folder with ``meshes/cow/cow.obj`` ..., such as a checkout's
    ``../shared/data``; default: the ``BPNP_SHARED_DATA`` environment variable). Never guessed
    from the working directory. FileNotFoundError says where it looked."""
    if name == "spot":
        return spot_mesh()
    if name not in MESHES:
        raise ValueError(f"unknown mesh {name!r}: expected one of {sorted(MESHES)} (or give a path)")
    root = data_root if data_root is not None else os.environ.get("BPNP_SHARED_DATA")
    if not root:
        raise FileNotFoundError(f"mesh {name!r}: give the data folder (--data-root DIR or BPNP_SHARED_DATA)")
    path = Path(root) / MESHES[name]["path"]
    if not path.is_file():
        raise FileNotFoundError(f"mesh {name!r}: {path}: no such file")
    return path


@dataclass(frozen=True)
class Budget:
    """Sizes of one comparison: images rendered, steps per variant, image side, batch, network
    width. The defaults are the quick demo's; :data:`FULL_BUDGET` is ``bpnp experiment``'s."""

    train_count: int = option(4000, "training renders per mesh")
    test_count: int = option(500, "test renders per mesh")
    steps: int = option(1600, "training steps per variant")
    size: int = option(128, "image side in pixels")
    batch_size: int = option(32, "images per step")
    width: int = option(32, "network width")
    workers: int = option(1, "data-loading worker processes")
    warmup_frac: float = option(0.3, "share of the steps before the pose loss starts")

    def __post_init__(self) -> None:
        check_positive_ints(self, ("train_count", "test_count", "steps", "size", "batch_size", "width"))


#: ``bpnp experiment``'s budget (the longer comparison).
FULL_BUDGET = Budget(train_count=20000, test_count=1000, steps=20000)


@dataclass(frozen=True)
class PoseLossSetting:
    """How the variants other than heatmap-only weigh their extra loss, when not by
    :class:`~bpnp.pose.config.TrainConfig`'s defaults: ``beta`` fixed, or set by ``balance``;
    ``learn_weights``: the PnP variants' loss trains the PnP weights too; ``weight_head``: those
    weights come from a head of their own (:class:`~bpnp.pose.config.TrainConfig`). Such runs lie in
    folders of their own (``bpnp-add-beta0.5_seed0``), beside the default ones, and share their
    seed's heatmap-only run and warm-up."""

    beta: float | None = option(None, "as for train, for every variant but heatmap (e.g. bpnp-add-beta0.5_seed0)")
    balance: float | None = option(None, "as for train, for every variant but heatmap (e.g. bpnp-add-balance0.1_seed0)")
    learn_weights: bool = option(False, "as for train, for bpnp and bpnp-add (e.g. bpnp-add-learned-weights_seed0)")
    weight_head: bool = option(False, "as for train, for bpnp and bpnp-add (e.g. bpnp-add-weight-head_seed0)")

    def __post_init__(self) -> None:
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta: expected a finite number >= 0 or None, got {self.beta!r}")
        if self.balance is not None and not (math.isfinite(self.balance) and self.balance > 0):
            raise ValueError(f"balance: expected a finite positive number or None, got {self.balance!r}")

    def options(self, variant: str) -> dict[str, Any]:
        """The :class:`~bpnp.pose.config.TrainConfig` fields this setting changes for ``variant``."""
        if not OBJECTIVES[variant].pose_loss:
            return {}
        found = self._loss_weight()
        for flag in ("learn_weights", "weight_head"):
            if getattr(self, flag) and OBJECTIVES[variant].through_pnp:
                found[flag] = True
        return found

    def folder(self, variant: str) -> str:
        """The stem of ``variant``'s run folders:
        ``<variant>[-beta<b>][-balance<b>][-learned-weights][-weight-head]``."""
        return variant + "".join(
            _FLAG_FOLDERS[k] if k in _FLAG_FOLDERS else f"-{k}{v:g}" for k, v in self.options(variant).items()
        )

    def describe(self) -> str:
        """``"beta 0.5, learned PnP weights"``; empty for the defaults."""
        parts = [f"{k} {v:g}" for k, v in self._loss_weight().items()]
        flags = [text for flag, text in _FLAG_TEXTS.items() if getattr(self, flag)]
        return ", ".join(parts + flags)

    def _loss_weight(self) -> dict[str, float]:
        """``beta`` and ``balance`` where given."""
        return {k: v for k, v in (("beta", self.beta), ("balance", self.balance)) if v is not None}


# The setting's switches, as they show in run folders and in reports.
_FLAG_FOLDERS = {"learn_weights": "-learned-weights", "weight_head": "-weight-head"}
_FLAG_TEXTS = {"learn_weights": "learned PnP weights", "weight_head": "PnP weights from a head of their own"}


def paired_interval(diffs_per_seed: list[np.ndarray], seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% interval of paired differences (variant minus baseline, per test image).

    With several seeds: a t-interval of the per-seed mean differences (it holds the training
    noise); with one: a bootstrap over the test images (2,000 resamples).
    """
    means = np.array([d.mean() for d in diffs_per_seed], dtype=np.float64)
    if len(means) >= 2:
        from scipy import stats

        half = stats.t.ppf(0.975, len(means) - 1) * means.std(ddof=1) / math.sqrt(len(means))
        return float(means.mean()), float(means.mean() - half), float(means.mean() + half)
    d = np.asarray(diffs_per_seed[0], dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), (2000, len(d)))].mean(1)
    return float(d.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def compare(
    mesh: str | Path,
    out: Path,
    variants: tuple[str, ...],
    seeds: tuple[int, ...],
    budget: Budget,
    symmetric: str | None = None,
    device: str = "cpu",
    quiet: bool = False,
    keypoints: str = "fps",
    finished_only: bool = False,
    setting: PoseLossSetting | None = None,
) -> dict[str, Any]:
    """Render, train every variant for every seed, evaluate: the rows of one mesh (``symmetric``:
    the axis of a continuous symmetry, evaluated with ADD-S; ``keypoints``: ``"fps"`` or
    ``"distinctive"``, see :func:`bpnp.pose.synthesis.render_dataset`; ``setting``: the loss weight
    of the variants other than heatmap-only, their defaults when None).

    ``finished_only``: render and train nothing; read back the seeds whose every variant has
    finished (trained and evaluated) in ``out`` with this budget, skipping the others, so that an
    experiment spread over several sessions can be reported at any point. ``"seeds"`` of the
    result lists the seeds read.
    """
    from ..progress import progress
    from .config import RenderSettings, TrainConfig
    from .synthesis import render_splits

    data = out / "data"
    settings = RenderSettings(size=budget.size)
    bar = None if quiet else (lambda it, total: progress(it, total=total, desc=f"render {Path(mesh).stem}"))
    t0 = time.perf_counter()
    # One data set for every seed and variant: the comparison is paired on the same images.
    counts = {"train": budget.train_count, "test": budget.test_count}
    if not finished_only:
        render_splits(
            mesh, data, counts, settings, seed=0, symmetric=symmetric, progress=bar, keypoint_method=keypoints
        )
    render_seconds = None if finished_only else time.perf_counter() - t0
    setting = setting or PoseLossSetting()
    folders = {v: setting.folder(v) for v in variants}
    runs: dict[str, dict[int, dict]] = {v: {} for v in variants}
    # The pose variants' warm-up is the heatmap run's first steps: trained once, then shared.
    warmup = int(round(budget.warmup_frac * budget.steps))
    share = "heatmap" in variants and len(variants) > 1 and warmup > 0
    order = sorted(variants, key=lambda v: v != "heatmap") if share else list(variants)
    read: list[int] = []
    for seed in seeds:
        snapshot = out / f"heatmap_seed{seed}" / f"checkpoint_step{warmup:06d}.pt"
        found: dict[str, dict] = {}
        for variant in order:
            run_dir = out / f"{folders[variant]}_seed{seed}"
            cfg = TrainConfig(
                data=str(data / "train"),
                test_data=str(data / "test"),
                out=str(run_dir),
                variant=variant,
                steps=budget.steps,
                batch_size=budget.batch_size,
                size=budget.size,
                width=budget.width,
                workers=budget.workers,
                warmup_frac=budget.warmup_frac,
                seed=seed,
                device=device,
                checkpoint_every=max(10, (budget.steps // 10) // 10 * 10),
                progress=not quiet,
                snapshot_steps=[warmup] if share and variant == "heatmap" else [],
                warm_start=str(snapshot) if share and variant != "heatmap" else None,
                **setting.options(variant),
            )
            if finished_only:
                finished = _finished_run(cfg, run_dir)
                if finished is None:
                    break
                summary, metrics = finished
            else:
                summary, metrics = _train_and_evaluate(cfg, data / "test", run_dir, device)
            per = np.load(run_dir / "eval" / "per_image.npz")
            found[variant] = {"train": summary, "metrics": metrics, "per_image": {k: per[k] for k in per.files}}
        # A seed is paired across variants: one missing a variant is left out whole.
        if len(found) == len(order):
            read.append(seed)
            for variant, run in found.items():
                runs[variant][seed] = run
    return {"runs": runs, "folders": folders, "render_seconds": render_seconds, "data": str(data), "seeds": read}


def _finished_run(cfg: TrainConfig, run_dir: Path) -> tuple[dict, dict] | None:
    """The training summary and metrics of ``run_dir`` when it holds a finished and evaluated run
    of ``cfg``; None when it holds none or an unfinished one; ValueError when it holds a run of
    another config (the check that keeps budgets from being mixed in one report).

    A finished run is its record: ``config.json``, ``train_summary.json`` and the evaluation's
    ``metrics.json`` and ``per_image.npz``. Its weights and the renders may be gone and the
    experiment folder may have moved: the paths a run recorded count up to the folder of its mesh."""
    import json

    from .config import TrainConfig

    files = [run_dir / "train_summary.json", run_dir / "eval" / "metrics.json", run_dir / "eval" / "per_image.npz"]
    finished = all(f.is_file() for f in files)
    record = run_dir / "config.json"
    if record.is_file():
        found = TrainConfig.from_json(record).__dict__
        # Once a run has finished, its snapshots are files beside it and change nothing: a heatmap
        # run that saved the shared warm-up is the heatmap run of a report without pose variants
        # too. A run still to be continued must save the snapshots asked of it.
        ignored = ("progress", "snapshot_steps") if finished else ("progress",)
        differ = sorted(
            k
            for k, v in cfg.__dict__.items()
            if k not in ignored and not (_same_place(found[k], v, run_dir.parent) if k in _PLACES else found[k] == v)
        )
        if differ:
            raise ValueError(f"{run_dir}: a run with other {', '.join(differ)} is there; use another --out")
    if not finished:
        return None
    return json.loads(files[0].read_text()), json.loads(files[1].read_text())


# The config's paths: where the experiment lies, not what it ran.
_PLACES = ("data", "test_data", "out", "warm_start")


def _same_place(found: str | None, wanted: str | None, root: Path) -> bool:
    """Whether ``found``, a path a run recorded, is ``wanted`` (a path under ``root``) up to where
    ``root`` lay when the run was made."""
    if found is None or wanted is None:
        return found == wanted
    tail = Path(wanted).relative_to(root).parts
    return Path(found).parts[-len(tail) :] == tail


def _train_and_evaluate(cfg: TrainConfig, test: Path, run_dir: Path, device: str) -> tuple[dict, dict]:
    """Train and evaluate one run, or continue it: a run folder that holds a finished run of the
    same config is read back, one with a checkpoint resumes, so that an experiment stopped
    (or killed) part way is continued by the same command."""
    import json

    from .evaluate import evaluate
    from .train import train

    finished = _finished_run(cfg, run_dir)
    if finished is not None:
        return finished
    done = run_dir / "train_summary.json"
    metrics_file = run_dir / "eval" / "metrics.json"
    if done.is_file() and (run_dir / "model.pt").is_file():
        summary = json.loads(done.read_text())
    else:
        summary = train(cfg, resume=True)
        summary.pop("model")
        metrics_file.unlink(missing_ok=True)
    return summary, evaluate(run_dir / "model.pt", test, run_dir / "eval", device=device)


# (summary key, label, per-image key, is a rate). The mean errors beside the rates: at the longer
# budget 2D projection < 5 px passes 92-99% of the images for every variant, so a rate alone
# cannot show a difference that the errors themselves may hold.
METRIC_ROWS = [
    ("kp_error_px_mean", "keypoint error (px)", "kp_error_px", False),
    ("proj2d_px_mean", "2D projection error (px)", "proj2d_px", False),
    ("proj2d_5px", "2D projection < 5 px", "proj2d_5px", True),
    ("add_or_adds_mm_mean", "ADD(-S) error (mm)", "add_or_adds_mm", False),
    ("add_or_adds_0.1d", "ADD(-S)-0.1d", "add_or_adds_0.1d", True),
    ("5cm5deg", "5 cm 5 deg", "5cm5deg", True),
]


def summarise(result: dict, baseline: str = "heatmap") -> tuple[list[list], dict]:
    """Table rows (mean over seeds per variant; paired difference to ``baseline``) and JSON."""
    runs = result["runs"]
    rows, out = [], {}
    for variant, by_seed in runs.items():
        seeds = sorted(by_seed)
        entry: dict[str, Any] = {"seeds": seeds}
        for key, _label, per_key, _rate in METRIC_ROWS:
            entry[key] = float(np.mean([_per_image(by_seed[s], per_key).mean() for s in seeds]))
            if variant != baseline and baseline in runs:
                diffs = [_per_image_diff(runs, variant, baseline, s, per_key) for s in seeds]
                entry[f"{key}_diff"] = paired_interval(diffs)
        entry["pnp_failures_train"] = int(sum(by_seed[s]["train"]["pnp_failures"] for s in seeds))
        entry["nonfinite_steps"] = int(sum(by_seed[s]["train"]["nonfinite_steps"] for s in seeds))
        entry["train_seconds"] = float(np.mean([by_seed[s]["train"]["seconds"] for s in seeds]))
        out[variant] = entry
        cells = [_run_name(result, variant)]
        cells += [_cell(entry[key], rate, entry.get(f"{key}_diff")) for key, _l, _p, rate in METRIC_ROWS]
        cells += [entry["pnp_failures_train"], f"{entry['train_seconds']:.0f}"]
        rows.append(cells)
    return rows, out


def _run_name(result: dict, variant: str) -> str:
    """How a report's rows name ``variant``: the stem of its run folders, which carries a loss-weight
    setting (``bpnp-add-beta0.5``; see :class:`PoseLossSetting`)."""
    return result.get("folders", {}).get(variant, variant)


def _per_image(run: dict, key: str) -> np.ndarray:
    """``(N,)`` float64: one run's ``key`` per test image; ``"add_or_adds_mm"``: ADD-S error of a
    symmetric object, ADD error of any other."""
    if key == "add_or_adds_mm":
        key = "adds_mm" if run["metrics"].get("symmetric") else "add_mm"
    return run["per_image"][key].astype(np.float64)


def _per_image_diff(runs: dict, variant: str, baseline: str, seed: int, key: str) -> np.ndarray:
    """``(N,)`` per test image: ``variant``'s ``key`` minus ``baseline``'s, for one seed."""
    return _per_image(runs[variant][seed], key) - _per_image(runs[baseline][seed], key)


def _cell(value: float, is_rate: bool, diff: tuple[float, float, float] | None = None) -> str:
    """``value`` (a percentage when ``is_rate``), with the paired difference ``(mean, lo, hi)``."""
    text = f"{100 * value:.1f}%" if is_rate else f"{value:.2f}"
    if diff is not None:
        k, digits = (100, 1) if is_rate else (1, 2)
        text += f" ({k * diff[0]:+.{digits}f} [{k * diff[1]:+.{digits}f}, {k * diff[2]:+.{digits}f}])"
    return text


# The translation error split along and across the line of sight (per seed only): ADD is mostly
# the depth error, which 2D projection hardly sees; the depth bias (the mean signed depth error,
# > 0: too far) says how much of it one scale error of the keypoints makes. Records evaluated
# before a column was added have no cell there.
ERROR_SPLIT = [
    ("depth error (mm)", "depth_error_mm"),
    ("depth bias (mm, > 0: too far)", "depth_signed_error_mm"),
    ("lateral error (mm)", "lateral_error_mm"),
]

SEED_HEADER = [
    "seed",
    "variant",
    *(label for _key, label, _per_key, _rate in METRIC_ROWS),
    "ADD(-S)-0.1d only with it / only without",
    *(label for label, _per_key in ERROR_SPLIT),
    "median rotation error (deg)",
    "beta",
]


def per_seed_rows(result: dict, baseline: str = "heatmap") -> list[list]:
    """One row per seed and variant: its metrics; for a variant other than ``baseline``, the
    paired difference on that seed's test images (bootstrap) and how many images pass
    ADD(-S)-0.1d with it and not with the baseline, and the other way round (the spread of one
    seed that the mean over seeds hides)."""
    runs = result["runs"]
    rows = []
    for seed in sorted(next(iter(runs.values()))):
        for variant, by_seed in runs.items():
            run, cells = by_seed[seed], [seed, _run_name(result, variant)]
            paired = variant != baseline and baseline in runs
            for _key, _label, per_key, rate in METRIC_ROWS:
                cells.append(_seed_cell(runs, variant, baseline if paired else None, seed, per_key, rate))
            if paired:
                mine = run["per_image"]["add_or_adds_0.1d"].astype(bool)
                theirs = runs[baseline][seed]["per_image"]["add_or_adds_0.1d"].astype(bool)
                cells.append(f"{int((mine & ~theirs).sum())} / {int((theirs & ~mine).sum())}")
            else:
                cells.append("")
            for _label, per_key in ERROR_SPLIT:
                have = all(per_key in r[seed]["per_image"] for r in runs.values())
                cells.append(_seed_cell(runs, variant, baseline if paired else None, seed, per_key) if have else "")
            cells += [f"{run['metrics']['rotation_error_deg_median']:.2f}"]
            beta = run["train"].get("beta")
            cells.append(f"{beta:.3g}" if beta else "")
            rows.append(cells)
    return rows


def _seed_cell(runs: dict, variant: str, baseline: str | None, seed: int, key: str, rate: bool = False) -> str:
    """One seed's mean of per-image ``key``, with the paired interval to ``baseline`` if given."""
    diff = paired_interval([_per_image_diff(runs, variant, baseline, seed, key)]) if baseline else None
    return _cell(_per_image(runs[variant][seed], key).mean(), rate, diff)


def _header(baseline: str) -> list[str]:
    return ["variant"] + [label for _k, label, _p, _r in METRIC_ROWS] + ["PnP failures (train)", "train s"]


def _figures(result: dict, root: Path, name: str, link: str = "", tag: str = "") -> list[str]:
    """Loss curves of every variant's first seed (``{name}{tag}_loss.png``), the histograms of
    their signed depth errors (``{name}{tag}_depth.png``; records evaluated before it have none)
    and each variant's overlays, copied into ``root`` (as JPEG: a run's 1024 px PNG of renders is
    1.5 MB); markdown lines whose image links start with ``link``. A copy made before is linked
    when the run's own overlays are gone (a kept record has none)."""
    from PIL import Image

    from ..plots import signed_error_histograms
    from .train import plot_log

    runs = result["runs"]
    seed = min(next(iter(runs.values())))
    run_dirs = {v: root / f"{_run_name(result, v)}_seed{seed}" for v in runs}
    plot_log({v: str(run_dirs[v] / "log.csv") for v in runs}, root / f"{name}{tag}_loss.png")
    lines = [f"![loss curves]({link}{name}{tag}_loss.png)", ""]
    depth = {v: by_seed[seed]["per_image"].get("depth_signed_error_mm") for v, by_seed in runs.items()}
    if all(d is not None for d in depth.values()):
        title = f"{name}, seed {seed}: where each variant puts the object along the line of sight"
        signed_error_histograms(root / f"{name}{tag}_depth.png", depth, "depth error (mm, > 0: too far)", title)
        lines += [f"![signed depth errors]({link}{name}{tag}_depth.png)", ""]
    for variant in runs:
        src = run_dirs[variant] / "eval" / "overlays.png"
        copy = f"{name}_{_run_name(result, variant)}_seed{seed}_overlays.jpg"
        if src.is_file():
            Image.open(src).convert("RGB").save(root / copy, quality=85)
        if (root / copy).is_file():
            lines.append(
                f"{variant} (seed {seed}): the model's box under the true pose (green) and the predicted (red)\n"
            )
            lines.append(f"![{variant} overlays]({link}{copy})\n")
    return lines


def run(
    out: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    quiet: bool = False,
    iters: int | None = None,
    variants: tuple[str, ...] = ("heatmap", "bpnp-add"),
    budget: Budget | None = None,
) -> dict[str, Any]:
    """The quick demo: spot, one seed, heatmap-only vs heatmap + the BPnP ADD loss (<= 15 min on
    2 CPU cores; ``variants=("heatmap", "bpnp")`` for the paper's reprojection loss).

    ``iters`` replaces the training steps per variant. Acceptance: each variant reaches 2D
    projection < 5 px on >= 50% of the held-out renders, a mean keypoint error <= 8 px, no PnP
    failure and no non-finite loss in training.
    """
    budget = budget or (Budget(steps=iters) if iters else Budget())
    root = output_dir(out, "objpose")
    t0 = time.perf_counter()
    result = compare(spot_mesh(), root, variants, (seed,), budget, device=device, quiet=quiet)
    rows, summary = summarise(result)
    acceptance = {
        f"{v}: proj2d_5px >= 50%, kp error <= 8 px, no PnP failure or NaN": bool(
            s["proj2d_5px"] >= 0.5
            and s["kp_error_px_mean"] <= 8.0
            and s["pnp_failures_train"] == 0
            and s["nonfinite_steps"] == 0
        )
        for v, s in summary.items()
    }
    seconds = time.perf_counter() - t0
    table = markdown_table(_header("heatmap"), rows)
    report = [
        "# Object pose through the PnP layer (quick demo)",
        "",
        f"Spot (10 cm), {budget.train_count} training and {budget.test_count} test renders of "
        f"{budget.size}x{budget.size} px, {budget.steps} steps of {budget.batch_size} images per variant, seed "
        f"{seed}, {seconds / 60:.1f} min in all. Differences to heatmap-only on the same test images in "
        "brackets: mean [95% bootstrap interval over the images].",
        "",
        table,
        "",
        markdown_table(SEED_HEADER, per_seed_rows(result)),
        "",
        "Acceptance: " + "; ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in acceptance.items()),
        "",
    ]
    report += _figures(result, root, "objpose")
    (root / "report.md").write_text("\n".join(report))
    metrics = {
        "variants": summary,
        "acceptance": acceptance,
        "seconds": seconds,
        "render_seconds": result["render_seconds"],
        "budget": budget.__dict__,
    }
    write_json(root / "metrics.json", metrics)
    if not quiet:
        print("\n" + table + f"\n\nreport: {root / 'report.md'}")
    return metrics


def run_experiment(
    out: str | None,
    meshes: list[str],
    seeds: list[int],
    variants: tuple[str, ...] = ("heatmap", "bpnp", "bpnp-add", "coord"),
    budget: Budget | None = None,
    device: str = "cpu",
    quiet: bool = False,
    keypoints: str = "fps",
    finished_only: bool = False,
    report_name: str | None = None,
    setting: PoseLossSetting | None = None,
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """The comparison on several meshes and seeds (the longer experiment): one report.
    ``data_root``: where the meshes other than spot lie (see :func:`mesh_path`).
    ``setting``: the loss weight of the variants other than heatmap-only (see
    :class:`PoseLossSetting`; their defaults when None).
    ``keypoints="distinctive"`` chooses the keypoints of a symmetric mesh among the points that
    break its symmetry (the others are unchanged). ``finished_only``: train nothing, report the
    seeds of each mesh that have finished in ``out`` (see :func:`compare`); a mesh without one is
    named in the report and left out of the metrics.

    The report is ``report.md`` and ``metrics.json`` (and ``<mesh>/<mesh>_loss.png``), or with a
    ``report_name`` ``report_<name>.md``, ``metrics_<name>.json`` and ``<mesh>_<name>_loss.png``:
    a folder whose seeds have finished different sets of variants keeps a report for each set."""
    if report_name is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", report_name):
        raise ValueError(f"report_name: expected letters, digits, '-' and '_', got {report_name!r}")
    tag = f"_{report_name}" if report_name else ""
    budget = budget or FULL_BUDGET
    setting = setting or PoseLossSetting()
    root = output_dir(out, "objpose_experiment")
    sections, results, seeds_read = [], {}, {}
    for name in meshes:
        stem = Path(name).stem
        # A report of finished runs reads no mesh: kept records report where the mesh is absent.
        path = Path(name) if Path(name).suffix or finished_only else mesh_path(name, data_root)
        symmetric = MESHES.get(name, {}).get("symmetric")
        result = compare(
            path,
            root / stem,
            tuple(variants),
            tuple(seeds),
            budget,
            symmetric,
            device,
            quiet,
            keypoints,
            finished_only,
            setting,
        )
        sections += [f"## {stem}" + (" (symmetric: ADD-S)" if symmetric else ""), ""]
        if not result["seeds"]:
            sections += [f"No seed of {list(seeds)} has finished every variant in {root / stem}.", ""]
            continue
        seeds_read[stem] = result["seeds"]
        rows, summary = summarise(result)
        results[stem] = summary
        many = len(result["seeds"]) > 1
        sections += [
            f"Seeds {result['seeds']}; brackets: paired difference to heatmap-only on the same test images, "
            "mean [95% interval: "
            + ("t over the seeds' mean differences]." if many else "bootstrap over the test images, one seed]."),
            "",
        ]
        sections += [markdown_table(_header("heatmap"), rows), ""]
        sections += ["Per seed (brackets: bootstrap over that seed's test images):", ""]
        sections += [markdown_table(SEED_HEADER, per_seed_rows(result)), ""]
        sections += _figures(result, root / stem, stem, link=f"{stem}/", tag=tag)
    report = [
        "# Object pose: " + " vs ".join(OBJECTIVES[v].label for v in variants),
        "",
        f"{budget.train_count} training / {budget.test_count} test renders per mesh, {budget.steps} steps of "
        f"{budget.batch_size}"
        + ("; keypoints of symmetric meshes among the points that break the symmetry" if keypoints != "fps" else "")
        + (f"; the losses beside the heatmaps' at {setting.describe()}" if setting.describe() else "")
        + ("; the runs that had finished, nothing trained for this report" if finished_only else "")
        + ".",
        "",
    ] + sections
    (root / f"report{tag}.md").write_text("\n".join(report))
    write_json(
        root / f"metrics{tag}.json",
        {
            "meshes": results,
            "budget": budget.__dict__,
            "seeds": seeds_read,
            "keypoints": keypoints,
            "setting": setting.__dict__,
        },
    )
    return results
