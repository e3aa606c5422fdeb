"""Robust costs (huber, cauchy) and batched RANSAC: exact derivatives, answers, determinism."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import bpnp
from bpnp.cost import cost_terms, robust_loss
from bpnp.geometry import rvec_to_rotmat
from bpnp.solvers.native import native_available
from bpnp.solvers.ransac import _round, p3p, solve_quartic
from bpnp.synthetic import outlier_problems

f64 = torch.float64
BACKENDS = ["torch"] + (["native"] if native_available() else [])


def rotation_error_deg(pose: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    R1, R2 = rvec_to_rotmat(pose[..., :3]), rvec_to_rotmat(true[..., :3])
    c = ((R1.transpose(-1, -2) @ R2).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.arccos(c.clamp(-1, 1)))


def success(pose: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    trans = (pose[..., 3:] - true[..., 3:]).norm(dim=-1) / true[..., 3:].norm(dim=-1)
    return (rotation_error_deg(pose, true) < 1.0) & (trans < 0.01)


@pytest.mark.parametrize("loss", ["l2", "huber", "cauchy"])
def test_robust_cost_derivatives_match_autograd(loss):
    g = torch.Generator().manual_seed(0)
    B, n = 3, 12
    x3d = torch.randn(B, n, 3, generator=g, dtype=f64)
    R0 = rvec_to_rotmat(0.5 * torch.randn(B, 3, generator=g, dtype=f64))
    t0 = torch.tensor([0.1, -0.2, 6.0], dtype=f64).expand(B, 3)
    K = torch.tensor([[800.0, 0, 320], [0, 780, 240], [0, 0, 1]], dtype=f64)[None]
    P = (R0 @ x3d.transpose(1, 2)).transpose(1, 2) + t0[:, None]
    x2d = P[..., :2] / P[..., 2:] * torch.tensor([800.0, 780], dtype=f64) + torch.tensor([320.0, 240], dtype=f64)
    x2d = x2d + 5 * torch.randn(B, n, 2, generator=g, dtype=f64)
    x2d[:, :3] += 60.0  # outliers: residuals on both sides of the scale
    w = torch.rand(B, n, generator=g, dtype=f64) + 0.1
    scale = torch.full((1, 1), 4.0, dtype=f64)
    ct = cost_terms(R0, t0, x2d, x3d, K, w, loss=loss, loss_scale=scale)

    def cost(xi):
        R = rvec_to_rotmat(xi[:, :3]) @ R0
        return cost_terms(R, t0 + xi[:, 3:], x2d, x3d, K, w, hessian=False, loss=loss, loss_scale=scale).cost

    xi = torch.zeros(B, 6, dtype=f64, requires_grad=True)
    grad = torch.autograd.grad(cost(xi).sum(), xi, create_graph=True)[0]
    hess = torch.stack([torch.autograd.grad(grad[:, k].sum(), xi, retain_graph=True)[0] for k in range(6)], 1)
    torch.testing.assert_close(ct.grad, grad.detach(), rtol=1e-12, atol=1e-12 * grad.abs().max().item())
    torch.testing.assert_close(ct.hess, hess, rtol=1e-11, atol=1e-11 * hess.abs().max().item())


def test_robust_loss_functions():
    s = torch.tensor([0.0, 1.0, 4.0, 9.0, 100.0], dtype=f64, requires_grad=True)
    c = 2.0
    for loss, expected in (
        ("huber", torch.where(s <= c * c, s, 2 * c * s.sqrt() - c * c)),
        ("cauchy", c * c * torch.log1p(s / (c * c))),
    ):
        rho, d1, d2 = robust_loss(s, loss, c)
        torch.testing.assert_close(rho, expected)
        (g,) = torch.autograd.grad(rho.sum(), s, create_graph=True)
        torch.testing.assert_close(d1, g)
        (h,) = torch.autograd.grad(g.sum(), s)
        torch.testing.assert_close(d2[1:], h[1:])  # s = 0 lies on huber's kink of sqrt(s): skip


def _robust_problem(seed=3, B=3, n=12):
    p, _ = outlier_problems(B, n, 0.25, seed=seed)
    w = torch.rand(B, n, generator=torch.Generator().manual_seed(seed), dtype=f64) + 0.5
    return p, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["huber", "cauchy"])
def test_robust_solution_is_stationary_and_beats_least_squares(backend, loss):
    p, w = _robust_problem(seed=5, B=8, n=30)
    ls = bpnp.solve_pnp(p.x2d, p.x3d, p.K, w, backend=backend, warn=False)
    rr = bpnp.solve_pnp(p.x2d, p.x3d, p.K, w, loss=loss, loss_scale=3.0, backend=backend, warn=False)
    assert bool(rr.converged.all())
    scale = torch.full((1, 1), 3.0, dtype=f64)
    at_robust = cost_terms(rr.R, rr.t, p.x2d, p.x3d, p.K, w, loss=loss, loss_scale=scale)
    at_ls = cost_terms(ls.R, ls.t, p.x2d, p.x3d, p.K, w, hessian=False, loss=loss, loss_scale=scale)
    torch.testing.assert_close(rr.cost, at_robust.cost)
    assert bool((at_robust.cost <= at_ls.cost * (1 + 1e-12)).all())
    # Stationary: the gradient is float64 noise next to the cost's natural scale.
    assert float((at_robust.grad.norm(dim=-1) / at_robust.cost).max()) < 1e-8
    assert bool((torch.linalg.eigvalsh(at_robust.hess)[:, 0] > 0).all())


def _finite_difference_check(fun, args, which, h=1e-6, rtol=1e-6, entries=12):
    """Central differences of ``fun(*args) . v`` against the backward, for ``args[which]``, on
    ``entries`` random entries of each (every entry of small inputs)."""
    torch.manual_seed(0)
    leaves = [a.detach().clone().requires_grad_(i in which) for i, a in enumerate(args)]
    pose = fun(*leaves)
    v = torch.randn_like(pose)
    (pose * v).sum().backward()
    for i in which:
        flat = args[i].detach().clone()
        num = torch.zeros_like(flat)
        mask = torch.ones_like(flat, dtype=torch.bool)
        if flat.shape[-2:] == (3, 3):  # K: only its free entries
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[..., 0, :] = True
            mask[..., 1, 1:] = True
        free = mask.reshape(-1).nonzero()[:, 0]
        chosen = free[torch.randperm(free.numel())[:entries]]
        mask = torch.zeros_like(mask).reshape(-1).index_fill_(0, chosen, True).reshape(mask.shape)
        for j in chosen.tolist():
            step = h * max(1.0, abs(flat.reshape(-1)[j].item()))
            vals = []
            for sign in (1.0, -1.0):
                moved = flat.clone()
                moved.reshape(-1)[j] += sign * step
                a = [x.detach() for x in args]
                a[i] = moved
                vals.append(float((fun(*a) * v).sum()))
            num.reshape(-1)[j] = (vals[0] - vals[1]) / (2 * step)
        got = leaves[i].grad
        scale = num[mask].norm().clamp_min(1e-12)
        err = float((got - num)[mask].norm() / scale)
        assert err < rtol, f"input {i}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["huber", "cauchy"])
def test_robust_gradients_match_finite_differences(backend, loss):
    p, w = _robust_problem()
    scale = torch.tensor([3.0, 5.0, 8.0], dtype=f64)

    def fun(x2d, x3d, K, w, s):
        return bpnp.solve_pnp(x2d, x3d, K, w, loss=loss, loss_scale=s, backend=backend, warn=False).pose

    # Scales below most residuals, so that every input moves the robust terms (also loss_scale).
    _finite_difference_check(fun, [p.x2d, p.x3d, p.K, w, scale], which=(0, 1, 2, 3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ransac_gradient_is_the_inlier_solve_gradient(backend):
    """With RANSAC the gradient is exact for the final inlier set held fixed: the same as the
    gradient of the weighted solve with weights * inliers, and central differences of it."""
    p, w = _robust_problem(seed=7, B=3, n=16)
    res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, w, ransac=True, backend=backend, warn=False)
    inl = res.inliers.to(f64)
    assert bool(res.converged.all())

    def fun(x2d, x3d, K, w):
        return bpnp.solve_pnp(x2d, x3d, K, w * inl, init_pose=res.pose.detach(), backend=backend, warn=False).pose

    _finite_difference_check(fun, [p.x2d, p.x3d, p.K, w], which=(0, 1, 2, 3))
    leaves = [x.detach().clone().requires_grad_() for x in (p.x2d, p.x3d, p.K, w)]
    v = torch.randn(3, 6, dtype=f64)
    (bpnp.solve_pnp(*leaves, ransac=True, backend=backend, warn=False).pose * v).sum().backward()
    ref = [x.detach().clone().requires_grad_() for x in (p.x2d, p.x3d, p.K, w)]
    (fun(*ref) * v).sum().backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-10)
    assert float(leaves[3].grad[~res.inliers].abs().max()) == 0.0  # outliers do not move the pose


def test_quartic_and_p3p_recover_known_solutions():
    g = torch.Generator().manual_seed(0)
    roots = torch.randn(500, 4, generator=g, dtype=f64)
    coeffs = torch.tensor(np.array([np.poly(r)[::-1] for r in roots.numpy()]))
    found = solve_quartic(coeffs)
    err = (found.real.sort(-1).values - roots.sort(-1).values).abs().max()
    assert float(err) < 1e-8 and float(found.imag.abs().max()) < 1e-6
    M = 1000
    X = torch.randn(M, 3, 3, generator=g, dtype=f64)
    R = rvec_to_rotmat(torch.randn(M, 3, generator=g, dtype=f64))
    t = 0.3 * torch.randn(M, 3, generator=g, dtype=f64) + torch.tensor([0, 0, 6.0], dtype=f64)
    P = (R @ X.transpose(1, 2)).transpose(1, 2) + t[:, None]
    Rh, th, valid = p3p(P / P.norm(dim=-1, keepdim=True), X)
    dist = (Rh - R[:, None]).flatten(-2).norm(dim=-1) + (th - t[:, None]).norm(dim=-1)
    best = torch.where(valid, dist, torch.full_like(dist, float("inf"))).amin(-1)
    assert float((best < 1e-6).to(f64).mean()) > 0.99  # the rest: near-degenerate triangles
    # every valid pose reproduces the three rays
    Pc = Rh @ X[:, None].transpose(-1, -2) + th[..., None]  # Mx4x3x3
    rays = Pc / Pc.norm(dim=-2, keepdim=True)
    target = (P / P.norm(dim=-1, keepdim=True)).transpose(-1, -2)[:, None]
    fit = (rays - target).flatten(-2).norm(dim=-1)
    assert float(torch.where(valid & (best[:, None] < 1e-6), fit, torch.zeros_like(fit)).max()) < 1e-6


@pytest.mark.skipif(not native_available(), reason="the compiled solver was not built")
def test_native_and_torch_ransac_rounds_agree():
    p, inl = outlier_problems(64, 40, 0.4, seed=2)
    from bpnp.normalise import normalise_problem
    from bpnp.solvers.candidates import normalised_rays
    from bpnp.solvers.native import ransac_round_native

    x2d, x3d, K, w, _ = normalise_problem(p.x2d, p.x3d, p.K, torch.ones(1, 40, dtype=f64))
    rays = normalised_rays(x2d, K)
    rays = rays / rays.norm(dim=-1, keepdim=True)
    tau2 = (4.0 / (p.K[:, 0, 0] * p.K[:, 1, 1]).sqrt()) ** 2
    g = torch.Generator().manual_seed(1)
    pick = torch.rand(64, 16, 40, generator=g, dtype=f64).topk(3, dim=-1).indices
    ids = torch.arange(64)
    pick[:5, 3] = -1  # skipped samples
    unbounded = torch.full((64,), float("inf"), dtype=f64)
    Rn, tn, sn, cn = ransac_round_native(ids, pick, rays, x2d, x3d, K, w, tau2, unbounded)
    Rt, tt, st, ct = _round(ids, pick, rays, x2d, x3d, K, w.expand(64, 40), tau2[:, None], unbounded)
    assert sn.shape == (64, 16) and Rn.shape == (64, 16, 3, 3)
    assert bool(torch.isinf(sn[:5, 3]).all()) and bool(torch.isinf(st[:5, 3]).all())
    # (1e-5: an ill-posed triple's quartic amplifies rounding; the AVX2 build's fused multiply-adds
    # moved one of 1,024 scores by 1.06e-6 relative)
    torch.testing.assert_close(sn, st, rtol=1e-5, atol=1e-15)
    assert bool((cn.long() == ct).all())
    # The pose where a consensus tells the sample's roots apart (with every point outside the
    # threshold, all roots score alike and either may be the first of the lowest).
    told = cn >= 4
    torch.testing.assert_close(Rn[told], Rt[told], rtol=1e-5, atol=1e-6)  # P3P of ill-posed triples
    # A bound keeps only the hypotheses that score below it, in both.
    # (below the median: all-outlier scores tie, and the two sums differ in the last bit)
    bound = sn.nan_to_num(posinf=0).median(-1).values * (1 - 1e-6)
    _, _, sbn, _ = ransac_round_native(ids, pick, rays, x2d, x3d, K, w, tau2, bound)
    _, _, sbt, _ = _round(ids, pick, rays, x2d, x3d, K, w.expand(64, 40), tau2[:, None], bound)
    kept = sn < bound[:, None]
    assert torch.equal(torch.isfinite(sbn), kept) and torch.equal(torch.isfinite(sbt), kept)
    torch.testing.assert_close(sbn[kept], sn[kept], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6])
def test_ransac_finds_the_true_inliers(backend, ratio):
    p, inl = outlier_problems(60, 50, ratio, seed=11)
    bound = bpnp.solve_pnp(p.x2d, p.x3d, p.K, inl.to(f64), backend=backend, warn=False)
    res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, ransac=True, backend=backend, warn=False)
    assert res.inliers.shape == (60, 50) and res.inliers.dtype == torch.bool
    same = (res.inliers == inl).all(-1)
    assert float(same.to(f64).mean()) >= 0.9
    # with the same inlier set, the answer is the bound's (the same least-squares minimum)
    torch.testing.assert_close(res.pose[same], bound.pose[same], rtol=1e-9, atol=1e-9)
    assert int(success(res.pose, p.pose).sum()) >= int(success(bound.pose, p.pose).sum()) - 1
    assert bool(res.converged.all())


def test_ransac_is_deterministic_and_seeded():
    p, _ = outlier_problems(20, 30, 0.5, seed=4)
    a = bpnp.solve_pnp(p.x2d, p.x3d, p.K, ransac=bpnp.RansacOptions(seed=3), warn=False)
    b = bpnp.solve_pnp(p.x2d, p.x3d, p.K, ransac=bpnp.RansacOptions(seed=3), warn=False)
    assert torch.equal(a.pose, b.pose) and torch.equal(a.inliers, b.inliers)
    few = bpnp.RansacOptions(seed=5, max_iterations=1, min_iterations=0, samples_per_round=1, local_iterations=0)
    c = bpnp.solve_pnp(p.x2d, p.x3d, p.K, ransac=few, warn=False)
    d = bpnp.solve_pnp(p.x2d, p.x3d, p.K, ransac=dataclasses.replace(few, seed=6), warn=False)
    assert not torch.equal(c.pose, d.pose)  # one sample per problem: the seed shows


@pytest.mark.parametrize("backend", BACKENDS)
def test_ransac_on_all_outliers_is_finite_and_flagged(backend):
    g = torch.Generator().manual_seed(0)
    p, _ = outlier_problems(10, 20, 1.0, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, ransac=True, backend=backend)
    assert bool(torch.isfinite(res.pose).all()) and bool(torch.isfinite(res.cost).all())
    # a random image point lands within 4 px of a pose's projection now and then: a consensus
    # that chance explains is flagged, so (nearly) every item is
    assert int(res.converged.sum()) <= 1
    x2d = p.x2d.clone().requires_grad_()
    pose = bpnp.solve_pnp(x2d, p.x3d, p.K, ransac=True, backend=backend, warn=False).pose
    (grad,) = torch.autograd.grad(pose.sum(), x2d)
    assert bool(torch.isfinite(grad).all())
    del g


def test_robust_and_ransac_options_are_checked():
    p, _ = outlier_problems(2, 10, 0.0, seed=0)
    args = (p.x2d, p.x3d, p.K)
    for kwargs in (
        {"loss": "tukey"},
        {"loss": "huber", "loss_scale": 0.0},
        {"loss": "huber", "loss_scale": float("nan")},
        {"loss": "huber", "loss_scale": torch.ones(3, dtype=f64)},
        {"loss": "huber", "loss_scale": "1"},
        {"ransac": "yes"},
        {"ransac": True, "method": "opencv"},
    ):
        with pytest.raises(bpnp.PnPInputError):
            bpnp.solve_pnp(*args, **kwargs)
    for kwargs in ({"threshold": 0.0}, {"confidence": 1.0}, {"max_iterations": 0}, {"seed": -1}):
        with pytest.raises(bpnp.PnPInputError):
            bpnp.RansacOptions(**kwargs)
    with pytest.raises(bpnp.PnPInputError):
        bpnp.BPnP(loss="tukey")


def test_module_forwards_robust_options():
    p, inl = outlier_problems(4, 30, 0.3, seed=9)
    layer = bpnp.BPnP(loss="huber", loss_scale=2.0, ransac=True)
    assert "huber" in repr(layer) and "ransac" in repr(layer)
    pose = layer(p.x2d, p.x3d, p.K)
    ref = bpnp.solve_pnp(p.x2d, p.x3d, p.K, loss="huber", loss_scale=2.0, ransac=True).pose
    torch.testing.assert_close(pose, ref)
    bound = bpnp.solve_pnp(p.x2d, p.x3d, p.K, inl.to(f64)).pose
    assert float(rotation_error_deg(pose, bound).max()) < 0.5


def test_float32_and_unbatched_inputs():
    p, inl = outlier_problems(1, 30, 0.3, seed=12)
    res = bpnp.solve_pnp(p.x2d[0].float(), p.x3d[0].float(), p.K[0].float(), ransac=True, loss="cauchy", loss_scale=2.0)
    assert res.pose.dtype == torch.float32 and res.pose.shape == (6,) and res.inliers.shape == (30,)
    assert bool(success(res.pose.double()[None], p.pose).all())


# ---- lens distortion in the layer ----

DIST = torch.tensor([-0.2, 0.05, 0.001, -0.002, 0.01], dtype=f64)


def _distorted_problem(B=3, n=12, seed=0):
    from bpnp.synthetic import random_problems

    p = random_problems(B, n, noise=0.0, seed=seed, weighted=True)
    g = torch.Generator().manual_seed(seed)
    x2d = bpnp.project(p.x3d, p.pose, p.K, DIST) + torch.randn(B, n, 2, generator=g, dtype=f64)
    return p, x2d


@pytest.mark.parametrize("backend", BACKENDS)
def test_distorted_solve_matches_opencv(backend):
    cv2 = pytest.importorskip("cv2")
    p, x2d = _distorted_problem(B=6, n=20, seed=1)
    res = bpnp.solve_pnp(x2d, p.x3d, p.K, dist=DIST, backend=backend)
    assert bool(res.converged.all())
    own = (bpnp.project(p.x3d, res.pose, p.K, DIST) - x2d).pow(2).sum(-1).sum(-1)
    torch.testing.assert_close(res.cost, own)  # the cost in distorted pixels
    for b in range(6):
        obj, img, K = p.x3d[b].numpy(), x2d[b].numpy(), p.K[b].numpy()
        _, rv, tv = cv2.solvePnP(obj, img, K, DIST.numpy(), flags=cv2.SOLVEPNP_SQPNP)
        rv, tv = cv2.solvePnPRefineLM(obj, img, K, DIST.numpy(), rv, tv)
        cv_pose = torch.from_numpy(np.concatenate([rv[:, 0], tv[:, 0]]))[None]
        cv_cost = (bpnp.project(p.x3d[b : b + 1], cv_pose, p.K[b : b + 1], DIST) - x2d[b]).pow(2).sum()
        ours = (bpnp.project(p.x3d[b : b + 1], res.pose[b : b + 1], p.K[b : b + 1], DIST) - x2d[b]).pow(2).sum()
        assert float(ours) <= float(cv_cost) * (1 + 1e-9)
        assert float((cv_pose[0] - res.pose[b]).abs().max()) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["l2", "cauchy"])
def test_distortion_gradients_match_finite_differences(backend, loss):
    p, x2d = _distorted_problem()
    dist = DIST.expand(3, 5).clone()

    def fun(x2d, x3d, K, w, d):
        return bpnp.solve_pnp(x2d, x3d, K, w, dist=d, loss=loss, loss_scale=2.0, backend=backend, warn=False).pose

    _finite_difference_check(fun, [x2d, p.x3d, p.K, p.weights, dist], which=(0, 1, 2, 3, 4))


def test_distortion_with_ransac_and_input_checks():
    p, x2d = _distorted_problem(B=4, n=40, seed=3)
    g = torch.Generator().manual_seed(0)
    out = torch.rand(4, 40, generator=g) < 0.3
    x2d = torch.where(out[..., None], torch.rand(4, 40, 2, generator=g, dtype=f64) * 500, x2d)
    res = bpnp.solve_pnp(x2d, p.x3d, p.K, ransac=True, dist=DIST)
    assert bool((res.inliers == ~out).all()) and bool(res.converged.all())
    bound = bpnp.solve_pnp(x2d, p.x3d, p.K, (~out).to(f64), dist=DIST)  # the true inliers
    torch.testing.assert_close(res.pose, bound.pose, rtol=1e-9, atol=1e-9)
    for bad in (torch.zeros(4, dtype=f64), torch.zeros(3, 5, dtype=f64), torch.full((5,), float("nan"), dtype=f64)):
        with pytest.raises(bpnp.PnPInputError):
            bpnp.solve_pnp(x2d, p.x3d, p.K, dist=bad)
    with pytest.raises(bpnp.PnPInputError):
        bpnp.solve_pnp(x2d, p.x3d, p.K, dist=DIST.float())
    layer = bpnp.BPnP()
    torch.testing.assert_close(layer(x2d, p.x3d, p.K, dist=DIST), bpnp.solve_pnp(x2d, p.x3d, p.K, dist=DIST).pose)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["cauchy", "distortion"])
def test_double_backward_matches_finite_differences_of_the_gradient(backend, case):
    """``create_graph=True``: the derivative of a gradient along a direction equals central
    differences of that gradient (robust loss, and lens distortion)."""
    p, _ = outlier_problems(2, 10, 0.2, seed=3)
    kw = {"loss": "cauchy", "loss_scale": 3.0} if case == "cauchy" else {"dist": DIST * 0.5}
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 6, generator=g, dtype=f64)

    def inner(x2d, create):
        x2d = x2d if create else x2d.detach().clone().requires_grad_()
        pose = bpnp.solve_pnp(x2d, p.x3d, p.K, backend=backend, warn=False, **kw).pose
        (grad,) = torch.autograd.grad((pose * v).sum(), x2d, create_graph=create)
        return grad

    x2d = p.x2d.clone().requires_grad_()
    grad = inner(x2d, True)
    u = torch.randn(grad.shape, generator=g, dtype=f64)
    (second,) = torch.autograd.grad((grad * u).sum(), x2d)
    d = torch.randn(x2d.shape, generator=g, dtype=f64)
    eps = 1e-5
    fd = ((inner(p.x2d + eps * d, False) - inner(p.x2d - eps * d, False)) * u).sum() / (2 * eps)
    assert abs(float((second * d).sum()) - float(fd)) <= 1e-6 * abs(float(fd))


def test_minimal_samples_are_distinct_uniform_and_of_positive_weight():
    from bpnp.solvers.ransac import _minimal_samples

    order = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 2, 4, 6, 1, 3, 5]])  # row 1: 4 points weighted
    keys = torch.tensor([12345, -98765])
    picks = _minimal_samples(order, torch.tensor([7, 4]), 100_000, keys, torch.tensor([0, 3]))
    assert bool((picks[..., 0] != picks[..., 1]).all() & (picks[..., 0] != picks[..., 2]).all())
    assert bool((picks[..., 1] != picks[..., 2]).all())
    assert set(picks[1].unique().tolist()) == {0, 2, 4, 6}
    triples = picks[0].sort(-1).values
    counts = torch.bincount(triples[:, 0] * 49 + triples[:, 1] * 7 + triples[:, 2])
    counts = counts[counts > 0].to(f64)
    assert (
        counts.numel() == 35 and float(counts.min() / counts.mean()) > 0.9 and float(counts.max() / counts.mean()) < 1.1
    )


def test_random_streams_match_splitmix64():
    # The counter-based stream is splitmix64 (wrapping int64 products): checked against Python ints.
    from bpnp.solvers.ransac import mix64, uniform

    M = 2**64

    def ref_mix(z):
        z %= M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M
        return z ^ (z >> 31)

    values = [0, 1, -1, 2**62 + 12345, -(2**63), 987654321987654321]
    got = mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g % M for g in got] == [ref_mix(v) for v in values]
    key = torch.tensor(-42, dtype=torch.int64)
    u = uniform(key, torch.arange(5))
    want = [(ref_mix(-42 + ref_mix(c * 0x9E3779B97F4A7C15)) >> 11) * 2.0**-53 for c in range(5)]
    assert u.tolist() == want
    assert bool(((u >= 0) & (u < 1)).all())
