"""Shared helpers of the experiments: output folders, JSON, markdown tables, timers, L-BFGS."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch


def output_dir(out: str | os.PathLike | None, name: str) -> Path:
    """``out`` or ``runs/<name>``, created."""
    path = Path(out) if out is not None else Path("runs") / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if (abs(v) < 1e-3 or abs(v) >= 1e4) and v != 0 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def finish_experiment(path: Path, report: str, metrics: dict[str, Any], table: str, quiet: bool) -> dict[str, Any]:
    """Write ``report.md`` and ``metrics.json`` into ``path``, print the table unless quiet."""
    (Path(path) / "report.md").write_text(report)
    write_json(Path(path) / "metrics.json", metrics)
    if not quiet:
        print(table)
    return metrics


def lbfgs(param: torch.nn.Parameter, history: int, tolerance_grad: float, tolerance_change: float):
    """The experiments' optimiser: full L-BFGS steps (lr 1) with a strong-Wolfe line search,
    up to 20 evaluations per step; returns ``(optimizer, factory)`` (the factory makes a fresh
    one, for a restart)."""

    def make():
        return torch.optim.LBFGS(
            [param],
            lr=1.0,
            max_iter=20,
            history_size=history,
            line_search_fn="strong_wolfe",
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
        )

    return make(), make
