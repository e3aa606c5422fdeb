"""Bad input is refused up front with a ValueError naming the argument; degenerate geometry
gives a finite answer flagged as not converged."""

import warnings

import pytest
import torch

import bpnp
from bpnp.synthetic import random_problems


@pytest.fixture
def prob():
    p = random_problems(2, 6, seed=0)
    return p.x2d, p.x3d[0], p.K[0], p.weights


def expect(match, *args, **kw):
    with pytest.raises(ValueError, match=match):
        bpnp.solve_pnp(*args, **kw)


def test_shapes(prob):
    x2d, x3d, K, w = prob
    expect(r"x2d: expected shape \(B, n, 2\)", x2d[..., :1], x3d, K)
    expect(r"x2d: expected shape", x2d[None], x3d, K)
    expect(r"x3d: expected shape \(6, 3\) or \(2, 6, 3\)", x2d, x3d[:5], K)
    expect(r"x3d: expected shape", x2d, x3d.expand(3, 6, 3), K)
    expect(r"x3d: expected shape \(n, 3\)", x2d, x3d[:, :2], K)
    expect(r"K: expected shape \(3, 3\) or \(B, 3, 3\)", x2d, x3d, K[:2])
    expect(r"K: expected shape \(3, 3\) or \(2, 3, 3\)", x2d, x3d, K.expand(5, 3, 3))
    expect(r"weights: expected shape \(6,\) or \(2, 6\)", x2d, x3d, K, w[:, :3])
    expect(r"init_pose: expected shape \(2, 6\)", x2d, x3d, K, init_pose=torch.zeros(2, 5, dtype=x2d.dtype))


def test_too_few_points(prob):
    x2d, x3d, K, w = prob
    expect(r"at least 4 points, got n = 3", x2d[:, :3], x3d[:3], K)
    w = w.clone()
    w[:, :3] = 0
    expect(r"at least 4 points with positive weight", x2d, x3d, K, w)


def test_non_finite(prob):
    x2d, x3d, K, w = prob
    for name, idx in (("x2d", 0), ("x3d", 1), ("K", 2), ("weights", 3)):
        args = [x2d.clone(), x3d.clone(), K.clone(), w.clone()]
        args[idx].view(-1)[1] = float("nan")
        expect(rf"{name}: contains NaN or inf", *args)
    bad = x2d.clone()
    bad[0, 0, 0] = float("inf")
    expect("x2d: contains NaN or inf", bad, x3d, K)


def test_bad_values(prob):
    x2d, x3d, K, w = prob
    expect("weights: must be non-negative", x2d, x3d, K, -w)
    K2 = K.clone()
    K2[1, 0] = 1.0
    expect("K: expected upper-triangular", x2d, x3d, K2)
    K2 = K.clone()
    K2[0, 0] = -K2[0, 0]
    expect("K: focal lengths", x2d, x3d, K2)
    K2 = K.clone()
    K2[2, 2] = 0.0
    expect(r"K: K\[2,2\] must be positive", x2d, x3d, K2)
    expect("method: expected one of", x2d, x3d, K, method="magic")


def test_types(prob):
    x2d, x3d, K, w = prob
    expect("x3d: dtype torch.float32, but x2d has torch.float64", x2d, x3d.float(), K)
    expect("x2d: expected a torch.Tensor", x2d.numpy(), x3d, K)
    expect("x2d: expected a floating-point tensor", x2d.long(), x3d, K)
    if torch.device("meta") is not None:
        expect("K: on device meta", x2d, x3d, K.to("meta"))


def test_collinear_points_finite_not_converged(backend):
    x3d = torch.stack([torch.linspace(-1, 1, 8), torch.zeros(8), torch.zeros(8)], -1).double()
    pose = torch.tensor([[0.1, 0.2, 0.3, 0.0, 0.0, 5.0]], dtype=torch.float64)
    K = torch.tensor([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]], dtype=torch.float64)
    x2d = (bpnp.project(x3d, pose, K) + 0.3 * torch.randn(1, 8, 2, dtype=torch.float64)).requires_grad_()
    with pytest.warns(bpnp.PnPConvergenceWarning):
        res = bpnp.solve_pnp(x2d, x3d, K, backend=backend)
    assert torch.isfinite(res.pose).all() and not res.converged.any()
    res.pose.sum().backward()
    assert torch.isfinite(x2d.grad).all()


def test_points_behind_camera_finite_not_converged(backend):
    p = random_problems(1, 8, seed=1, noise=0.0)
    pose = p.pose.clone()
    pose[:, 5] = 0.2  # the camera inside the object: some points behind it
    xcam = bpnp.transform_points(p.x3d, bpnp.rvec_to_rotmat(pose[:, :3]), pose[:, 3:])
    assert (xcam[..., 2] < 0).any()
    x2d = bpnp.project(p.x3d, pose, p.K).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bpnp.PnPConvergenceWarning)
        res = bpnp.solve_pnp(x2d, p.x3d, p.K, backend=backend)
    assert torch.isfinite(res.pose).all()
    if not res.converged.all():
        res.pose.sum().backward()
        assert torch.isfinite(x2d.grad).all()
    else:  # a valid pose with all points in front that explains the pixels as well
        xc = bpnp.transform_points(p.x3d, res.R.detach(), res.t.detach())
        assert (xc[..., 2] > 0).all()


def test_duplicate_points_singular_hessian_finite_grads(backend):
    p = random_problems(1, 4, seed=2)
    x3d = p.x3d[:, [0, 0, 0, 1]]  # only two distinct points
    x2d = p.x2d[:, [0, 0, 0, 1]].clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bpnp.solve_pnp(x2d, x3d, p.K, backend=backend)
    assert torch.isfinite(res.pose).all() and not res.converged.any()
    res.pose.sum().backward()
    assert torch.isfinite(x2d.grad).all()


@pytest.mark.parametrize("x3d_shape", [(6, 3), (0, 6, 3)])
def test_empty_batch(backend, x3d_shape):
    # No problems left (e.g. every detection filtered out): empty answers, an empty gradient, and
    # no warning (an empty batch of object points once made torch.var_mean warn).
    x2d = torch.zeros(0, 6, 2, dtype=torch.float64, requires_grad=True)
    x3d = torch.randn(x3d_shape, dtype=torch.float64)
    K = torch.tensor([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = bpnp.solve_pnp(x2d, x3d, K, backend=backend)
    assert res.pose.shape == (0, 6) and res.R.shape == (0, 3, 3) and res.converged.shape == (0,)
    (res.pose.sum() + res.R.sum()).backward()
    assert x2d.grad.shape == x2d.shape
