"""The ``bpnp`` command: demos and the calibration tool, thin over :mod:`bpnp.apps`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


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


def _writable_dir(path: str | None, default: str) -> str:
    """Create the output folder now and check that a file can be written there, before the work."""
    target = Path(path or default)
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / ".bpnp-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out: cannot write to {target}: {exc.strerror or exc}") from None
    return str(target)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpnp", description="bpnp: the PnP solver as a differentiable layer")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a demo experiment (writes metrics.json, plots, report.md)")
    demo.add_argument("name", choices=["pose", "sfm", "calib", "calibrate", "layer", "all"])
    demo.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    demo.add_argument("--device", type=_device, default="cpu", help="torch device, e.g. cpu or cuda")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--iters", type=_positive_int, default=None, help="optimiser iterations (each demo has its default)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    demo.add_argument(
        "--from-scratch", action="store_true", help="sfm: start from a random cloud (no knowledge of the shape)"
    )
    cal = sub.add_parser("calibrate", help="calibrate a camera from chessboard photographs")
    cal.add_argument("images", nargs="*", help="photographs; none: render a synthetic set (demo)")
    cal.add_argument("--board", type=_board, default=(9, 6), help="inner corners COLSxROWS (default 9x6)")
    cal.add_argument("--square", type=_positive_float, default=1.0, help="square size (object units)")
    cal.add_argument("--distortion", action="store_true", help="also learn k1, k2, p1, p2, k3")
    cal.add_argument("--json", default=None, help="write the result here too")
    cal.add_argument("--out", default=None, help="output folder (default runs/calibrate)")
    cal.add_argument("--iters", type=_positive_int, default=30, help="L-BFGS steps")
    cal.add_argument("--seed", type=int, default=0, help="synthetic set: random poses")
    cal.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; a user's mistake ends in one line on stderr and a non-zero status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UsageError as exc:
        print(f"bpnp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # bad data found during the work (e.g. too few boards)
        print(f"bpnp {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        args.out = _writable_dir(args.out, str(Path("runs") / args.name))
        kw = {"seed": args.seed, "quiet": args.quiet}
        if args.from_scratch:
            if args.name != "sfm":
                raise UsageError("--from-scratch applies to the sfm demo")
            kw["from_scratch"] = True
        if args.iters is not None and args.name not in ("layer", "all"):
            kw["iters"] = args.iters
        out = args.out or str(Path("runs") / args.name)
        if args.name == "layer":
            from .apps import layer_demo

            layer_demo.run(out, seed=args.seed, device=args.device, quiet=args.quiet)
        elif args.name == "calibrate":
            from .apps import chessboard

            chessboard.run_synthetic(out, **kw)
        elif args.name == "all":
            from .apps import all_demos

            all_demos.run(out, seed=args.seed, device=args.device, quiet=args.quiet)
        else:
            from importlib import import_module

            import_module(f"bpnp.apps.{args.name}").run(out, device=args.device, **kw)
        return 0
    if args.command == "calibrate":
        from .apps import calibrate, chessboard

        args.out = _writable_dir(args.out, str(Path("runs") / "calibrate"))
        if args.json:
            _writable_dir(str(Path(args.json).parent), ".")
        if args.images:
            for image in args.images:
                if not Path(image).is_file():
                    raise UsageError(f"{image}: no such file")
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
            result = chessboard.run_synthetic(
                args.out, seed=args.seed, iters=args.iters, distortion=args.distortion, quiet=args.quiet
            )
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
