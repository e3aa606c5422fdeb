"""The ``bpnp`` command: demos and the calibration tool, thin over :mod:`bpnp.apps`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _board(text: str) -> tuple[int, int]:
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--board: expected COLSxROWS such as 9x6, got {text!r}") from None
    return cols, rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpnp", description="bpnp: the PnP solver as a differentiable layer")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a demo experiment (writes metrics.json, plots, report.md)")
    demo.add_argument("name", choices=["pose", "sfm", "calib", "calibrate", "layer", "all"])
    demo.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--iters", type=int, default=None, help="optimiser iterations (each demo has its default)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    cal = sub.add_parser("calibrate", help="calibrate a camera from chessboard photographs")
    cal.add_argument("images", nargs="*", help="photographs; none: render a synthetic set (demo)")
    cal.add_argument("--board", type=_board, default=(9, 6), help="inner corners COLSxROWS (default 9x6)")
    cal.add_argument("--square", type=float, default=1.0, help="square size (object units)")
    cal.add_argument("--distortion", action="store_true", help="also learn k1, k2, p1, p2, k3")
    cal.add_argument("--json", default=None, help="write the result here too")
    cal.add_argument("--out", default=None, help="output folder (default runs/calibrate)")
    cal.add_argument("--iters", type=int, default=30, help="L-BFGS steps")
    cal.add_argument("--seed", type=int, default=0, help="synthetic set: random poses")
    cal.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        kw = {"seed": args.seed, "quiet": args.quiet}
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

        if args.images:
            images = calibrate.load_images(args.images)
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
