"""Calibration through the layer: the residuals' Jacobian (poses' dependence included) and the fit."""

import pytest
import torch

from bpnp import calibration as calib
from bpnp.geometry import project

pytest.importorskip("cv2")


def _boards(distortion: bool, noise: float = 0.3):
    """Six views of a 9x6 board, detections with pixel noise: a fit whose residuals are not zero,
    so the poses' dependence on the camera matters."""
    g = torch.Generator().manual_seed(0)
    x3d = torch.from_numpy(calib.board_points((9, 6), 0.03))
    rvec = 0.4 * (torch.rand(6, 3, generator=g, dtype=torch.float64) - 0.5)
    t = torch.tensor([-0.12, -0.08, 0.5], dtype=torch.float64) + 0.05 * torch.rand(
        6, 3, generator=g, dtype=torch.float64
    )
    params = torch.tensor([600.0, 590.0, 320.0, 240.0], dtype=torch.float64)
    if distortion:
        params = torch.cat([params, torch.tensor([-0.2, 0.08, 0.001, -0.002, 0.01], dtype=torch.float64)])
    x2d = calib.reproject(x3d, torch.cat([rvec, t], -1), params)
    return x2d + noise * torch.randn(x2d.shape, generator=g, dtype=torch.float64), x3d, params


@pytest.mark.parametrize("distortion", [False, True])
def test_camera_jacobian_is_the_total_derivative(distortion):
    x2d, x3d, params = _boards(distortion)
    params = params * 1.01  # off the optimum
    residuals, poses, J = calib.camera_residuals(x2d, x3d, params)
    assert torch.allclose(residuals, calib.reproject(x3d, poses, params) - x2d, rtol=0, atol=1e-12)
    # Central differences of the residuals, each side with the layer's poses solved afresh.
    units = calib.parameter_units(x2d, params)
    fd = []
    for k in range(params.numel()):
        h = torch.zeros_like(params)
        h[k] = 1e-6 * units[k]
        up, _, _ = calib.camera_residuals(x2d, x3d, params + h, jacobian=False)
        down, _, _ = calib.camera_residuals(x2d, x3d, params - h, jacobian=False)
        fd.append(((up - down) / (2 * h[k])).flatten())
    fd = torch.stack(fd, -1)
    scaled = (J - fd) * units
    assert scaled.abs().max() <= 1e-6 * (fd * units).abs().max()
    # The poses' term is not negligible: the camera's own columns alone are far off.
    _, J_fixed_pose = project_jacobian_of(x3d, poses, params)
    assert ((J_fixed_pose - fd) * units).abs().max() > 1e-2 * (fd * units).abs().max()


def project_jacobian_of(x3d, poses, params):
    from bpnp.geometry import project_jacobian

    p = params.numel()
    pixels, J = project_jacobian(x3d, poses, calib.camera_from_params(params[:4]), params[4:] if p > 4 else None)
    return pixels, J[..., 6 : 6 + p].reshape(-1, p)


@pytest.mark.parametrize("distortion", [False, True])
def test_fit_reaches_the_noise_free_camera(distortion):
    x2d, x3d, truth = _boards(distortion, noise=0.0)
    start = truth[:4] * torch.tensor([1.15, 0.9, 1.05, 0.95], dtype=torch.float64)
    fit = calib.fit_camera(x2d, x3d, start, distortion, quiet=True)
    assert ((fit.params - truth).abs() / torch.cat([truth[:4], torch.ones(truth.numel() - 4)])).max() < 1e-7
    assert fit.losses[-1] < 1e-16
    assert fit.losses == sorted(fit.losses, reverse=True)  # accepted steps only lower the loss
    assert torch.allclose(project(x3d, fit.poses, calib.camera_from_params(fit.params[:4]),
                                  fit.params[4:] if distortion else None), x2d, rtol=0, atol=1e-6)  # fmt: skip
