"""Property-based fuzzing of the layer: the only exception is PnPInputError; every output is
finite, the answer is flagged where it is not a well-posed optimum, and gradients are never NaN."""

import math
import os
import warnings

import pytest
import torch

import bpnp

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("BPNP_FUZZ_EXAMPLES", "1000"))


@st.composite
def problems(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    B = draw(st.integers(1, 3))
    n = draw(st.integers(4, 10))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    scale = 10.0 ** draw(st.floats(-7, 7))
    offset = draw(st.sampled_from([0.0, 1.0, 1e3, 1e6])) * scale
    shape3 = draw(st.sampled_from(["random", "planar", "collinear", "duplicates", "identical", "zeros"]))
    x3d = torch.rand(B, n, 3, generator=g, dtype=torch.float64) * 2 - 1
    if shape3 == "planar":
        x3d[..., 2] = 0
    elif shape3 == "collinear":
        x3d = x3d[..., :1] * torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    elif shape3 == "duplicates":
        x3d[:, n // 2 :] = x3d[:, : n - n // 2].clone()
    elif shape3 == "identical":
        x3d[:] = x3d[:, :1].clone()
    elif shape3 == "zeros":
        x3d.zero_()
    x3d = x3d * scale + offset
    f = 10.0 ** draw(st.floats(-2, 6))
    K = (
        torch.tensor([[f, 0.0, 0.5 * f], [0.0, f, 0.4 * f], [0.0, 0.0, 1.0]], dtype=torch.float64)
        .expand(B, 3, 3)
        .clone()
    )
    depth = draw(st.sampled_from([3.0, 30.0, 3000.0, -3.0]))  # -3: the object behind the camera
    rvec = torch.randn(B, 3, generator=g, dtype=torch.float64)
    t = (
        torch.tensor([0.1, -0.2, depth], dtype=torch.float64) * scale
        - (bpnp.rvec_to_rotmat(rvec) @ torch.full((3, 1), offset, dtype=torch.float64))[..., 0]
    )
    kind2 = draw(st.sampled_from(["projected", "noisy", "random", "identical", "outliers", "all_outliers"]))
    with torch.no_grad():
        x2d = bpnp.project(x3d, torch.cat([rvec, t], -1), K)
    x2d = torch.nan_to_num(x2d, nan=0.0, posinf=1e300, neginf=-1e300).clamp(-1e12, 1e12)
    if kind2 == "noisy":
        x2d = x2d + f * 0.01 * torch.randn(x2d.shape, generator=g, dtype=torch.float64)
    elif kind2 == "random":
        x2d = torch.rand(x2d.shape, generator=g, dtype=torch.float64) * f
    elif kind2 == "identical":
        x2d[:] = x2d[:, :1].clone()
    elif kind2 in ("outliers", "all_outliers"):
        swap = torch.rand(B, n, generator=g) < (0.5 if kind2 == "outliers" else 2.0)
        x2d = torch.where(swap[..., None], torch.rand(x2d.shape, generator=g, dtype=torch.float64) * f, x2d)
    wkind = draw(st.sampled_from(["none", "random", "tiny", "huge", "sparse"]))
    weights = None
    if wkind != "none":
        weights = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.1
        if wkind == "tiny":
            weights[:, 1:] = 1e-300
        elif wkind == "huge":
            weights = weights * 1e200
        elif wkind == "sparse":
            weights[:, 4:] = 0
    bad = draw(st.sampled_from(["none"] * 12 + ["nan_x2d", "inf_x3d", "bad_K", "negative_weight"]))
    if bad == "nan_x2d":
        x2d[0, 0, 0] = math.nan
    elif bad == "inf_x3d":
        x3d[0, 0, 1] = math.inf
    elif bad == "bad_K":
        K[0, 1, 1] = -1.0
    elif bad == "negative_weight":
        weights = torch.ones(B, n, dtype=torch.float64) if weights is None else weights
        weights[:, 0] = -1.0
    shared = draw(st.booleans())
    if shared:
        x3d, K = x3d[0], K[0]
        if weights is not None:
            weights = weights[0]
    unbatched = shared and B == 1 and draw(st.booleans())
    if unbatched:
        x2d = x2d[0]
    cast = [None if x is None else x.to(dtype) for x in (x2d, x3d, K, weights)]
    # Half the examples least squares; the others a robust loss and/or RANSAC, with a loss
    # scale and threshold from a thousandth to a thousand times a hundredth of the focal length.
    mode = draw(st.sampled_from(["l2"] * 4 + ["huber", "cauchy", "ransac", "ransac_cauchy"]))
    pixel = 0.01 * f * 10.0 ** draw(st.floats(-3, 3))
    extra = {}
    if mode in ("huber", "cauchy"):
        extra = {"loss": mode, "loss_scale": pixel}
    elif mode.startswith("ransac"):
        extra = {"ransac": bpnp.RansacOptions(threshold=pixel, max_iterations=64)}
        if mode == "ransac_cauchy":
            extra.update(loss="cauchy", loss_scale=pixel)
    return cast, extra


@pytest.mark.parametrize("backend", ["torch", "native"])
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(problem=problems())
def test_fuzz(problem, backend):
    if backend == "native":
        from bpnp.solvers.native import native_available

        if not native_available():
            pytest.skip("native solver unavailable")
    (x2d, x3d, K, weights), extra = problem
    x2d = x2d.clone().requires_grad_()
    Kg = K.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bpnp.PnPConvergenceWarning)
        try:
            res = bpnp.solve_pnp(x2d, x3d, Kg, weights, backend=backend, **extra)
        except bpnp.PnPInputError:
            return
    for name in ("pose", "R", "t", "cost"):
        out = getattr(res, name)
        assert torch.isfinite(out).all(), (name, out)
    assert res.converged.dtype == torch.bool and res.trusted.dtype == torch.bool
    if "ransac" in extra:
        assert res.inliers is not None and res.inliers.shape == x2d.shape[:-1]
    (res.pose.sum() + res.R.sum()).backward()
    assert torch.isfinite(x2d.grad).all() and torch.isfinite(Kg.grad).all()
