"""The ``bpnp`` command: demos and tools, thin over :mod:`bpnp.apps`."""
from __future__ import annotations

import argparse
import sys


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpnp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a demo experiment")
    demo.add_argument("name", choices=["layer"], help="which demo")
    _add_common(demo)
    demo.add_argument("--batch", type=int, default=256, help="layer demo: problems in the batch")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo" and args.name == "layer":
        from .apps import layer_demo

        layer_demo.run(args.out, batch=args.batch, seed=args.seed, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
