"""Forward: the global optimum, against OpenCV, in every problem."""

import numpy as np
import pytest
import torch

import bpnp
from bpnp.cost import cost_terms
from bpnp.geometry import rvec_to_rotmat
from bpnp.synthetic import random_problems

cv2 = pytest.importorskip("cv2")
from bpnp.solvers.opencv import OPENCV_FLAGS, opencv_poses  # noqa: E402
from bpnp.solvers.pnp import refine  # noqa: E402


def best_opencv_cost(p) -> torch.Tensor:
    """Lowest weighted cost among OpenCV's answers, each polished by our weighted LM."""
    best = torch.full((p.x2d.shape[0],), float("inf"), dtype=torch.float64)
    for flag in OPENCV_FLAGS:
        rvec, t = opencv_poses(p.x2d, p.x3d, p.K, flag)
        failed = ~torch.isfinite(rvec).all(-1)
        rvec = torch.nan_to_num(rvec)
        t = torch.where(failed[:, None], torch.tensor([0.0, 0.0, 5.0], dtype=t.dtype), t)
        out = refine(rvec_to_rotmat(rvec), t, p.x2d, p.x3d, p.K, p.weights)
        depth = cost_terms(*out.state, p.x2d, p.x3d, p.K, p.weights, hessian=False).min_depth
        ok = ~failed & (depth > 0) & torch.isfinite(out.cost)
        best = torch.minimum(best, torch.where(ok, out.cost, torch.full_like(out.cost, float("inf"))))
    return best


def check_global(ns, planar, per_group, seed0, thickness=1.0, backend="auto"):
    total = 0
    for n in ns:
        p = random_problems(per_group, n, planar=planar, seed=seed0 + n)
        if thickness != 1.0:  # a thin object: the box squashed along z, pixels re-generated
            x3d = p.x3d * torch.tensor([1.0, 1.0, thickness], dtype=torch.float64)
            noise = torch.randn(p.x2d.shape, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
            p = p._replace(x3d=x3d, x2d=bpnp.project(x3d, p.pose, p.K) + 1.5 * noise)
        res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, warn=False, backend=backend)
        best = best_opencv_cost(p)
        assert torch.isfinite(best).all()
        bad = res.cost > best * (1 + 1e-9) + 1e-16
        assert not bad.any(), f"n={n} planar={planar}: {res.cost[bad].tolist()} > {best[bad].tolist()}"
        assert res.converged.all()
        total += per_group
    return total


NS = [4, 5, 6, 7, 8, 10, 12, 15, 20, 30, 50, 100]


@pytest.mark.parametrize("planar", [False, True], ids=["3d", "planar"])
def test_global_optimum_vs_opencv(planar, backend):
    # 2 x 12 x 14 = 336 problems: noise 0-3 px, random weights, focal 300-1500 px.
    assert check_global(NS, planar, 14, seed0=100 + 1000 * planar, backend=backend) == 168


@pytest.mark.parametrize("thickness", [0.2, 0.05])
def test_global_optimum_thin_objects(thickness, backend):
    # Thin objects are where eigenvector starts alone miss optima (measured): 2 x 96 problems.
    check_global(NS[:8], False, 12, seed0=300, thickness=thickness, backend=backend)


@pytest.mark.slow
@pytest.mark.parametrize("planar", [False, True], ids=["3d", "planar"])
def test_global_optimum_vs_opencv_many(planar, backend):
    check_global(NS, planar, 80, seed0=5000 + 1000 * planar, backend=backend)


@pytest.mark.slow
@pytest.mark.parametrize("thickness", [0.4, 0.2, 0.1, 0.03])
def test_global_optimum_thin_objects_many(thickness, backend):
    check_global(NS, False, 80, seed0=7000, thickness=thickness, backend=backend)


def test_noise_free_recovers_truth():
    p = random_problems(32, 6, noise=0.0, seed=1)
    res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights)
    R_true = rvec_to_rotmat(p.pose[:, :3])
    assert (res.R - R_true).abs().max() < 1e-9
    assert ((res.t - p.pose[:, 3:]).norm(dim=-1) / p.pose[:, 3:].norm(dim=-1)).max() < 1e-9
    assert res.cost.max() < 1e-12


def test_matches_opencv_pose_unweighted():
    p = random_problems(16, 20, noise=1.0, weighted=False, seed=2)
    res = bpnp.solve_pnp(p.x2d, p.x3d, p.K)
    for i in range(16):
        ok, r, t = cv2.solvePnP(p.x3d[i].numpy(), p.x2d[i].numpy(), p.K[i].numpy(), None, flags=cv2.SOLVEPNP_SQPNP)
        r, t = cv2.solvePnPRefineLM(
            p.x3d[i].numpy(),
            p.x2d[i].numpy(),
            p.K[i].numpy(),
            None,
            r,
            t,
            (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_COUNT, 200, 1e-15),
        )
        assert np.allclose(res.pose[i, :3].numpy(), r.ravel(), atol=1e-6)
        assert np.allclose(res.pose[i, 3:].numpy(), t.ravel(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "batched"])
@pytest.mark.parametrize("planar", [False, True], ids=["3d", "planar"])
def test_dtype_and_sharing(dtype, shared, planar):
    p = random_problems(8, 10, planar=planar, noise=1.0, seed=3)
    x3d = p.x3d[0] if shared else p.x3d
    K = p.K[0] if shared else p.K
    x2d = bpnp.project(x3d, p.pose, K) + 0.5 * torch.randn(
        8, 10, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    res = bpnp.solve_pnp(x2d.to(dtype), x3d.to(dtype), K.to(dtype), p.weights.to(dtype))
    assert res.pose.dtype == dtype and res.cost.dtype == dtype and res.R.dtype == dtype
    # float32 in, float64-quality optimum out: only the final rounding to float32 differs.
    cost32 = cost_terms(
        rvec_to_rotmat(res.pose[:, :3].double()),
        res.pose[:, 3:].double(),
        x2d.to(dtype).double(),
        x3d.to(dtype).double().expand(8, 10, 3),
        K.to(dtype).double().expand(8, 3, 3),
        p.weights.to(dtype).double(),
        hessian=False,
    ).cost
    ref32 = bpnp.solve_pnp(
        x2d.to(dtype).double(), x3d.to(dtype).double(), K.to(dtype).double(), p.weights.to(dtype).double()
    ).cost
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert ((cost32 - ref32) / ref32).abs().max() < tol
    assert res.converged.all()


def test_unbatched_and_module():
    p = random_problems(1, 9, seed=4)
    res = bpnp.solve_pnp(p.x2d[0], p.x3d[0], p.K[0], p.weights[0])
    assert res.pose.shape == (6,) and res.R.shape == (3, 3) and res.cost.shape == ()
    layer = bpnp.BPnP()
    pose = layer(p.x2d, p.x3d[0], p.K[0])
    assert pose.shape == (1, 6)
    assert "method" in repr(layer)


def test_init_pose_does_not_change_answer():
    p = random_problems(16, 8, noise=2.0, seed=6)
    ref = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights)
    bad_init = torch.cat([torch.randn(16, 3, dtype=torch.float64), p.pose[:, 3:] * 2], -1)
    for init in (p.pose, bad_init, ref.pose):
        res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, init_pose=init)
        assert torch.allclose(res.pose, ref.pose, atol=1e-9)


def test_weights_zero_drop_points():
    p = random_problems(4, 10, seed=7)
    w = p.weights.clone()
    w[:, 6:] = 0.0
    x2d = p.x2d.clone()
    x2d[:, 6:] += 500.0  # outliers with zero weight must not matter
    a = bpnp.solve_pnp(x2d, p.x3d, p.K, w)
    b = bpnp.solve_pnp(p.x2d[:, :6], p.x3d[:, :6], p.K, p.weights[:, :6])
    assert torch.allclose(a.pose, b.pose, atol=1e-9)


def test_opencv_method():
    p = random_problems(6, 12, seed=8)
    a = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights)
    b = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, method="opencv")
    assert torch.allclose(a.cost, b.cost, rtol=1e-9)
    x2d = p.x2d.clone().requires_grad_()
    bpnp.solve_pnp(x2d, p.x3d, p.K, method="opencv").pose.sum().backward()
    assert torch.isfinite(x2d.grad).all()


def test_project_matches_opencv_and_camera_matrix():
    p = random_problems(3, 7, seed=9)
    uv = bpnp.project(p.x3d, p.pose, p.K)
    for i in range(3):
        ref, _ = cv2.projectPoints(p.x3d[i].numpy(), p.pose[i, :3].numpy(), p.pose[i, 3:].numpy(), p.K[i].numpy(), None)
        assert np.allclose(uv[i].numpy(), ref[:, 0], atol=1e-9)
    K = p.K.clone()
    K[:, 0, 1] = 1.5
    K = K * 2.0  # K[2,2] != 1 is the same camera
    xcam = bpnp.transform_points(p.x3d, bpnp.rvec_to_rotmat(p.pose[:, :3]), p.pose[:, 3:])
    hom = xcam @ K.transpose(-1, -2)
    assert torch.allclose(bpnp.project(p.x3d, p.pose, K), hom[..., :2] / hom[..., 2:], atol=1e-10)


def test_warm_start_local_refinement_matches_global(backend):
    p = random_problems(8, 12, noise=1.0, seed=10)
    ref = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, backend=backend)
    near = ref.pose + 0.01 * torch.randn(8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    local = bpnp.SolverOptions(global_search=False)
    loc = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, init_pose=near, backend=backend, options=local)
    assert torch.allclose(loc.pose, ref.pose, atol=1e-9) and loc.converged.all()
    # The module is stateless: the warm start is explicit, per item.
    layer = bpnp.BPnP(options=local, backend=backend)
    first = layer(p.x2d, p.x3d, p.K, p.weights)
    second = layer(p.x2d + 0.01, p.x3d, p.K, p.weights, init_pose=first.detach())
    assert torch.allclose(first, ref.pose, atol=1e-9)
    assert (second - first).abs().max() < 1e-2


def test_check_every_does_not_change_answer():
    # check_every thins the torch solver's host checks (GPU synchronisations).
    p = random_problems(16, 10, seed=11)
    a = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, backend="torch")
    b = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights, backend="torch", options=bpnp.SolverOptions(check_every=5))
    assert torch.allclose(a.pose, b.pose, atol=1e-10) and b.converged.all()


def test_closed_form_3x3_solve_matches_lapack_and_flags_indefinite_systems():
    from bpnp.solvers.candidates import _solve3_spd

    g = torch.Generator().manual_seed(4)
    M = torch.randn(2, 50, 3, 3, dtype=torch.float64, generator=g)
    A = M @ M.transpose(-1, -2) + 0.1 * torch.eye(3, dtype=torch.float64)
    A[1, ::2] -= 5.0 * torch.eye(3, dtype=torch.float64)  # every other one indefinite
    rhs = torch.randn(2, 50, 3, dtype=torch.float64, generator=g)
    x, pd = _solve3_spd(A, rhs)
    definite = torch.linalg.eigvalsh(A)[..., 0] > 0
    assert torch.equal(pd, definite) and not bool(pd[1, ::2].any())
    ref = torch.linalg.solve(A, rhs[..., None])[..., 0]
    assert torch.allclose(x[pd], ref[pd], rtol=1e-9, atol=1e-12)
    assert torch.equal(x[~pd], torch.zeros_like(x[~pd]))  # no step where A is not positive definite


def test_rotate_by_equals_rodrigues_times_rotation():
    # The solvers' update exp([v]_x) R in few kernels (sinc-based coefficients) against
    # rvec_to_rotmat's Taylor-guarded ones, from v = 0 to angles near pi.
    from bpnp.geometry import rotate_by

    g = torch.Generator().manual_seed(5)
    R = bpnp.rvec_to_rotmat(torch.randn(40, 3, dtype=torch.float64, generator=g))
    for scale in (0.0, 1e-12, 1e-6, 1e-4, 1e-2, 1.0, 3.0):
        v = scale * torch.randn(40, 3, dtype=torch.float64, generator=g)
        expected = bpnp.rvec_to_rotmat(v) @ R
        assert (rotate_by(v, R) - expected).abs().max() < 4e-15, scale


def test_a_converged_answer_wins_a_rounding_tie():
    # A run cut off at max_iter can end an ulp below the converged runs at the same minimum
    # (stress set outliers10, seed 1, item 178, in the -fwrapv build): the converged one wins the
    # tie, a genuinely lower cost still wins, and so does the first lowest without a converged tie.
    from bpnp.solvers.pnp import _replaces, _winner

    one = torch.tensor(1.0, dtype=torch.float64)
    below = torch.nextafter(one, torch.tensor(0.0, dtype=torch.float64))
    cost = torch.stack([one, below, one - 1e-9, one, below, torch.tensor(torch.inf, dtype=torch.float64)])
    converged = torch.tensor([True, False, False, False, False, False])
    item = torch.tensor([0, 0, 1, 1, 2, 2])
    # problem 0: the converged tie; 1: a lower cost beyond rounding; 2: no converged answer
    assert _winner(cost, converged, item, 3).tolist() == [0, 2, 4]
    old = [None, None, one.repeat(2), None, torch.tensor([True, False])]
    new = [None, None, below.repeat(2), None, torch.tensor([False, True])]
    assert _replaces(old[2], old[4], new).tolist() == [False, True]
    assert _replaces(new[2], new[4], old).tolist() == [True, False]
