"""The ``bpnp`` command: the demos, the calibration tool and the object-pose tool (render, train,
evaluate, score, experiment), thin over :mod:`bpnp.paper`, :mod:`bpnp.calibration` and :mod:`bpnp.pose`."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from .cli_config import ConfigError


class UsageError(Exception):
    """A mistake in the command line or its files: one line to stderr, exit status 2."""


def _board(text: str) -> tuple[int, int]:
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected COLSxROWS such as 9x6, got {text!r}") from None
    if cols < 2 or rows < 2:
        raise argparse.ArgumentTypeError(f"a board needs at least 2x2 inner corners, got {text!r}")
    return cols, rows


def _float_where(text: str, accept, rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and accept(value)):
        raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _float_where(text, lambda v: v > 0, "a finite positive number")


def _nonnegative_float(text: str) -> float:
    return _float_where(text, lambda v: v >= 0, "a finite number >= 0")


def _fraction(text: str) -> float:
    return _float_where(text, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {text!r}")
    return value


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has no CUDA device (torch.cuda.is_available() is False)"
        )
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the demos run on cpu or cuda")
    return text


# bpnp.pose.synthesis.KEYPOINT_METHODS, spelt out: importing it would load numpy and the mesh tools for every --help.
KEYPOINT_METHODS = ("fps", "distinctive")


def _report_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '-' and '_', got {text!r}")
    return text


def _variants(text: str) -> tuple[str, ...]:
    from .pose.objectives import OBJECTIVES

    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in names if v not in OBJECTIVES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(OBJECTIVES)}, got {text!r}")
    return names


def _add_pose_commands(sub) -> None:
    _add_render_command(sub)
    _add_train_command(sub)
    _add_evaluate_command(sub)
    _add_predict_command(sub)
    _add_score_command(sub)
    _add_experiment_command(sub)


def _add_render_command(sub) -> None:
    from .cli_config import add_config_options
    from .pose.config import RenderSettings

    ren = sub.add_parser("render", help="render a mesh into a BOP-format training/test set")
    ren.add_argument("--mesh", required=True, help="OBJ/PLY/GLB mesh (any units: --diameter scales it)")
    ren.add_argument("--count", type=_positive_int, required=True, help="images to render")
    ren.add_argument("--out", required=True, help="data-set folder (models/, keypoints.json, <split>/)")
    ren.add_argument("--split", default="train", help="split folder name (default train)")
    ren.add_argument("--seed", type=int, default=0, help="makes the split reproducible (default 0)")
    ren.add_argument("--diameter", type=_positive_float, default=100.0, help="object diameter in mm (default 100)")
    ren.add_argument("--keypoints", type=_positive_int, default=8, help="surface keypoints (plus the centre)")
    ren.add_argument(
        "--keypoint-method",
        choices=KEYPOINT_METHODS,
        default="fps",
        help="fps: farthest points over the surface; distinctive: over the points that break the --symmetric axis",
    )
    add_config_options(
        ren,
        RenderSettings,
        ("size", "occluder_prob", "view_cone", "photo", "background", "focal", "lens", "lens_field"),
    )
    ren.add_argument("--texture", default=None, help="texture image for a mesh with UV coordinates")
    ren.add_argument(
        "--symmetric", choices=["x", "y", "z"], default=None, help="axis of a continuous symmetry (evaluation: ADD-S)"
    )
    ren.add_argument("--quiet", action="store_true", help="no progress bar")


# TrainConfig fields that `bpnp train` offers as options (progress: --quiet; snapshot_steps: experiments).
TRAIN_OPTIONS = (
    "data", "test_data", "obj_id", "variant", "steps", "batch_size", "lr", "lr_final", "clip_grad",
    "warmup_frac", "balance", "beta", "confidence_weights", "learn_weights", "weight_head", "size",
    "width", "sigma", "window", "augment", "workers", "threads", "seed", "device", "log_every",
    "checkpoint_every", "out", "warm_start",
)  # fmt: skip


def _add_train_command(sub) -> None:
    from .cli_config import add_config_options
    from .pose.config import TrainConfig

    tr = sub.add_parser("train", help="train a keypoint network (optionally through the PnP layer)")
    tr.add_argument("--config", default=None, help="JSON config (bpnp.pose.config.TrainConfig fields)")
    tr.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    tr.add_argument("--mesh", default=None, help="render a data set of this mesh first (into OUT/data)")
    tr.add_argument("--count", type=_positive_int, default=4000, help="with --mesh: training renders (default 4000)")
    tr.add_argument("--test-count", type=_positive_int, default=500, help="with --mesh: test renders (default 500)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    # The run's settings: they override the --config file's (or the resumed run's) fields.
    add_config_options(tr, TrainConfig, TRAIN_OPTIONS, parsers={"device": _device}, unset=True)


CROP_MARGIN_HELP = (
    "crop margin around the object's box in images larger than the network's input "
    "(default: the one that frames the object as the training renders did)"
)


def _add_evaluate_command(sub) -> None:
    ev = sub.add_parser("evaluate", help="evaluate a trained network on a BOP split")
    ev.add_argument("--checkpoint", required=True, help="model.pt of a training run")
    ev.add_argument("--data", required=True, help="BOP split folder")
    ev.add_argument("--obj-id", type=_positive_int, default=None, help="BOP object id (default: the run's)")
    ev.add_argument("--limit", type=_positive_int, default=None, help="evaluate at most this many images")
    ev.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    ev.add_argument("--unweighted", action="store_true", help="plain PnP (default: weighted by heatmap confidence)")
    ev.add_argument(
        "--pnp-loss", choices=("l2", "huber", "cauchy"), default="l2", help="the test-time PnP's cost (default l2)"
    )
    ev.add_argument("--ransac", action="store_true", help="test-time PnP with RANSAC (threshold 4 crop pixels)")
    ev.add_argument(
        "--no-visibility", action="store_true", help="skip the keypoints' visibility (ray casting the model)"
    )
    ev.add_argument("--crop-margin", type=_nonnegative_float, default=None, help=CROP_MARGIN_HELP)
    ev.add_argument("--out", default=None, help="output folder (default: eval/ beside the checkpoint)")
    ev.add_argument("--quiet", action="store_true", help="do not print the metrics")


def _add_predict_command(sub) -> None:
    pr = sub.add_parser("predict", help="poses of the object in new photographs (BOP result CSV, overlays)")
    pr.add_argument("--checkpoint", required=True, help="model.pt of a training run")
    pr.add_argument("--images", nargs="+", required=True, help="photographs")
    pr.add_argument("--camera", required=True, help="camera JSON: bpnp calibrate --json output, or {K, dist}")
    pr.add_argument(
        "--boxes", default=None, help='JSON {"image name": [x, y, w, h], ...} (default: the network finds the object)'
    )
    pr.add_argument("--out", required=True, help="BOP result CSV to write (and a JSON of every image beside it)")
    pr.add_argument("--overlays", default=None, help="folder for each image with the predicted pose drawn on it")
    pr.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    pr.add_argument("--crop-margin", type=_nonnegative_float, default=None, help=CROP_MARGIN_HELP)
    pr.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _add_score_command(sub) -> None:
    sc = sub.add_parser("score", help="score the poses of a BOP result CSV on a BOP split")
    sc.add_argument("--predictions", required=True, help="BOP result CSV (scene_id,im_id,obj_id,score,R,t,time)")
    sc.add_argument("--data", required=True, help="BOP split folder")
    sc.add_argument("--obj-id", type=_positive_int, default=None, help="BOP object id (default: the only one there)")
    sc.add_argument("--out", default=None, help="output folder (default: score/ beside the CSV)")
    sc.add_argument("--quiet", action="store_true", help="do not print the metrics")


def _add_experiment_command(sub) -> None:
    from .cli_config import add_config_options
    from .pose.study import FULL_BUDGET, PoseLossSetting

    ex = sub.add_parser("experiment", help="objpose: variants x meshes x seeds, paired comparison report")
    ex.add_argument(
        "--meshes", nargs="+", default=["spot", "cow", "teapot"], help="spot, cow, teapot or paths (default all three)"
    )
    ex.add_argument(
        "--data-root",
        default=None,
        metavar="DIR",
        help="folder with meshes/cow and meshes/teapot, such as ../shared/data (default: $BPNP_SHARED_DATA)",
    )
    ex.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    ex.add_argument(
        "--variants",
        type=_variants,
        default=("heatmap", "bpnp", "bpnp-add", "coord"),
        help="comma-separated, of heatmap, bpnp, bpnp-add, coord (default all four; heatmap is the baseline)",
    )
    ex.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    ex.add_argument(
        "--keypoints",
        choices=KEYPOINT_METHODS,
        default="fps",
        help="keypoints of symmetric meshes (teapot): fps over the surface, or distinctive (on what breaks the symmetry)",
    )
    add_config_options(ex, FULL_BUDGET, ("steps", "train_count", "test_count", "size", "batch_size", "width"))
    add_config_options(ex, PoseLossSetting, note=" (runs in folders of their own)")
    ex.add_argument("--out", default=None, help="output folder (default runs/objpose_experiment)")
    ex.add_argument(
        "--finished-only",
        action="store_true",
        help="train nothing: report the seeds whose every variant has finished in --out",
    )
    ex.add_argument(
        "--report-name",
        type=_report_name,
        default=None,
        help="write report_NAME.md and metrics_NAME.json (default report.md, metrics.json): one report per set of variants in one --out",
    )
    ex.add_argument("--quiet", action="store_true", help="no progress bars")


def _refuse_a_run_there(out: Path) -> None:
    """A training run without ``--resume`` never overwrites another run's log and checkpoints."""
    found = [name for name in ("checkpoint.pt", "model.pt", "log.csv") if (out / name).is_file()]
    if found:
        raise UsageError(
            f"--out: {out} holds a training run already ({', '.join(found)}): continue it with "
            f"--resume {out}, or choose another --out"
        )


def _existing_files(paths: list[str], option: str | None) -> None:
    """Every path is a file; else one line naming the first that is not (and the option)."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UsageError(f"{option + ': ' if option else ''}{missing[0]}: no such file")


def _existing_dir(path: str | None, option: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise UsageError(f"{option}: {path}: no such folder")


def _run_pose(args: argparse.Namespace) -> int:
    """render / train / evaluate / score / experiment."""
    commands = {"render": _run_render, "train": _run_train, "evaluate": _run_evaluate, "predict": _run_predict}
    commands.update({"score": _run_score, "experiment": _run_experiment})
    return commands[args.command](args)


def _run_render(args: argparse.Namespace) -> int:
    """``bpnp render``."""
    from .cli_config import config_from_args, config_values
    from .pose.config import RenderSettings
    from .pose.synthesis import render_dataset
    from .progress import progress

    settings = config_from_args(RenderSettings, config_values(args, RenderSettings))
    if not Path(args.mesh).is_file():
        raise UsageError(f"--mesh: {args.mesh}: no such file")
    if args.size % 16:
        raise UsageError(f"--size: expected a multiple of 16 (the network's stride), got {args.size}")
    if args.keypoint_method == "distinctive" and args.symmetric is None:
        raise UsageError("--keypoint-method distinctive: give the axis it breaks with --symmetric x|y|z")
    _writable_dir(args.out, args.out)
    bar = None if args.quiet else (lambda it, total: progress(it, total=total, desc="render"))
    split = render_dataset(
        args.mesh,
        args.out,
        args.count,
        settings,
        seed=args.seed,
        split=args.split,
        diameter_mm=args.diameter,
        num_keypoints=args.keypoints,
        symmetric=args.symmetric,
        texture=args.texture,
        progress=bar,
        keypoint_method=args.keypoint_method,
    )
    if not args.quiet:
        print(f"{args.count} images in {split}")
    return 0


def _train_config(args: argparse.Namespace, overrides: dict):
    """The run's TrainConfig: the resumed run's or the --config file's fields, or the defaults,
    with the command line's options over them; a refused value is a usage error."""
    from .cli_config import in_option_words
    from .pose.config import TrainConfig

    try:
        if args.resume:
            config_file = Path(args.resume) / "config.json"
            if not config_file.is_file():
                raise UsageError(f"--resume: {args.resume} has no config.json (not a training run)")
            # The folder named on the command line, also where the run was moved after it started.
            return TrainConfig.from_json(config_file, **{**overrides, "out": args.resume})
        if args.config:
            if not Path(args.config).is_file():
                raise UsageError(f"--config: {args.config}: no such file")
            return TrainConfig.from_json(args.config, **overrides)
        return TrainConfig(**overrides)
    except ValueError as exc:
        field = str(exc).partition(":")[0]
        raise UsageError(in_option_words(TrainConfig, str(exc)) if field in overrides else str(exc)) from None


def _run_train(args: argparse.Namespace) -> int:
    """``bpnp train``."""
    from .cli_config import config_values
    from .pose.config import TrainConfig
    from .pose.train import train

    overrides = config_values(args, TrainConfig, TRAIN_OPTIONS)
    if args.quiet:
        overrides["progress"] = False
    cfg = _train_config(args, overrides)
    if args.mesh:
        from .pose.config import RenderSettings
        from .pose.synthesis import render_splits

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--mesh under torchrun: render the data once with `bpnp render`, then train on it")
        if not Path(args.mesh).is_file():
            raise UsageError(f"--mesh: {args.mesh}: no such file")
        counts = {"train": args.count, "test": args.test_count}
        split = render_splits(args.mesh, Path(cfg.out) / "data", counts, RenderSettings(size=cfg.size), cfg.seed)
        cfg = TrainConfig(**{**cfg.__dict__, "data": str(split["train"]), "test_data": str(split["test"])})
    if not cfg.data:
        raise UsageError("give --data DIR, --mesh PATH, --config FILE or --resume RUN_DIR")
    _existing_dir(cfg.data, "data")
    _existing_dir(cfg.test_data, "test_data")
    if cfg.warm_start and not Path(cfg.warm_start).is_file():
        raise UsageError(f"--warm-start: {cfg.warm_start}: no such checkpoint")
    if not args.resume:
        _refuse_a_run_there(Path(cfg.out))
    _writable_dir(cfg.out, cfg.out)
    summary = train(cfg, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 evaluates and reports
        return 0
    if cfg.test_data:
        from .pose.evaluate import evaluate

        evaluate(Path(cfg.out) / "model.pt", cfg.test_data, Path(cfg.out) / "eval", device=cfg.device, quiet=args.quiet)
    if not args.quiet:
        print(f"trained {summary['steps']} steps (from {summary['resumed_from']}); model: {Path(cfg.out) / 'model.pt'}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    """``bpnp evaluate``."""
    from .pose.evaluate import evaluate

    _existing_files([args.checkpoint], "--checkpoint")
    _existing_dir(args.data, "--data")
    from .pose.train import load_checkpoint

    try:  # before any folder is made
        load_checkpoint(args.checkpoint)
    except ValueError as exc:
        raise UsageError(f"--checkpoint: {exc}") from None
    out = args.out or str(Path(args.checkpoint).parent / "eval")
    made = not Path(out).exists()
    _writable_dir(out, out)
    try:
        evaluate(
            args.checkpoint,
            args.data,
            out,
            obj_id=args.obj_id,
            device=args.device,
            limit=args.limit,
            quiet=args.quiet,
            confidence_weights=not args.unweighted,
            visibility=not args.no_visibility,
            loss=args.pnp_loss,
            ransac=args.ransac,
            crop_margin=args.crop_margin,
        )
    except ValueError as exc:  # e.g. a network of another object: no folder left behind
        if made and not any(Path(out).iterdir()):
            Path(out).rmdir()
        raise UsageError(str(exc)) from None
    if not args.quiet:
        print(f"report: {Path(out) / 'report.md'}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    """``bpnp predict``."""
    import json

    from .interop import read_camera
    from .pose.predict import PosePredictor, draw_prediction, write_predictions

    _existing_files([args.checkpoint, args.camera, *args.images] + ([args.boxes] if args.boxes else []), None)
    try:
        K, dist = read_camera(args.camera)
        if dist is not None and not dist.any():  # a pinhole camera: the plain (faster) solve
            dist = None
        predictor = PosePredictor(args.checkpoint, device=args.device, margin=args.crop_margin)
    except (ValueError, KeyError) as exc:
        raise UsageError(str(exc)) from None
    names = [Path(i).name for i in args.images]
    boxes = None
    if args.boxes:
        given = json.loads(Path(args.boxes).read_text())
        boxes = [given.get(n) for n in names]
    images = _read_rgb(args.images)
    found = predictor(images, K, boxes, dist)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    left_out = write_predictions(args.out, names, found, predictor.obj_id)
    if args.overlays:
        _writable_dir(args.overlays, args.overlays)
        for name, img, p in zip(names, images, found):
            draw_prediction(img, p, K, predictor.keypoints3d, Path(args.overlays) / f"{Path(name).stem}_pose.jpg")
    if left_out:
        print(
            f"bpnp predict: {left_out} of {len(names)} images: PnP did not converge (not in the CSV; "
            f"see {Path(args.out).with_suffix('.json')})",
            file=sys.stderr,
        )
    if not args.quiet:
        print(f"{len(names) - left_out} poses: {args.out}")
    return 0


def _read_rgb(paths: list[str]) -> list:
    import cv2

    images = []
    for path in paths:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise UsageError(f"--images: {path}: not an image OpenCV can read")
        images.append(img[..., ::-1].copy())
    return images


def _run_score(args: argparse.Namespace) -> int:
    """``bpnp score``."""
    from .pose.evaluate import score_predictions

    _existing_files([args.predictions], "--predictions")
    _existing_dir(args.data, "--data")
    out = args.out or str(Path(args.predictions).parent / "score")
    _writable_dir(out, out)
    score_predictions(args.predictions, args.data, out, obj_id=args.obj_id, quiet=args.quiet)
    if not args.quiet:
        print(f"report: {Path(out) / 'report.md'}")
    return 0


def _run_experiment(args: argparse.Namespace) -> int:
    """``bpnp experiment``."""
    from .cli_config import config_from_args, config_values
    from .pose.study import Budget, PoseLossSetting, run_experiment

    budget = config_from_args(Budget, config_values(args, Budget))
    setting = config_from_args(PoseLossSetting, config_values(args, PoseLossSetting))
    out = _writable_dir(args.out, str(Path("runs") / "objpose_experiment"))
    run_experiment(
        out,
        args.meshes,
        args.seeds,
        args.variants,
        budget,
        device=args.device,
        quiet=args.quiet,
        keypoints=args.keypoints,
        finished_only=args.finished_only,
        report_name=args.report_name,
        setting=setting,
        data_root=args.data_root,
    )
    if not args.quiet:
        print(f"report: {Path(out) / ('report_' + args.report_name if args.report_name else 'report')}.md")
    return 0


def _writable_dir(path: str | None, default: str) -> str:
    """Create the output folder now and check that a file can be written there, before the work."""
    target = Path(path or default)
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".bpnp-write-test-{os.getpid()}"  # ranks of one torchrun job check at once
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out: cannot write to {target}: {exc.strerror or exc}") from None
    return str(target)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpnp", description="bpnp: the PnP solver as a differentiable layer")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a demo experiment (writes metrics.json, plots, report.md)")
    demo.add_argument(
        "name",
        choices=["pose", "sfm", "calib", "calibrate", "layer", "objpose", "all"],
        help="pose, sfm, calib: the paper's three small experiments; calibrate: rendered chessboard photographs; "
        "layer: the layer against OpenCV; objpose: object pose through the layer; all: the paper's and calibrate",
    )
    demo.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    demo.add_argument("--device", type=_device, default="cpu", help="torch device, e.g. cpu or cuda")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the demo (default 0)")
    demo.add_argument(
        "--iters", type=_positive_int, default=None, help="optimiser iterations (each demo has its default)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    demo.add_argument(
        "--from-scratch", action="store_true", help="sfm: start from a random cloud (no knowledge of the shape)"
    )
    demo.add_argument(
        "--variants",
        type=_variants,
        default=None,
        help="objpose: comma-separated training variants (heatmap, bpnp, bpnp-add, coord; default heatmap,bpnp-add)",
    )
    _add_pose_commands(sub)
    cal = sub.add_parser("calibrate", help="calibrate a camera from chessboard photographs")
    cal.add_argument("images", nargs="*", help="photographs; none: render a synthetic set (demo)")
    cal.add_argument("--board", type=_board, default=(9, 6), help="inner corners COLSxROWS (default 9x6)")
    cal.add_argument("--square", type=_positive_float, default=1.0, help="square size (object units, default 1)")
    cal.add_argument("--distortion", action="store_true", help="also learn k1, k2, p1, p2, k3")
    cal.add_argument("--json", default=None, help="write the result here too")
    cal.add_argument("--out", default=None, help="output folder (default runs/calibrate)")
    cal.add_argument("--iters", type=_positive_int, default=30, help="Levenberg-Marquardt steps at most (default 30)")
    cal.add_argument("--seed", type=int, default=0, help="synthetic set: random poses (default 0)")
    cal.add_argument("--quiet", action="store_true", help="no progress bar or table")
    bs = sub.add_parser("board-split", help="chessboard photographs as a BOP test split (poses from their corners)")
    bs.add_argument("images", nargs="+", help="photographs of the board")
    bs.add_argument("--out", required=True, help="data-set folder (models/, keypoints.json, <split>/)")
    bs.add_argument("--board", type=_board, default=(9, 6), help="inner corners COLSxROWS (default 9x6)")
    bs.add_argument("--square", type=_positive_float, default=25.0, help="square side in mm (default 25)")
    bs.add_argument("--margin", type=_nonnegative_float, default=0.5, help="white border in squares (default 0.5)")
    bs.add_argument("--camera", default=None, help="camera JSON (fx, fy, cx, cy [, k1..k3]); default: calibrate")
    bs.add_argument("--split", default="test", help="split folder name (default test)")
    bs.add_argument(
        "--distortion",
        action="store_true",
        help="without --camera: calibrate k1, k2, p1, p2, k3 too (wide-angle lenses)",
    )
    bs.add_argument("--quiet", action="store_true", help="no summary line")
    be = sub.add_parser(
        "board-experiment", help="sim-to-real: train on renders of a board, evaluate on its photographs"
    )
    be.add_argument("--photos", nargs="+", required=True, help="photographs of the board (the test set)")
    be.add_argument("--out", default="runs/board", help="experiment folder (default runs/board)")
    be.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default 0)")
    be.add_argument("--variants", type=_variants, default=("heatmap", "bpnp-add"), help="default heatmap,bpnp-add")
    be.add_argument("--steps", type=_positive_int, default=3200, help="training steps per run (default 3200)")
    be.add_argument("--board", type=_board, default=(9, 6), help="inner corners COLSxROWS (default 9x6)")
    be.add_argument("--square", type=_positive_float, default=25.0, help="square side in mm (default 25)")
    be.add_argument("--camera", default=None, help="camera JSON of the photographs; default: calibrate from them")
    be.add_argument(
        "--distortion",
        action="store_true",
        help="without --camera: calibrate the lens too; the renders then look through it (wide-angle lenses)",
    )
    be.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


#: The import names of the optional dependencies (the extras of pyproject.toml) and their packages.
OPTIONAL_PACKAGES = {
    "matplotlib": "matplotlib",
    "cv2": "opencv-python-headless",
    "tqdm": "tqdm",
    "moderngl": "moderngl",
    "glcontext": "moderngl",
    "trimesh": "trimesh",
    "scipy": "scipy",
    "PIL": "pillow",
}
POSE_COMMANDS = ("render", "train", "evaluate", "predict", "score", "experiment")


def main(argv: list[str] | None = None) -> int:
    """Run the command; a user's mistake ends in one line on stderr and a non-zero status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ModuleNotFoundError as exc:  # an optional dependency of this command is not installed
        package = (exc.name or "").split(".")[0]
        if package not in OPTIONAL_PACKAGES:
            raise
        extra = "pose" if args.command in POSE_COMMANDS else "demo"
        print(
            f"bpnp {args.command}: error: needs {OPTIONAL_PACKAGES[package]}, not installed here: "
            f"pip install 'bpnp[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except (UsageError, ConfigError) as exc:
        print(f"bpnp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # bad data found during the work (e.g. too few boards)
        print(f"bpnp {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        from .errors import BackendUnavailableError
        from .pose.render import RenderUnavailableError

        if isinstance(exc, (RenderUnavailableError, BackendUnavailableError)):  # this machine lacks something
            print(f"bpnp {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


def _run(args: argparse.Namespace) -> int:
    if args.command in POSE_COMMANDS:
        return _run_pose(args)
    commands = {
        "demo": _run_demo,
        "board-split": _run_board_split,
        "board-experiment": _run_board_experiment,
        "calibrate": _run_calibrate,
    }
    return commands[args.command](args)


def _run_demo(args: argparse.Namespace) -> int:
    """``bpnp demo``."""
    args.out = _writable_dir(args.out, str(Path("runs") / args.name))
    kw = {"seed": args.seed, "quiet": args.quiet}
    if args.from_scratch:
        if args.name != "sfm":
            raise UsageError("--from-scratch applies to the sfm demo")
        kw["from_scratch"] = True
    if args.iters is not None and args.name not in ("layer", "all"):
        kw["iters"] = args.iters
    if args.variants is not None:
        if args.name != "objpose":
            raise UsageError("--variants applies to the objpose demo")
        kw["variants"] = args.variants
    out = args.out or str(Path("runs") / args.name)
    if args.name == "layer":
        from .paper import layer_demo

        layer_demo.run(out, seed=args.seed, device=args.device, quiet=args.quiet)
    elif args.name == "calibrate":
        from .paper import synthetic_boards

        synthetic_boards.run_synthetic(out, **kw)
    elif args.name == "all":
        from .paper import demo_all

        demo_all.run(out, seed=args.seed, device=args.device, quiet=args.quiet)
    else:
        from importlib import import_module

        module = {
            "pose": "paper.learn_pose",
            "sfm": "paper.learn_structure",
            "calib": "paper.learn_intrinsics",
            "objpose": "pose.study",
        }[args.name]
        import_module(f"bpnp.{module}").run(out, device=args.device, **kw)
    return 0


def _run_board_split(args: argparse.Namespace) -> int:
    """``bpnp board-split``."""
    from .pose.board_split import board_split

    _existing_files(args.images, None)
    if args.camera and not Path(args.camera).is_file():
        raise UsageError(f"--camera: {args.camera}: no such file")
    _writable_dir(args.out, args.out)
    board_split(
        args.images,
        args.out,
        args.board,
        args.square,
        args.margin,
        args.camera,
        args.split,
        args.quiet,
        args.distortion,
    )
    return 0


def _run_board_experiment(args: argparse.Namespace) -> int:
    """``bpnp board-experiment``."""
    from .pose.board_study import run as board_experiment

    _existing_files(args.photos, "--photos")
    _writable_dir(args.out, args.out)
    board_experiment(
        args.photos,
        args.out,
        args.seeds,
        args.variants,
        args.steps,
        args.board,
        args.square,
        args.camera,
        args.quiet,
        distortion=args.distortion,
    )
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    """``bpnp calibrate``."""
    from . import calibration as calibrate
    from .paper import synthetic_boards

    args.out = _writable_dir(args.out, str(Path("runs") / "calibrate"))
    if args.json:
        _writable_dir(str(Path(args.json).parent), ".")
    if args.images:
        _existing_files(args.images, None)
        try:
            images = calibrate.load_images(args.images)
        except ValueError as exc:
            raise UsageError(str(exc).replace("images: ", "")) from None
        result = calibrate.calibrate(
            images,
            [Path(p).name for p in args.images],
            board=args.board,
            square=args.square,
            distortion=args.distortion,
            out=args.out,
            iters=args.iters,
            quiet=args.quiet,
        )
    else:
        result = synthetic_boards.run_synthetic(
            args.out, seed=args.seed, iters=args.iters, distortion=args.distortion, quiet=args.quiet
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
