"""The backward is exact: gradients against central finite differences (float64)."""

import pytest
import torch

import bpnp
from bpnp.synthetic import random_problems
from bpnp.testing import analytic_gradient, fd_gradient, loss_weights

K_MASK = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)


def make_inputs(planar: bool, shared: bool, B: int = 3, n: int = 6, seed: int = 0) -> dict:
    p = random_problems(B, n, planar=planar, noise=2.0, seed=seed)
    K = p.K.clone()
    K[:, 0, 1] = 0.7  # a skew, so its gradient is tested too
    x3d = p.x3d[:1].expand_as(p.x3d) if shared else p.x3d
    K = K[:1].expand_as(K) if shared else K
    x2d = bpnp.project(x3d, p.pose, K) + torch.randn(
        B, n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return {
        "x2d": x2d,
        "x3d": p.x3d[0] if shared else p.x3d,
        "K": K[0] if shared else K,
        "weights": p.weights,
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("planar", [False, True], ids=["3d", "planar"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "batched"])
@pytest.mark.parametrize("name", ["x2d", "x3d", "K", "weights"])
def test_gradient_matches_finite_differences(name, shared, planar, backend):
    inputs = make_inputs(planar, shared, seed=3 + 7 * planar + 11 * shared)
    if shared and name == "weights":
        inputs["weights"] = inputs["weights"][0]
    v = loss_weights(inputs["x2d"].shape[0])
    mask = None
    if name == "K":
        mask = K_MASK if inputs["K"].dim() == 2 else K_MASK.expand_as(inputs["K"])
    g = analytic_gradient(inputs, name, v, backend=backend)
    g_fd = fd_gradient(inputs, name, v, mask, backend=backend)
    if mask is not None:
        g = g * mask
    assert torch.isfinite(g).all()
    assert rel_err(g, g_fd) <= 1e-6, (name, rel_err(g, g_fd))


def test_gradient_exact_at_identity_rotation():
    # Demos start at rvec = 0: Rodrigues and the log map switch to series there.
    p = random_problems(1, 8, noise=0.0, seed=5)
    pose = p.pose.clone()
    pose[:, :3] = 0.0
    x2d = bpnp.project(p.x3d, pose, p.K)
    inputs = {"x2d": x2d, "x3d": p.x3d, "K": p.K, "weights": p.weights}
    res = bpnp.solve_pnp(x2d, p.x3d, p.K, p.weights)
    assert res.pose[:, :3].abs().max() < 1e-12
    v = loss_weights(1, seed=1)
    for name in ("x2d", "x3d"):
        assert rel_err(analytic_gradient(inputs, name, v), fd_gradient(inputs, name, v)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_dtype_follows_input(dtype):
    inputs = make_inputs(False, True, B=2, n=8)
    ref = analytic_gradient(inputs, "x2d", loss_weights(2))
    leaf = {k: t.to(dtype).requires_grad_(k == "x2d") for k, t in inputs.items()}
    res = bpnp.solve_pnp(leaf["x2d"], leaf["x3d"], leaf["K"], leaf["weights"])
    assert res.pose.dtype == dtype
    (res.pose * loss_weights(2).to(dtype)).sum().backward()
    assert leaf["x2d"].grad.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert rel_err(leaf["x2d"].grad.double(), ref) < tol


def test_gradients_through_R_and_t_outputs():
    inputs = make_inputs(False, True, B=2, n=7)
    x2d = inputs["x2d"].clone().requires_grad_()
    res = bpnp.solve_pnp(x2d, inputs["x3d"], inputs["K"])
    loss = res.R.sum() + res.t.pow(2).sum()
    (g,) = torch.autograd.grad(loss, x2d)
    # Same loss through the pose output, differentiated by hand: R(rvec) is autograd-only.
    x2d2 = inputs["x2d"].clone().requires_grad_()
    pose = bpnp.solve_pnp(x2d2, inputs["x3d"], inputs["K"]).pose
    loss2 = bpnp.rvec_to_rotmat(pose[:, :3]).sum() + pose[:, 3:].pow(2).sum()
    (g2,) = torch.autograd.grad(loss2, x2d2)
    assert torch.allclose(g, g2, rtol=1e-12, atol=1e-15)
    assert g.abs().sum() > 0


def test_gradcheck_wrapper():
    inputs = make_inputs(False, False, B=1, n=5)
    x2d = inputs["x2d"].clone().requires_grad_()

    def f(x):
        return bpnp.solve_pnp(x, inputs["x3d"], inputs["K"], inputs["weights"]).pose

    assert torch.autograd.gradcheck(f, (x2d,), eps=1e-4, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
def test_closed_form_input_gradients_match_autograd(shared):
    # The backward's per-point formulas against autograd through the chart gradient g(theta).
    from bpnp.cost import gradient_in_chart
    from bpnp.implicit import input_gradients

    p = random_problems(5, 9, seed=2)
    K = p.K.clone()
    K[:, 0, 1], K[:, 2, 2] = 0.5, 1.2  # skew and a non-unit K[2,2]
    x3d, K, w = (p.x3d[:1], K[:1], p.weights[:1]) if shared else (p.x3d, K, p.weights)
    R, t = bpnp.rvec_to_rotmat(p.pose[:, :3] + 0.03), p.pose[:, 3:] + 0.05  # not an optimum
    u = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    leaves = [x.clone().requires_grad_() for x in (p.x2d, x3d, K, w)]
    g = gradient_in_chart(R, t, *leaves)
    expected = torch.autograd.grad((g * u).sum(), leaves)
    got = input_gradients(u, R, t, p.x2d, x3d, K, w)
    for name, e, c in zip(("x2d", "x3d", "K", "weights"), expected, got):
        assert c.shape == e.shape, name
        assert rel_err(c, -e) < 1e-13, (name, rel_err(c, -e))


def test_layer_inside_torch_compile():
    # torch.compile of code around the layer (the solver itself runs eagerly, behind a graph
    # break): same loss, same gradients. backend="aot_eager" checks the tracing, not codegen.
    import warnings

    inputs = make_inputs(False, True, B=4, n=8)
    K, x3d, w = inputs["K"], inputs["x3d"], inputs["weights"]

    def loss(x2d):
        return bpnp.solve_pnp(x2d * 1.0, x3d, K, w, warn=False).pose.pow(2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager")
    x_c = inputs["x2d"].clone().requires_grad_()
    x_e = inputs["x2d"].clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's graph-break notes
        out_c = compiled(x_c)
        out_c.backward()
    out_e = loss(x_e)
    out_e.backward()
    assert torch.allclose(out_c, out_e, rtol=1e-12)
    assert torch.allclose(x_c.grad, x_e.grad, rtol=1e-10, atol=1e-12)


def _layer_of_all_inputs(inputs: dict, backend: str, output: str = "pose"):
    """``f(x2d, x3d, k, weights) -> pose`` (or R) with K built from its 5 free entries ``k``
    (fx, skew, cx, fy, cy), so that gradcheck's perturbations keep K upper triangular."""

    def f(x2d, x3d, k, weights):
        zero, one = torch.zeros_like(k[..., 0]), torch.ones_like(k[..., 0])
        K = torch.stack(
            [
                torch.stack([k[..., 0], k[..., 1], k[..., 2]], -1),
                torch.stack([zero, k[..., 3], k[..., 4]], -1),
                torch.stack([zero, zero, one], -1),
            ],
            -2,
        )
        res = bpnp.solve_pnp(x2d, x3d, K, weights, backend=backend, warn=False)
        return res.pose if output == "pose" else res.R

    K = inputs["K"]
    k = torch.stack([K[..., 0, 0], K[..., 0, 1], K[..., 0, 2], K[..., 1, 1], K[..., 1, 2]], -1)
    args = tuple(t.clone().requires_grad_() for t in (inputs["x2d"], inputs["x3d"], k, inputs["weights"]))
    return f, args


@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
def test_gradcheck_every_input(shared, backend):
    inputs = make_inputs(False, shared, B=2, n=5, seed=4)
    f, args = _layer_of_all_inputs(inputs, backend)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("output", ["pose", "R"])
@pytest.mark.parametrize("planar", [False, True], ids=["3d", "planar"])
def test_double_backward_exact(planar, output, backend):
    # Second derivatives through the layer (create_graph=True): the backward is differentiable.
    inputs = make_inputs(planar, False, B=2, n=5, seed=6)
    f, args = _layer_of_all_inputs(inputs, backend, output)
    assert torch.autograd.gradgradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_hessian_vector_product_against_finite_differences(backend):
    # The case: the Hessian-vector product of pose.pow(2).sum() w.r.t. x2d, against central
    # differences of the (exact) first derivative.
    inputs = make_inputs(False, True, B=2, n=6, seed=8)
    x2d = inputs["x2d"].clone().requires_grad_()
    d = torch.randn(x2d.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grad_at(x, create_graph=False):
        pose = bpnp.solve_pnp(x, inputs["x3d"], inputs["K"], inputs["weights"], backend=backend).pose
        return torch.autograd.grad(pose.pow(2).sum(), x, create_graph=create_graph)[0]

    (hvp,) = torch.autograd.grad((grad_at(x2d, True) * d).sum(), x2d)
    h = 1e-4
    fd = (grad_at((x2d + h * d).detach().requires_grad_()) - grad_at((x2d - h * d).detach().requires_grad_())) / (2 * h)
    assert rel_err(hvp, fd) < 1e-6, rel_err(hvp, fd)
