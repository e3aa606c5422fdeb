"""Random PnP problems with known ground truth, for tests, benchmarks and examples."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .geometry import project, rotmat_to_rvec, rvec_to_rotmat

__all__ = [
    "PnPProblems",
    "random_problems",
    "random_rotations",
    "outlier_problems",
    "few_point_problems",
    "competing_problems",
    "stress_problems",
    "STRESS_KINDS",
]


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


def outlier_problems(
    B: int,
    n: int = 50,
    outlier_ratio: float = 0.3,
    planar_fraction: float = 0.3,
    noise: float = 1.0,
    focal: tuple[float, float] = (500.0, 1500.0),
    image_size: tuple[int, int] = (640, 480),
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[PnPProblems, Tensor]:
    """Unweighted problems of :func:`random_problems` whose outliers are image points replaced by
    uniform random points of the image (the setting of bpnp's robust benchmark).

    Args:
        B: problems; n: points each; outlier_ratio: fraction of each problem's points replaced
            (``round(outlier_ratio * n)``, chosen at random); planar_fraction: fraction of the
            problems whose object points lie on a plane; noise: pixel noise std of the inliers;
        focal: focal length range in pixels; image_size: ``(width, height)`` of the image the
            outliers are drawn in; seed: random seed (CPU generator).
    Returns:
        The :class:`PnPProblems` and the ``(B, n)`` bool mask of true inliers.
    """
    if not 0.0 <= outlier_ratio <= 1.0:
        raise ValueError(f"outlier_ratio: expected a fraction in [0, 1], got {outlier_ratio!r}")
    n_planar = round(planar_fraction * B)
    parts = [
        random_problems(b, n, planar=planar, noise=noise, focal=focal, weighted=False, seed=seed + k)
        for k, (b, planar) in enumerate(((n_planar, True), (B - n_planar, False)))
        if b > 0
    ]
    x2d, x3d, K, weights, pose = (torch.cat(xs, 0) for xs in zip(*parts))
    g = torch.Generator().manual_seed(seed + 1000)
    k = round(outlier_ratio * n)
    order = torch.rand(B, n, generator=g).argsort(-1)
    outlier = torch.zeros(B, n, dtype=torch.bool).scatter_(-1, order[:, :k], True)
    size = torch.tensor(image_size, dtype=torch.float64)
    random_pixels = torch.rand(B, n, 2, generator=g, dtype=torch.float64) * size
    x2d = torch.where(outlier[..., None], random_pixels, x2d)
    out = PnPProblems(x2d, x3d, K, weights, pose)
    return PnPProblems(*(x.to(dtype=dtype, device=device) for x in out)), (~outlier).to(device)


def few_point_problems(
    B: int, n: tuple[int, int] = (6, 10), outliers: tuple[int, int] = (1, 3), seed: int = 0
) -> tuple[PnPProblems, Tensor]:
    """Problems with few points and gross outliers (matches of a small or distant object):
    ``n`` points (a range, drawn per problem; the batch is padded to the largest with points of
    weight 0), ``outliers`` of them (at most ``n - 5``, so at least 5 true inliers) moved to a
    random point of the 640x480 image at least 30 px from their projection; 1 px noise.

    Returns:
        :class:`PnPProblems` (``weights``: 1 for a point, 0 for padding) and the ``(B, N)`` true
        inliers.
    """
    g = torch.Generator().manual_seed(20_000 + seed)
    f64 = torch.float64
    N = n[1]
    p = random_problems(B, N, noise=1.0, focal=(500.0, 1500.0), weighted=False, seed=seed)
    count = torch.randint(n[0], n[1] + 1, (B,), generator=g)
    real = torch.arange(N)[None] < count[:, None]
    most = (count - 5).clamp(min=0).clamp(max=outliers[1])
    k = torch.minimum(torch.randint(outliers[0], outliers[1] + 1, (B,), generator=g), most)
    rank = torch.where(real, torch.rand(B, N, generator=g, dtype=f64), torch.full((B, N), 2.0, dtype=f64))
    bad = rank.argsort(-1).argsort(-1) < k[:, None]
    clean = project(p.x3d, p.pose, p.K)
    moved = torch.rand(B, N, 2, generator=g, dtype=f64) * torch.tensor([640.0, 480.0], dtype=f64)
    for _ in range(50):  # redraw the ones that landed within 30 px of their projection
        near = ((moved - clean).norm(dim=-1) < 30.0) & bad
        if not bool(near.any()):
            break
        fresh = torch.rand(B, N, 2, generator=g, dtype=f64) * torch.tensor([640.0, 480.0], dtype=f64)
        moved = torch.where(near[..., None], fresh, moved)
    x2d = torch.where(bad[..., None], moved, p.x2d)
    return p._replace(x2d=x2d, weights=real.to(f64)), real & ~bad


def competing_problems(B: int, n: int = 60, wrong: float = 0.45, seed: int = 0) -> tuple[PnPProblems, Tensor]:
    """Problems where a share ``wrong`` of the matches comes from a second copy of the object at
    another pose (turned 20-60 deg about a random axis, moved 1.5-3 object sizes sideways): a
    competing structure with fewer points than the true one; 1 px noise.

    Returns:
        :class:`PnPProblems` (``pose``: the true pose) and the ``(B, n)`` points of the true pose.
    """
    g = torch.Generator().manual_seed(30_000 + seed)
    f64 = torch.float64
    p = random_problems(B, n, noise=0.0, focal=(500.0, 1500.0), weighted=False, seed=seed)
    axis = torch.randn(B, 3, generator=g, dtype=f64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    angle = torch.deg2rad(20.0 + 40.0 * torch.rand(B, 1, generator=g, dtype=f64))
    R2 = rvec_to_rotmat(axis * angle) @ rvec_to_rotmat(p.pose[:, :3])
    side = torch.randn(B, 2, generator=g, dtype=f64)
    side = side / side.norm(dim=-1, keepdim=True) * (1.5 + 1.5 * torch.rand(B, 1, generator=g, dtype=f64))
    shift = torch.cat([side, 2.0 * torch.rand(B, 1, generator=g, dtype=f64) - 1.0], -1)
    pose2 = torch.cat([rotmat_to_rvec(R2), p.pose[:, 3:] + shift], -1)
    k = round(wrong * n)
    other = torch.rand(B, n, generator=g, dtype=f64).argsort(-1).argsort(-1) < k
    x2d = torch.where(other[..., None], project(p.x3d, pose2, p.K), project(p.x3d, p.pose, p.K))
    x2d = x2d + torch.randn(B, n, 2, generator=g, dtype=f64)
    return p._replace(x2d=x2d), ~other


STRESS_KINDS = (
    "noisy",
    "outliers10",
    "outliers30",
    "outliers50",
    "thin",
    "needle",
    "near_planar",
    "distant",
    "wide",
    "n4",
)


def stress_problems(kind: str, B: int, n: int = 20, seed: int = 0) -> PnPProblems:
    """Hard PnP problems of one kind (for the global-optimum tests and benchmarks).

    Kinds: ``noisy`` (pixel noise 5-20 px), ``outliers10|30|50`` (that share of the pixels
    replaced by uniform random points of a 640x480 image, 1 px noise on the rest, 30% planar
    objects), ``thin`` (the box squashed to 1-20% of its width), ``near_planar`` (a plane with
    1e-3..1e-2 relief), ``needle`` (the box squashed to 1-10% in one direction and to 10-100% of
    that in another, turned at random: a rod, a pole, a row of features), ``distant`` (50-500 object sizes away), ``wide`` (focal 80-250 px, the
    object off-centre: a wide-angle view), ``n4`` (four points, planar or not, 0-3 px noise).

    Args:
        kind: one of :data:`STRESS_KINDS`; B: problems; n: points (``n4`` forces 4); seed: seed.
    Returns:
        :class:`PnPProblems`, float64 on the CPU (``pose``: the generating pose).
    """
    if kind not in STRESS_KINDS:
        raise ValueError(f"kind: expected one of {STRESS_KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(10_000 + seed)
    f64 = torch.float64

    def uniform(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=f64)

    if kind == "n4":
        p = random_problems(B, 4, planar=False, seed=seed)
        planar = uniform(B) < 0.5
        x3d = p.x3d.clone()
        x3d[planar, :, 2] = 0.0
        x2d = project(x3d, p.pose, p.K) + uniform(B, 1, 1, hi=3.0) * torch.randn(B, 4, 2, generator=g, dtype=f64)
        return p._replace(x3d=x3d, x2d=x2d)
    if kind == "noisy":
        return random_problems(B, n, planar=bool(seed % 2), noise=(5.0, 20.0), seed=seed)
    if kind.startswith("outliers"):
        share = int(kind[len("outliers") :]) / 100.0
        p = random_problems(B, n, noise=1.0, focal=(500.0, 1500.0), weighted=False, seed=seed)
        planar = uniform(B) < 0.3
        x3d = p.x3d.clone()
        x3d[planar, :, 2] = 0.0
        x2d = project(x3d, p.pose, p.K) + torch.randn(B, n, 2, generator=g, dtype=f64)
        bad = torch.rand(B, n, generator=g, dtype=f64).argsort(-1) < round(share * n)
        random_px = torch.stack([uniform(B, n, hi=640.0), uniform(B, n, hi=480.0)], -1)
        return p._replace(x3d=x3d, x2d=torch.where(bad[..., None], random_px, x2d))
    p = random_problems(B, n, seed=seed)
    x3d, pose, K = p.x3d.clone(), p.pose.clone(), p.K.clone()
    if kind == "thin":
        x3d[..., 2] *= uniform(B, 1, lo=0.01, hi=0.2)
    elif kind == "needle":
        across = uniform(B, 1, lo=0.01, hi=0.1)
        x3d = (
            x3d * torch.cat([torch.ones(B, 1, dtype=f64), across, across * uniform(B, 1, lo=0.1, hi=1.0)], -1)[:, None]
        )
        x3d = x3d @ rvec_to_rotmat(random_rotations(B, g)).transpose(-1, -2)
    elif kind == "near_planar":
        x3d[..., 2] = uniform(B, 1, lo=1e-3, hi=1e-2) * torch.randn(B, n, generator=g, dtype=f64)
    elif kind == "distant":
        pose[:, 3:] *= (uniform(B, lo=50.0, hi=500.0) / pose[:, 5])[:, None]
        K[:, :2, :2] *= (pose[:, 5] / 8.0)[:, None, None].clamp(max=60.0)  # a long lens
    elif kind == "wide":
        f = uniform(B, lo=80.0, hi=250.0)
        K[:, 0, 0], K[:, 1, 1] = f, f
        depth = uniform(B, lo=2.0, hi=5.0)
        pose[:, 3] = uniform(B, lo=-1.0, hi=1.0) * depth
        pose[:, 4] = uniform(B, lo=-0.7, hi=0.7) * depth
        pose[:, 5] = depth
    x2d = project(x3d, pose, K) + uniform(B, 1, 1, hi=3.0) * torch.randn(B, n, 2, generator=g, dtype=f64)
    return PnPProblems(x2d, x3d, K, p.weights, pose)
