"""RANSAC where real matches take it: few points, competing structures, batch and order
independence, distortion per item and per point, the threshold in the image's pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bpnp
from bpnp.solvers.native import native_available
from bpnp.synthetic import competing_problems, few_point_problems, outlier_problems

f64 = torch.float64
BACKENDS = ["torch"] + (["native"] if native_available() else [])


def rotation_error_deg(pose: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    R1, R2 = bpnp.rvec_to_rotmat(pose[..., :3]), bpnp.rvec_to_rotmat(true[..., :3])
    c = ((R1.transpose(-1, -2) @ R2).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.arccos(c.clamp(-1, 1)))


def msac(pose: torch.Tensor, p, threshold: float = 4.0) -> torch.Tensor:
    e = (bpnp.project(p.x3d, pose, p.K) - p.x2d).pow(2).sum(-1)
    return (p.weights * e.clamp(max=threshold**2)).sum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_five_true_inliers_among_seven_are_found_without_padding(backend):
    # r17: the inlier set was padded to 6 points, forcing an outlier in (27 deg off).
    g = np.random.default_rng(0)
    K = torch.tensor([[800.0, 0, 320], [0, 800, 240], [0, 0, 1]], dtype=f64)
    X = torch.tensor(g.uniform(-1, 1, (7, 3)))
    pose = torch.tensor([0.3, -0.5, 0.2, 0.1, -0.2, 6.0], dtype=f64)
    x = bpnp.project(X, pose, K) + torch.tensor(g.normal(0, 0.5, (7, 2)))
    x[[1, 4]] = torch.tensor([[50.0, 400.0], [600.0, 60.0]], dtype=f64)
    res = bpnp.solve_pnp(x, X, K, ransac=True, backend=backend, warn=False)
    assert res.inliers.tolist() == [True, False, True, True, False, True, True]
    assert bool(res.converged) and float(rotation_error_deg(res.pose, pose)) < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_few_point_problems_reach_the_true_inlier_bound(backend):
    p, truth = few_point_problems(150, seed=1)
    res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, ransac=True, backend=backend, warn=False)
    bound = bpnp.solve_pnp(p.x2d, p.x3d, p.K, truth.to(f64), backend=backend, warn=False)

    def ok(pose):
        trans = (pose[:, 3:] - p.pose[:, 3:]).norm(dim=-1) / p.pose[:, 3:].norm(dim=-1)
        return (rotation_error_deg(pose, p.pose) < 1.0) & (trans < 0.01)

    assert int(ok(res.pose).sum()) >= int(ok(bound.pose).sum()) - 3
    # never an inlier set padded with points beyond the threshold
    e = (bpnp.project(p.x3d, res.pose, p.K) - p.x2d).norm(dim=-1)
    assert bool((~res.inliers | (e < 4.0 + 1e-9)).all())
    assert bool((res.inliers <= (p.weights > 0)).all())


def test_fewer_than_four_inliers_is_not_converged():
    p, _ = outlier_problems(4, 8, 0.0, seed=3)
    x2d = p.x2d.clone()
    g = torch.Generator().manual_seed(0)
    x2d[:, 3:] = torch.rand(4, 5, 2, generator=g, dtype=f64) * torch.tensor([640.0, 480.0], dtype=f64)
    res = bpnp.solve_pnp(x2d, p.x3d, p.K, ransac=True, warn=False)
    small = res.inliers.sum(-1) < 4
    assert bool(small.any())
    assert not bool(res.converged[small].any())
    assert bool(torch.isfinite(res.pose).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_competing_structure_never_wins_over_a_better_score(backend):
    # r19: the structure with 45% of the matches was returned though the true one scores better.
    p, truth = competing_problems(120, seed=2)
    res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, ransac=True, backend=backend, warn=False)
    on_truth = bpnp.solve_pnp(p.x2d, p.x3d, p.K, truth.to(f64), backend=backend, warn=False)
    assert bool((msac(res.pose, p) <= msac(on_truth.pose, p) * (1 + 1e-9)).all())
    assert bool(((res.inliers & ~truth).sum(-1) <= 1).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_dist", [False, True])
def test_an_answer_does_not_depend_on_the_batch_or_its_order(backend, with_dist):
    a, _ = competing_problems(60, seed=5)
    b, _ = outlier_problems(60, 40, 0.4, seed=6)
    b = b._replace(x2d=b.x2d[:, :40], x3d=b.x3d)
    x2d = torch.cat([a.x2d[:, :40], b.x2d])
    x3d = torch.cat([a.x3d[:, :40], b.x3d])
    K = torch.cat([a.K, b.K])
    dist = torch.tensor([-0.1, 0.02, 0.001, -0.001, 0.0], dtype=f64) if with_dist else None
    if with_dist:  # the same scenes through a lens
        pose = torch.cat([a.pose, b.pose])
        x2d = x2d + bpnp.project(x3d, pose, K, dist) - bpnp.project(x3d, pose, K)
    kw = dict(ransac=True, backend=backend, warn=False, dist=dist)
    full = bpnp.solve_pnp(x2d, x3d, K, **kw)
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    shuffled = bpnp.solve_pnp(x2d[perm], x3d[perm], K[perm], **kw)
    inv = perm.argsort()
    assert torch.equal(shuffled.inliers[inv], full.inliers)
    torch.testing.assert_close(shuffled.pose[inv], full.pose, rtol=0, atol=1e-12)
    for i in (0, 17, 59, 60, 119):
        alone = bpnp.solve_pnp(x2d[i], x3d[i], K[i], **kw)
        assert torch.equal(alone.inliers, full.inliers[i]), i
        torch.testing.assert_close(alone.pose, full.pose[i], rtol=0, atol=1e-12)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs the native solver")
def test_both_backends_draw_the_same_samples_and_find_the_same_inliers():
    p, _ = outlier_problems(80, 40, 0.5, seed=8)
    torch_res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, ransac=True, backend="torch", warn=False)
    native_res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, ransac=True, backend="native", warn=False)
    assert torch.equal(torch_res.inliers, native_res.inliers)
    torch.testing.assert_close(torch_res.pose, native_res.pose, rtol=0, atol=1e-8)


def _through_a_lens(seed: int, rmax: float, K: torch.Tensor, dist: torch.Tensor, n: int = 30):
    """Points seen at normalised radii up to ``rmax`` (past the fold of a strong barrel lens
    when ``rmax`` is large), distorted, 0.5 px noise."""
    g = np.random.default_rng(seed)
    r = np.sqrt(g.uniform(0, rmax**2, n))
    th = g.uniform(0, 2 * np.pi, n)
    z = g.uniform(3, 6, n)
    Xc = torch.tensor(np.stack([r * np.cos(th) * z, r * np.sin(th) * z, z], 1))
    pose = torch.cat([torch.tensor(g.normal(0, 0.5, 3)), torch.tensor([0.1, -0.1, 4.5], dtype=f64)])
    R = bpnp.rvec_to_rotmat(pose[:3])
    X = (Xc - pose[3:]) @ R
    x = bpnp.project(X, pose, K, dist) + torch.tensor(g.normal(0, 0.5, (n, 2)))
    return X, x


@pytest.mark.parametrize("backend", BACKENDS)
def test_points_past_the_lens_fold_never_sink_other_items(backend):
    # r18: one item with points past the fold made the undistortion fall back for the whole batch.
    K = torch.tensor([[300.0, 0, 640], [0, 300, 480], [0, 0, 1]], dtype=f64)
    dist = torch.tensor([-0.4, 0, 0, 0, 0], dtype=f64)  # folds at r = 0.913
    items = [_through_a_lens(s, 0.8, K, dist) for s in range(6)] + [_through_a_lens(100, 1.1, K, dist)]
    X = torch.stack([i[0] for i in items])
    x = torch.stack([i[1] for i in items])
    kw = dict(dist=dist, ransac=True, backend=backend, warn=False)
    alone = bpnp.solve_pnp(x[:6], X[:6], K, **kw)
    mixed = bpnp.solve_pnp(x, X, K, **kw)
    assert alone.inliers.sum(-1).tolist() == [30] * 6
    assert torch.equal(mixed.inliers[:6], alone.inliers)
    torch.testing.assert_close(mixed.pose[:6], alone.pose, rtol=0, atol=1e-12)
    # the item with points past the fold keeps the points the image explains (all of them here)
    assert int(mixed.inliers[6].sum()) >= 25


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coefficients,shift", [([0.3, 0.1, 0, 0, 0], 5.0), ([-0.4, 0.2, 0, 0, 0], 3.0)])
def test_the_threshold_is_in_the_image_pixels(backend, coefficients, shift):
    # r23: the threshold was applied to the undistorted pixels.
    g = np.random.default_rng(1)
    n = 40
    dist = torch.tensor(coefficients, dtype=f64)
    K = torch.tensor([[400.0, 0, 640], [0, 400, 480], [0, 0, 1]], dtype=f64)
    X = torch.tensor(g.uniform(-1, 1, (n, 3)))
    pose = torch.tensor([0.2, -0.3, 0.1, 0.0, 0.0, 2.2], dtype=f64)
    x = bpnp.project(X, pose, K, dist) + torch.tensor(g.normal(0, 0.3, (n, 2)))
    radial = x - K[:2, 2]
    far = int(radial.norm(dim=-1).argmax())
    x[far] += shift * radial[far] / radial[far].norm()
    res = bpnp.solve_pnp(x, X, K, dist=dist, ransac=True, backend=backend, warn=False)
    e = (bpnp.project(X, res.pose, K, dist) - x).norm(dim=-1)
    assert torch.equal(res.inliers, e < 4.0)
