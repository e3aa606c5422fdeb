"""One algorithm in two solvers: options, parity in every problem, batch independence, API."""

import dataclasses

import pytest
import torch

import bpnp
from bpnp.solvers.native import native_available, native_unavailable_reason, solve_pnp_native
from bpnp.solvers.pnp import solve_pnp_forward
from bpnp.synthetic import random_problems

needs_native = pytest.mark.skipif(not native_available(), reason=f"native solver: {native_unavailable_reason()}")


def stress_problems(kind: str, B: int, n: int, seed: int):
    """Random problems of one kind: solid, planar, thin (a box squashed to 5% / 20%), or noisy."""
    gen = torch.Generator().manual_seed(seed)
    extra = {"noise": 8.0} if kind == "noisy" else {}
    p = random_problems(B, n, planar=kind == "planar", seed=seed, **extra)
    if kind.startswith("thin"):
        thickness = 0.05 if kind == "thin" else 0.2
        x3d = p.x3d * torch.tensor([1.0, 1.0, thickness], dtype=torch.float64)
        x2d = bpnp.project(x3d, p.pose, p.K) + 1.5 * torch.randn(p.x2d.shape, generator=gen, dtype=torch.float64)
        p = p._replace(x3d=x3d, x2d=x2d)
    return p


KINDS = ["solid", "planar", "thin", "thin20", "noisy"]
NS = [4, 5, 6, 8, 12, 20, 50, 100]


def assert_same_optimum(a, b, x2d, weights, what=""):
    """Same cost (1e-10 relative, above float64's floor of the residuals), pose to 1e-8, same flag."""
    wsum = weights.expand(x2d.shape[:2]).sum(-1)
    floor = 1e-22 * wsum * ((x2d * x2d).sum(-1).mean(-1) + 1.0)
    cost_ok = (a.cost - b.cost).abs() <= 1e-10 * b.cost.abs() + floor
    cost_ok |= torch.isinf(a.cost) & torch.isinf(b.cost)
    rot_ok = (a.R - b.R).abs().amax((1, 2)) <= 1e-8
    t_ok = (a.t - b.t).norm(dim=-1) <= 1e-8 * b.t.norm(dim=-1)
    ok = cost_ok & rot_ok & t_ok & (a.converged == b.converged)
    assert ok.all(), (
        f"{what}: {int((~ok).sum())} differ: costs {a.cost[~ok][:4].tolist()} vs {b.cost[~ok][:4].tolist()}"
    )


@needs_native
@pytest.mark.parametrize("kind", KINDS)
def test_parity_in_every_problem(kind):
    # 5 kinds x 8 sizes x 56 problems = 2,240 problems: both solvers give the same optimum.
    for n in NS:
        p = stress_problems(kind, 56, n, seed=n + 100 * KINDS.index(kind))
        a = solve_pnp_forward(p.x2d, p.x3d, p.K, p.weights)
        b = solve_pnp_native(p.x2d, p.x3d, p.K, p.weights)
        assert_same_optimum(a, b, p.x2d, p.weights, f"{kind} n={n}")


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_answer_independent_of_the_batch(backend):
    # A solid, a planar and a thin problem (the thin one gets extra starts) solved alone and in one
    # mixed batch: the same answers.
    if backend == "native" and not native_available():
        pytest.skip(native_unavailable_reason())
    items = [stress_problems(kind, 3, 10, seed=7) for kind in ("solid", "planar", "thin")]
    x2d = torch.cat([p.x2d for p in items])
    x3d = torch.cat([p.x3d for p in items])
    K = torch.cat([p.K for p in items])
    w = torch.cat([p.weights for p in items])
    mixed = bpnp.solve_pnp(x2d, x3d, K, w, backend=backend)
    alone = [
        bpnp.solve_pnp(x2d[i : i + 1], x3d[i : i + 1], K[i : i + 1], w[i : i + 1], backend=backend)
        for i in range(x2d.shape[0])
    ]
    alone = bpnp.PnPResult(
        *(torch.cat([getattr(a, f) for a in alone]) for f in ("pose", "R", "t", "cost", "converged")), iterations=0
    )
    if backend == "native":  # per-problem C code: bit for bit
        assert torch.equal(alone.pose, mixed.pose) and torch.equal(alone.cost, mixed.cost)
    assert_same_optimum(alone, mixed, x2d, w, backend)


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_candidates", 0),
        ("num_candidates", 1.5),
        ("num_candidates", "4"),
        ("num_candidates", 10),
        ("max_iter", 2.5),
        ("max_iter", -5),
        ("max_iter", True),
        ("global_search", "no"),
        ("check_every", 0),
        ("warm_start_ratio", 0.0),
        ("ambiguity_threshold", float("nan")),
    ],
)
def test_options_validated(field, value):
    with pytest.raises(bpnp.PnPInputError, match=field):
        bpnp.SolverOptions(**{field: value})


@pytest.mark.parametrize(
    "field,value",
    [("screen_ratio", 0.5), ("thin_ratio", float("nan")), ("dedupe", -1.0), ("lm_rtol", 0.0), ("so3_iters", -1)],
)
def test_internal_thresholds_validated_and_not_options(field, value):
    # The solver's tuning constants are no keyword of the public options, yet read through them
    # (one source for both solvers) and checked when changed.
    with pytest.raises(TypeError):
        bpnp.SolverOptions(**{field: getattr(bpnp.SolverOptions(), field)})
    with pytest.raises(bpnp.PnPInputError, match=field):
        bpnp.SolverOptions()._tuned(**{field: value})


def test_the_native_struct_reads_every_option_and_threshold_once_by_name():
    # The load-time layout check compares offsets and types, blind to two fields of one type
    # swapped: the names, in order, are read from the C source here.
    import re
    from pathlib import Path

    from bpnp.options import NATIVE_FIELDS, SolverOptions, _Tuning

    names = [name for name, _ in NATIVE_FIELDS]
    public = {f.name for f in dataclasses.fields(SolverOptions)} - {"_tuning", "check_every"}
    assert len(names) == len(set(names)) and set(names) == public | {f.name for f in dataclasses.fields(_Tuning)}
    source = (Path(bpnp.__file__).parent / "solvers" / "native_pnp.c").read_text()
    struct = re.search(r"typedef struct \{([^}]*)\} Options;", source).group(1)
    declared = [
        (name, int if kind == "int" else float)
        for kind, names_ in re.findall(r"\b(int|double)\s+([^;]+);", struct)
        for name in re.split(r"[\s,]+", names_.strip())
    ]
    assert declared == list(NATIVE_FIELDS)


def test_options_frozen_and_api_keyword_only():
    opts = bpnp.SolverOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.max_iter = 3  # type: ignore[misc]
    p = random_problems(2, 6, seed=0)
    with pytest.raises(TypeError):
        bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, None)  # init_pose is keyword-only
    with pytest.raises(bpnp.PnPInputError, match="options"):
        bpnp.solve_pnp(p.x2d, p.x3d, p.K, options={"max_iter": 3})
    with pytest.raises(bpnp.PnPInputError, match="options"):
        bpnp.BPnP(options={"max_iter": 3})


def test_opencv_method_reads_options_and_flags_alike():
    pytest.importorskip("cv2")
    p = random_problems(8, 10, seed=5)
    ref = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights)
    res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, method="opencv")
    assert res.backend == "opencv" and res.converged.all()
    assert (res.cost <= ref.cost * (1 + 1e-9)).all() or torch.allclose(res.cost, ref.cost, rtol=1e-9)
    short = bpnp.solve_pnp(
        p.x2d, p.x3d, p.K, p.weights, method="opencv", warn=False, options=bpnp.SolverOptions(max_iter=1)
    )
    assert short.iterations == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_and_dtype_follow_the_inputs(device, dtype):
    p = random_problems(6, 9, seed=2)
    x2d = p.x2d.to(device, dtype).requires_grad_()
    res = bpnp.solve_pnp(x2d, p.x3d.to(device, dtype), p.K.to(device, dtype), p.weights.to(device, dtype))
    assert res.backend == ("native" if device.type == "cpu" and native_available() else "torch")
    for out in (res.pose, res.R, res.t, res.cost):
        assert out.device.type == device.type and out.dtype == dtype
    res.pose.sum().backward()
    assert x2d.grad.device.type == device.type and x2d.grad.dtype == dtype and torch.isfinite(x2d.grad).all()
    ref = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, backend="torch")
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert (res.pose.double().cpu() - ref.pose).abs().max() < tol
