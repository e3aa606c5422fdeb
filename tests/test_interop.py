"""Lens distortion in the projection and the OpenCV-style helpers, against OpenCV."""

import numpy as np
import pytest
import torch

import bpnp
from bpnp.synthetic import random_problems

cv2 = pytest.importorskip("cv2")
DIST = np.array([-0.28, 0.09, 0.001, -0.0008, -0.01])


def test_project_with_distortion_matches_opencv():
    p = random_problems(6, 30, seed=0)
    dist = torch.from_numpy(DIST)
    uv = bpnp.project(p.x3d, p.pose, p.K, dist)
    for i in range(6):
        ref, _ = cv2.projectPoints(p.x3d[i].numpy(), p.pose[i, :3].numpy(), p.pose[i, 3:].numpy(), p.K[i].numpy(), DIST)
        assert np.abs(uv[i].numpy() - ref.reshape(-1, 2)).max() < 1e-9
    # batched coefficients, one row per item
    batched = bpnp.project(p.x3d, p.pose, p.K, dist.expand(6, 5))
    assert torch.allclose(batched, uv, rtol=0, atol=1e-12)


def test_project_gradient_wrt_distortion():
    p = random_problems(2, 8, seed=1)
    dist = torch.from_numpy(DIST * 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda d: bpnp.project(p.x3d, p.pose, p.K, d), (dist,))


def test_undistort_inverts_distort():
    xn = torch.rand(3, 50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) - 0.5
    d = torch.from_numpy(DIST)
    assert (bpnp.undistort(bpnp.distort(xn, d), d) - xn).abs().max() < 1e-12
    with pytest.raises(ValueError, match="distortion"):
        bpnp.undistort(
            torch.full((1, 4, 2), 50.0, dtype=torch.float64), torch.tensor([5.0, 5.0, 0, 0, 5.0], dtype=torch.float64)
        )


def test_solvepnp_matches_opencv():
    p = random_problems(5, 20, noise=1.0, weighted=False, seed=2)
    for i in range(5):
        obj, img, K = p.x3d[i].numpy(), p.x2d[i].numpy(), p.K[i].numpy()
        ok, r, t = bpnp.interop.solvePnP(obj[:, None], img[:, None], K, None)
        _, r0, t0 = cv2.solvePnP(obj, img, K, None, flags=cv2.SOLVEPNP_SQPNP)
        r0, t0 = cv2.solvePnPRefineLM(
            obj, img, K, None, r0, t0, (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_COUNT, 200, 1e-15)
        )
        assert ok and r.shape == (3, 1) and t.shape == (3, 1)
        assert np.allclose(r, r0, atol=1e-6) and np.allclose(t, t0, rtol=1e-6, atol=1e-6)
        uv, _ = bpnp.interop.projectPoints(obj, r, t, K, None)
        ref, _ = cv2.projectPoints(obj, r, t, K, None)
        assert uv.shape == ref.shape and np.abs(uv - ref).max() < 1e-9


def test_solvepnp_with_distortion_minimises_the_distorted_error():
    p = random_problems(1, 30, noise=0.0, weighted=False, seed=3)
    obj, K = p.x3d[0].numpy(), p.K[0].numpy()
    img, _ = cv2.projectPoints(obj, p.pose[0, :3].numpy(), p.pose[0, 3:].numpy(), K, DIST)
    ok, r, t = bpnp.interop.solvePnP(obj, img, K, DIST)
    assert ok and np.allclose(np.r_[r.ravel(), t.ravel()], p.pose[0].numpy(), atol=1e-8)
    # with noise: OpenCV's LM refinement in distorted pixels reaches the same pose
    noisy = img + np.random.default_rng(0).normal(size=img.shape)
    ok, r, t = bpnp.interop.solvePnP(obj, noisy, K, DIST)
    _, r0, t0 = cv2.solvePnP(obj, noisy, K, DIST, flags=cv2.SOLVEPNP_SQPNP)
    crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_COUNT, 200, 1e-15)
    r0, t0 = cv2.solvePnPRefineLM(obj, noisy, K, DIST, r0, t0, crit)
    assert ok and np.allclose(r, r0, atol=1e-6) and np.allclose(t, t0, rtol=1e-6, atol=1e-6)
    with pytest.raises(bpnp.PnPInputError, match="distCoeffs"):
        bpnp.interop.solvePnP(obj, img, K, np.zeros(8) + 0.1)


@pytest.mark.parametrize("with_dist", [False, True])
def test_project_jacobian_matches_opencv(with_dist):
    p = random_problems(4, 12, seed=2)
    dist = torch.from_numpy(DIST) if with_dist else None
    pixels, J = bpnp.geometry.project_jacobian(p.x3d, p.pose, p.K, dist)
    assert torch.equal(pixels, bpnp.project(p.x3d, p.pose, p.K, dist))
    assert J.shape == (4, 12, 2, 15 if with_dist else 10)
    for i in range(4):
        _, ref = cv2.projectPoints(
            p.x3d[i].numpy(), p.pose[i, :3].numpy(), p.pose[i, 3:].numpy(), p.K[i].numpy(), DIST if with_dist else None
        )
        ref = ref.reshape(12, 2, -1)[..., : J.shape[-1]]  # OpenCV's column order: rvec, t, f, c, dist
        assert np.abs(J[i].numpy() - ref).max() < 1e-9 * np.abs(ref).max()


@pytest.mark.parametrize("angle", [0.0, 1e-7, 1e-4, 0.5, 3.1])
def test_project_jacobian_is_exact_near_the_identity(angle):
    # OpenCV's Rodrigues derivative is approximate near zero; autograd of project() is the reference.
    x3d = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    K = torch.tensor([[500.0, 2.0, 320.0], [0.0, 510.0, 240.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    axis = torch.tensor([0.6, -0.48, 0.64], dtype=torch.float64)
    pose = torch.cat([angle * axis, torch.tensor([0.1, -0.2, 6.0], dtype=torch.float64)])[None]
    dist = torch.from_numpy(DIST)
    _, J = bpnp.geometry.project_jacobian(x3d, pose, K, dist)

    def pixels(pose, fx, fy, cx, cy, d):
        cam = torch.stack([torch.stack([fx, K[0, 1], cx]), torch.stack([K[1, 0], fy, cy]), K[2]])
        return bpnp.project(x3d, pose, cam, d)

    args = (pose, K[0, 0], K[1, 1], K[0, 2], K[1, 2], dist)
    ref = torch.autograd.functional.jacobian(pixels, args)
    ref = torch.cat([ref[0][0, :, :, 0], *(r[0][..., None] for r in ref[1:5]), ref[5][0]], -1)
    assert (J[0] - ref).abs().max() <= 1e-13 * ref.abs().max()
