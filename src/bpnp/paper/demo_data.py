"""The demo data shipped with the package (MIT, from the paper authors' demo data)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np
import torch


@lru_cache(maxsize=1)
def _arrays() -> dict[str, np.ndarray]:
    with resources.files("bpnp").joinpath("data/bpnp_demo.npz").open("rb") as f:
        data = np.load(f)
        return {k: data[k] for k in data.files}


def cube(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(8, 3)`` corners of the cube ``[-1, 1]^3``."""
    return torch.from_numpy(_arrays()["cube"]).to(dtype)


def poses(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(50, 6)`` camera poses ``[rvec, t]`` of the paper's demos."""
    return torch.from_numpy(_arrays()["poses"]).to(dtype)


def duck(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(1002, 3)`` points on the LINEMOD duck (mm-scale units)."""
    return torch.from_numpy(_arrays()["duck"].astype(np.float64)).to(dtype)


def camera_matrix(fx: float, fy: float, cx: float, cy: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(3, 3)`` pinhole camera matrix."""
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype)
