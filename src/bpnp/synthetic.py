"""Random PnP problems with known ground truth, for tests, benchmarks and examples."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .geometry import project

__all__ = ["PnPProblems", "random_problems", "random_rotations"]


class PnPProblems(NamedTuple):
    """A batch of PnP problems: inputs and the pose that generated them."""

    x2d: Tensor  # (B, n, 2) noisy pixels
    x3d: Tensor  # (B, n, 3) object points
    K: Tensor  # (B, 3, 3)
    weights: Tensor  # (B, n)
    pose: Tensor  # (B, 6) true pose


def random_rotations(B: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Uniformly distributed rotation vectors ``(B, 3)`` (from random unit quaternions)."""
    q = torch.randn(B, 4, generator=generator, dtype=dtype)
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[:, :1] < 0, -q, q)
    v = q[:, 1:]
    n = v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 2.0 * torch.atan2(n, q[:, :1]) * v / n


def random_problems(
    B: int,
    n: int,
    planar: bool = False,
    noise: float | tuple[float, float] = (0.0, 3.0),
    focal: tuple[float, float] = (300.0, 1500.0),
    weighted: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> PnPProblems:
    """Random, well-posed PnP problems whose points project inside the image.

    Object points fill a unit box (or the plane z = 0 of it) in front of a camera with random
    focal length and principal point, 3 to 12 object sizes away, under a uniform random
    rotation; pixel noise is Gaussian with a standard deviation drawn per problem.

    Args:
        B: problems; n: points per problem; planar: points on a plane.
        noise: pixel noise std, or a (low, high) range drawn per problem.
        focal: range of focal lengths in pixels.
        weighted: random weights in [0.2, 2] (else ones).
        seed: random seed (CPU generator, so the problems do not depend on the device).
    Returns:
        :class:`PnPProblems` of the given dtype and device.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def uniform(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=f64)

    x3d = uniform(B, n, 3, lo=-1.0, hi=1.0)
    if planar:
        x3d[..., 2] = 0.0
    f = uniform(B, lo=focal[0], hi=focal[1])
    aspect = uniform(B, lo=0.9, hi=1.1)
    cx = uniform(B, lo=200.0, hi=400.0)
    cy = uniform(B, lo=150.0, hi=300.0)
    K = torch.zeros(B, 3, 3, dtype=f64)
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = f, f * aspect, cx, cy, 1.0
    rvec = random_rotations(B, g)
    depth = uniform(B, lo=3.0, hi=12.0)
    # Keep the object inside the field of view: lateral offset up to a third of the half-width.
    half_width = cx / f * depth
    t = torch.stack([uniform(B, lo=-1, hi=1) * half_width / 3, uniform(B, lo=-1, hi=1) * half_width / 3, depth], -1)
    pose = torch.cat([rvec, t], -1)
    clean = project(x3d, pose, K)
    if isinstance(noise, tuple):
        sigma = uniform(B, lo=noise[0], hi=noise[1])
    else:
        sigma = torch.full((B,), float(noise), dtype=f64)
    x2d = clean + sigma[:, None, None] * torch.randn(B, n, 2, generator=g, dtype=f64)
    weights = uniform(B, n, lo=0.2, hi=2.0) if weighted else torch.ones(B, n, dtype=f64)
    out = PnPProblems(x2d, x3d, K, weights, pose)
    return PnPProblems(*(x.to(dtype=dtype, device=device) for x in out))
