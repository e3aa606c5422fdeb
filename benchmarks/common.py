"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# Idle time before each timed call: PyTorch's OpenMP workers spin for milliseconds after a
# parallel region, and on machines whose cores are hyperthreads of one another a spinning
# worker slows whatever runs next (an OpenCV loop as much as our solver). Measured calls
# start from a quiet machine.
QUIET_S = 0.02


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1, sync: bool = False) -> float:
    """Median wall time of ``fn`` in seconds (each call after ``QUIET_S`` of idle time)."""
    return paired({"fn": fn}, repeat, warmup, sync)["fn"]


def paired(
    fns: dict[str, Callable[[], object]], repeat: int = 5, warmup: int = 1, sync: bool = False
) -> dict[str, float]:
    """Median wall time (s) of each function, measured in interleaved rounds (one call of each per
    round), so that slow phases of a shared machine hit all of them alike; ratios of the
    returned medians are then meaningful within one run."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            if sync:
                torch.cuda.synchronize()
            time.sleep(QUIET_S)
            t0 = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def write_json(name: str, data: dict) -> Path:
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out
