"""Pose covariance: Monte-Carlo coverage of the 95% ellipsoid, units, shapes."""

import pickle

import pytest
import torch

import bpnp
from bpnp.synthetic import random_problems

F64 = torch.float64


@pytest.mark.parametrize("planar", [False, True], ids=["3d", "planar"])
@pytest.mark.parametrize("seed", [10, 11])
def test_95_percent_ellipsoid_holds_93_to_97_percent(seed, planar, backend):
    # 2,000 noisy re-solves of one problem (n = 50, weighted, 1.5 px noise over sqrt(weight)): the
    # Mahalanobis distance of each answer from the truth, under the covariance it reports itself.
    p = random_problems(1, 50, planar=planar, noise=0.0, seed=seed, weighted=True)
    N = 2000
    w = p.weights.expand(N, 50)
    g = torch.Generator().manual_seed(seed)
    x2d = p.x2d.expand(N, 50, 2) + 1.5 * torch.randn(N, 50, 2, generator=g, dtype=F64) / w.sqrt()[..., None]
    res = bpnp.solve_pnp(x2d, p.x3d[0], p.K[0], w, backend=backend)
    d = res.pose - p.pose
    mahalanobis = (d[:, None, :] @ torch.linalg.solve(res.covariance, d[..., None]))[:, 0, 0]
    coverage = float((mahalanobis <= 12.592).double().mean())  # chi-square(6) 95% quantile
    assert 0.93 <= coverage <= 0.97, coverage


def test_covariance_follows_units_and_dtype():
    p = random_problems(3, 12, seed=1)
    ref = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights)
    assert ref.covariance.shape == (3, 6, 6)
    assert torch.allclose(ref.covariance, ref.covariance.transpose(-1, -2))
    assert (torch.linalg.eigvalsh(ref.covariance) > 0).all()
    mm = bpnp.solve_pnp(p.x2d, p.x3d * 1e3, p.K, p.weights)  # millimetres: t-block x 1e6
    assert torch.allclose(mm.covariance[:, :3, :3], ref.covariance[:, :3, :3], rtol=1e-6)
    assert torch.allclose(mm.covariance[:, 3:, 3:], ref.covariance[:, 3:, 3:] * 1e6, rtol=1e-6)
    one = bpnp.solve_pnp(p.x2d[0].float(), p.x3d[0].float(), p.K[0].float())
    assert one.covariance.shape == (6, 6) and one.covariance.dtype == torch.float32


@pytest.mark.parametrize(
    "loss,scale,gross",
    [("huber", 1.0, False), ("huber", 0.5, True), ("cauchy", 2.0, False), ("cauchy", 1.0, True)],
)
def test_robust_costs_report_a_calibrated_covariance(loss, scale, gross, backend):
    # 1,000 re-solves of one problem (n = 50, unit noise; gross: 10% of the points at five times
    # it). Before the pooled sandwich the ellipsoid held 97-99% (huber, cauchy at 1 px).
    p = random_problems(1, 50, noise=0.0, seed=4, weighted=False)
    N = 1000
    g = torch.Generator().manual_seed(7)
    z = torch.randn(N, 50, 2, generator=g, dtype=F64)
    if gross:
        z = torch.where((torch.rand(N, 50, 1, generator=g, dtype=F64) < 0.1), 5.0 * z, z)
    res = bpnp.solve_pnp(p.x2d.expand(N, 50, 2) + z, p.x3d[0], p.K[0], backend=backend, loss=loss, loss_scale=scale)
    d = res.pose - p.pose
    mahalanobis = (d[:, None, :] @ torch.linalg.solve(res.covariance, d[..., None]))[:, 0, 0]
    coverage = float((mahalanobis <= 12.592).double().mean())
    assert 0.925 <= coverage <= 0.97, coverage


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("loss", ["l2", "huber"])
def test_a_result_pickles_with_its_covariance_still_to_compute(backend, loss):
    # The covariance is computed on first access: it must travel with the result (e.g. from a
    # DataLoader worker) and give there what it gives here.
    if backend == "native" and not bpnp.solvers.native.native_available():
        pytest.skip("native solver not built")
    p = random_problems(3, 20, seed=21)
    for item in (slice(None), 0):  # batched, unbatched
        x2d = p.x2d[item].clone().requires_grad_()
        result = bpnp.solve_pnp(x2d, p.x3d[item], p.K[item], backend=backend, loss=loss, warn=False)
        copy = pickle.loads(pickle.dumps(result))
        assert copy.covariance.shape == result.pose.shape[:-1] + (6, 6)
        assert torch.equal(copy.covariance, result.covariance)
        for name in ("pose", "t", "cost", "converged", "ambiguous", "trusted"):
            assert torch.equal(getattr(copy, name), getattr(result, name)), name
