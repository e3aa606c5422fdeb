"""The compiled CPU solver: same answers as the torch solver, a clean fallback without a compiler."""

import ctypes
import os
import subprocess
import sys

import pytest
import torch

import bpnp
import bpnp.solvers.native as native
from bpnp.geometry import rotmat_to_rvec, rvec_to_rotmat
from bpnp.solvers.pnp import solve_pnp_forward
from bpnp.synthetic import random_problems

needs_native = pytest.mark.skipif(
    not native.native_available(), reason=f"native solver: {native.native_unavailable_reason()}"
)


def test_native_builds_where_required():
    # CI sets BPNP_REQUIRE_NATIVE=1: there the fast path must not silently fall back.
    if os.environ.get("BPNP_REQUIRE_NATIVE") != "1":
        pytest.skip("BPNP_REQUIRE_NATIVE is not set")
    assert native.native_available(), native.native_unavailable_reason()


def thin(p, thickness):
    x3d = p.x3d * torch.tensor([1.0, 1.0, thickness], dtype=torch.float64)
    noise = torch.randn(p.x2d.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return p._replace(x3d=x3d, x2d=bpnp.project(x3d, p.pose, p.K) + noise)


CASES = {
    "3d-n4": lambda: random_problems(64, 4, seed=1),
    "3d-n30": lambda: random_problems(64, 30, seed=2),
    "planar-n6": lambda: random_problems(64, 6, planar=True, seed=3),
    "planar-n50": lambda: random_problems(64, 50, planar=True, seed=4),
    "thin-n12": lambda: thin(random_problems(64, 12, seed=5), 0.05),
}


@needs_native
@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
@pytest.mark.parametrize("case", list(CASES))
def test_native_matches_torch(case, shared):
    p = CASES[case]()
    x3d, K, w = p.x3d, p.K, p.weights
    if shared:  # one object, camera and weight vector for the whole batch
        x3d, K, w = x3d[:1], K[:1], w[:1]
        x2d = bpnp.project(x3d[0], p.pose, K[0]) + torch.randn(
            p.x2d.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)
        )
    else:
        x2d = p.x2d
    a = solve_pnp_forward(x2d, x3d, K, w)
    b = native.solve_pnp_native(x2d, x3d, K, w)
    # Never worse than the torch solver; where both found the same optimum, the same answer.
    assert (b.cost <= a.cost * (1 + 1e-9) + 1e-16).all(), (b.cost - a.cost).max()
    same = (a.cost - b.cost).abs() <= 1e-9 * a.cost + 1e-16
    assert same.float().mean() > 0.95
    assert (a.R[same] - b.R[same]).abs().max() < 1e-7
    assert ((a.t[same] - b.t[same]).norm(dim=-1) <= 1e-7 * a.t[same].norm(dim=-1)).all()
    hess_err = (a.hess[same] - b.hess[same]).flatten(1).norm(dim=-1) / a.hess[same].flatten(1).norm(dim=-1)
    assert hess_err.max() < 1e-6
    assert torch.equal(a.converged[same], b.converged[same])
    assert b.converged.all()
    assert (b.rvec - rotmat_to_rvec(b.R)).abs().max() < 1e-13


@needs_native
def test_native_warm_start_matches_torch():
    p = random_problems(32, 20, seed=6)
    init = p.pose + 0.02 * torch.randn(p.pose.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    R0, t0 = rvec_to_rotmat(init[:, :3]), init[:, 3:]
    for global_search in (False, True):
        options = bpnp.SolverOptions(global_search=global_search)
        a = solve_pnp_forward(p.x2d, p.x3d, p.K, p.weights, R0, t0, options)
        b = native.solve_pnp_native(p.x2d, p.x3d, p.K, p.weights, R0, t0, options)
        assert torch.allclose(a.cost, b.cost, rtol=1e-9)
        assert (a.R - b.R).abs().max() < 1e-7


@needs_native
def test_native_independent_of_thread_count():
    p = random_problems(300, 12, seed=7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = native.solve_pnp_native(p.x2d, p.x3d, p.K, p.weights)
        torch.set_num_threads(2)
        b = native.solve_pnp_native(p.x2d, p.x3d, p.K, p.weights)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.R, b.R) and torch.equal(a.cost, b.cost) and torch.equal(a.hess, b.hess)


@needs_native
def test_native_symmetric_eig():
    lib = native._load()
    P = ctypes.POINTER(ctypes.c_double)
    g = torch.Generator().manual_seed(0)
    for N in (3, 6, 9):
        for rank in (1, 2, N):
            F = torch.randn(N, rank, generator=g, dtype=torch.float64)
            A = (F @ F.T - 0.5 * torch.eye(N, dtype=torch.float64)).contiguous()
            V = torch.empty(N, N, dtype=torch.float64)
            ev = torch.empty(N, dtype=torch.float64)
            lib.bpnp_symmetric_eig(
                N, ctypes.cast(A.data_ptr(), P), ctypes.cast(V.data_ptr(), P), ctypes.cast(ev.data_ptr(), P)
            )
            scale = A.abs().max()
            assert (ev - torch.linalg.eigvalsh(A)).abs().max() < 1e-13 * scale
            assert (V @ torch.diag(ev) @ V.T - A).abs().max() < 1e-13 * scale
            assert (V.T @ V - torch.eye(N, dtype=torch.float64)).abs().max() < 1e-13


@needs_native
def test_symmetric_eig_in_lanes_gives_the_same_bits():
    # The layer's forward decomposes the Omegas of a chunk of problems side by side in SIMD lanes;
    # a problem's answer must not depend on its neighbours, so each lane must give exactly what
    # the one-matrix routine gives: for Omegas of real problems and for the awkward cases (zero
    # rows, repeated and zero eigenvalues, huge and tiny entries, NaN), in full and partial groups.
    lib = native._load()
    P = ctypes.POINTER(ctypes.c_double)
    g = torch.Generator().manual_seed(1)
    mats = []
    for rank in (0, 1, 2, 3, 5, 8, 9):
        F = torch.randn(9, rank, generator=g, dtype=torch.float64)
        mats.append(F @ F.T)
    mats.append(torch.diag(torch.tensor([3.0, 1, 1, 1, 0, 0, 2, 2, 5], dtype=torch.float64)))
    blocks = torch.zeros(9, 9, dtype=torch.float64)
    blocks[:3, :3] = mats[3][:3, :3]
    blocks[5:, 5:] = mats[6][5:, 5:]
    mats += [blocks, mats[6] * 1e150, mats[6] * 1e-150, mats[6].clone().fill_diagonal_(float("nan"))]
    for _ in range(20):
        F = torch.randn(9, 9, generator=g, dtype=torch.float64)
        mats.append(F + F.T)
    A = torch.stack(mats).contiguous()
    m = A.shape[0]

    def lanes(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        V, ev = torch.empty(B.shape[0], 9, 9, dtype=torch.float64), torch.empty(B.shape[0], 9, dtype=torch.float64)
        width = lib.bpnp_symmetric_eig9_lanes(
            B.shape[0], ctypes.cast(B.data_ptr(), P), ctypes.cast(V.data_ptr(), P), ctypes.cast(ev.data_ptr(), P)
        )
        return V, ev, width

    V, ev, width = lanes(A)
    for k in range(m):
        V1, ev1 = torch.empty(9, 9, dtype=torch.float64), torch.empty(9, dtype=torch.float64)
        lib.bpnp_symmetric_eig(
            9, ctypes.cast(A[k].data_ptr(), P), ctypes.cast(V1.data_ptr(), P), ctypes.cast(ev1.data_ptr(), P)
        )
        same = torch.equal(V1, V[k]) and torch.equal(ev1, ev[k])
        both_nan = V1.isnan().all() and V[k].isnan().all() and ev1.isnan().all() and ev[k].isnan().all()
        assert same or (k == 11 and both_nan), k
    # a partial group (fewer matrices than lanes) and another order of the neighbours
    for order in (torch.arange(3), torch.randperm(m, generator=g)[:width]):
        Vp, evp, _ = lanes(A[order].contiguous())
        assert torch.equal(torch.nan_to_num(Vp), torch.nan_to_num(V[order]))
        assert torch.equal(torch.nan_to_num(evp), torch.nan_to_num(ev[order]))
    scale = A[:11].abs().amax((1, 2))
    assert (
        (V[:11] @ torch.diag_embed(ev[:11]) @ V[:11].mT - A[:11]).abs().amax((1, 2)) <= 1e-13 * scale + 1e-300
    ).all()


@needs_native
@pytest.mark.parametrize("n", [10, 300])
def test_layer_forward_chunks_give_the_single_solves_bits(n):
    # The C forward prepares chunks of 8 problems and decomposes their Omegas in lanes (a chunk
    # with fewer than 4 one at a time; problems of more than 256 points always one at a time):
    # 11 mixed problems solved together equal each solved alone, bit for bit.
    solid = random_problems(5, n, noise=1.0, seed=11)
    planar = random_problems(6, n, planar=True, noise=1.0, seed=12)
    x2d, x3d, K = (torch.cat([getattr(solid, f), getattr(planar, f)]) for f in ("x2d", "x3d", "K"))
    together = bpnp.solve_pnp(x2d, x3d, K, backend="native")
    for b in range(x2d.shape[0]):
        alone = bpnp.solve_pnp(x2d[b : b + 1], x3d[b : b + 1], K[b : b + 1], backend="native")
        assert torch.equal(alone.pose[0], together.pose[b]) and torch.equal(alone.cost[0], together.cost[b]), b
    assert together.converged.all()


def _run_python(code: str, *args: str, timeout: float = 300, **env: str) -> str:
    full_env = {**os.environ, **env}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


DISABLED = """
import warnings, torch, bpnp
from bpnp.solvers.native import native_available, native_unavailable_reason
from bpnp.synthetic import random_problems
p = random_problems(8, 10, seed=0)
with warnings.catch_warnings():
    warnings.simplefilter("error")  # an explicit BPNP_NATIVE=0 is not warned about
    res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights)
ref = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, backend="torch")
assert res.backend == "torch" and torch.equal(res.pose, ref.pose) and res.converged.all()
try:
    bpnp.solve_pnp(p.x2d, p.x3d, p.K, backend="native")
    raise SystemExit("expected an error")
except bpnp.BackendUnavailableError as exc:
    assert "native" in str(exc)
print(native_available(), native_unavailable_reason())
"""


def test_disabled_native_uses_torch():
    out = _run_python(DISABLED, BPNP_NATIVE="0")
    assert out.strip() == "False disabled by BPNP_NATIVE=0"


@needs_native
def test_native_options_struct_matches():
    # The ctypes struct is generated from SolverOptions; the C layout is checked on load, and a
    # non-default option reaches the C solver (max_iter=1 stops it early).
    p = random_problems(16, 12, seed=3)
    full = native.solve_pnp_native(p.x2d, p.x3d, p.K, p.weights)
    short = native.solve_pnp_native(
        p.x2d, p.x3d, p.K, p.weights, options=bpnp.SolverOptions(max_iter=1)._tuned(screen_iter=0)
    )
    ref = solve_pnp_forward(p.x2d, p.x3d, p.K, p.weights, options=bpnp.SolverOptions(max_iter=1)._tuned(screen_iter=0))
    assert short.iterations == 1 and full.iterations > 1
    assert torch.allclose(short.cost, ref.cost, rtol=1e-9)


def test_backend_argument_checked():
    p = random_problems(2, 6, seed=0)
    with pytest.raises(bpnp.PnPInputError, match="backend"):
        bpnp.solve_pnp(p.x2d, p.x3d, p.K, backend="fast")
    with pytest.raises(bpnp.PnPInputError, match="backend"):
        bpnp.solve_pnp(p.x2d, p.x3d, p.K, backend="native", method="opencv")


@needs_native
def test_native_edge_inputs():
    # many points
    p = random_problems(3, 3000, seed=8)
    a = solve_pnp_forward(p.x2d, p.x3d, p.K, p.weights)
    b = native.solve_pnp_native(p.x2d, p.x3d, p.K, p.weights)
    assert torch.allclose(a.cost, b.cost, rtol=1e-10) and (a.R - b.R).abs().max() < 1e-9
    # zero weights drop points: the same answer as solving without them
    p = random_problems(16, 12, seed=9)
    w = p.weights.clone()
    w[:, ::2] = 0.0
    full = native.solve_pnp_native(p.x2d, p.x3d, p.K, w)
    kept = native.solve_pnp_native(p.x2d[:, 1::2], p.x3d[:, 1::2], p.K, w[:, 1::2])
    assert (full.R - kept.R).abs().max() < 1e-9 and torch.allclose(full.cost, kept.cost, rtol=1e-9)
    # non-contiguous views give the same answer as contiguous copies
    x2d_view = p.x2d.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x2d_view.is_contiguous()
    view = native.solve_pnp_native(x2d_view, p.x3d, p.K, p.weights)
    ref = native.solve_pnp_native(p.x2d, p.x3d, p.K, p.weights)
    assert torch.equal(view.R, ref.R) and torch.equal(view.cost, ref.cost)


BUILD_PROBE = """
import sys, torch
from bpnp.solvers.native import solve_pnp_native, native_build
from bpnp.synthetic import random_problems
assert native_build() == "pthreads", native_build()
torch.set_num_threads(2)
p = random_problems(200, 15, seed=12)
s = solve_pnp_native(p.x2d, p.x3d, p.K, p.weights)
torch.save({"R": s.R, "cost": s.cost, "hess": s.hess}, sys.argv[1])
"""


@needs_native
@pytest.mark.slow
def test_other_builds_agree(tmp_path):
    # The pthreads build (used where OpenMP is missing, e.g. Apple clang): the same answers.
    out = tmp_path / "out.pt"
    _run_python(BUILD_PROBE, str(out), timeout=600, BPNP_NATIVE_BUILD="pthreads")
    got = torch.load(out)
    p = random_problems(200, 15, seed=12)
    ref = native.solve_pnp_native(p.x2d, p.x3d, p.K, p.weights)
    assert (got["R"] - ref.R).abs().max() < 1e-10
    assert torch.allclose(got["cost"], ref.cost, rtol=1e-10)
    assert torch.allclose(got["hess"], ref.hess, rtol=1e-8, atol=1e-8 * ref.hess.abs().max())


AVX2_PROBE = """
import sys, torch
from bpnp.solvers import native
from bpnp.synthetic import random_problems
print(native.native_build(), native.native_unavailable_reason())
p = random_problems(200, 15, seed=12)
s = native.solve_pnp_native(p.x2d, p.x3d, p.K, p.weights)
torch.save({"R": s.R, "cost": s.cost}, sys.argv[1])
"""


@needs_native
@pytest.mark.skipif(native._library_path("_native_pnp_omp_avx2") is None, reason="no AVX2 build (not x86-64)")
def test_avx2_build_only_where_the_cpu_has_it(tmp_path):
    # Picked by default where PyTorch sees AVX2 (or AVX-512); with ATEN_CPU_CAPABILITY=default the
    # portable OpenMP build; asked for by name there, it is refused with the reason. Same answers.
    if native._cpu_has_avx2():
        assert native.native_build() == "openmp-avx2"
        ref = native.solve_pnp_native(
            *(getattr(random_problems(200, 15, seed=12), k) for k in ("x2d", "x3d", "K", "weights"))
        )
        out = tmp_path / "portable.pt"
        assert _run_python(AVX2_PROBE, str(out), BPNP_NATIVE_BUILD="openmp").split() == ["openmp", "None"]
        got = torch.load(out)
        assert (got["R"] - ref.R).abs().max() < 1e-10
        assert torch.allclose(got["cost"], ref.cost, rtol=1e-10)
    plain = _run_python(AVX2_PROBE, str(tmp_path / "plain.pt"), ATEN_CPU_CAPABILITY="default")
    assert plain.split() == ["openmp", "None"]
    code = "from bpnp.solvers import native; print(native.native_build(), '|', native.native_unavailable_reason())"
    refused = _run_python(code, ATEN_CPU_CAPABILITY="default", BPNP_NATIVE_BUILD="openmp-avx2")
    assert refused.strip() == "None | this CPU lacks AVX2 or FMA"


FORK_PROBE = """
import multiprocessing as mp, sys, torch, bpnp
from bpnp.synthetic import random_problems
torch.set_num_threads(2)
p = random_problems(256, 20, seed=0)
bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, backend="native")  # the parent's OpenMP pool is up

def child(q):
    r = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, backend="native")
    q.put(bool(r.converged.all()))

q = mp.get_context("fork").Queue()
proc = mp.get_context("fork").Process(target=child, args=(q,))
proc.start()
proc.join(120)
if proc.is_alive():
    proc.kill()
    sys.exit("the forked child hung")
print(proc.exitcode, q.get())
"""


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_native_in_forked_child():
    # libgomp's thread pool does not survive fork(): a child must not hang on it.
    assert _run_python(FORK_PROBE).split() == ["0", "True"]
