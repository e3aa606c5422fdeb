"""Pose-estimation metrics against direct computations."""

import math

import torch

import bpnp
from bpnp import metrics
from bpnp.synthetic import random_problems

F64 = torch.float64


def test_add_and_add_s():
    p = random_problems(4, 50, seed=0)
    model = p.x3d[0]
    assert torch.allclose(metrics.add(p.pose, p.pose, model), torch.zeros(4, dtype=F64))
    shifted = p.pose.clone()
    shifted[:, 3] += 0.25
    assert torch.allclose(metrics.add(shifted, p.pose, model), torch.full((4,), 0.25, dtype=F64))
    # A symmetric object: a cube's corners turned by 90 degrees about z are the same set.
    cube = torch.tensor([[x, y, z] for x in (-1.0, 1) for y in (-1.0, 1) for z in (-1.0, 1)], dtype=F64)
    turned = p.pose.clone()
    turned[:, :3] = bpnp.rotmat_to_rvec(
        bpnp.rvec_to_rotmat(p.pose[:, :3]) @ bpnp.rvec_to_rotmat(torch.tensor([0.0, 0, math.pi / 2], dtype=F64))
    )
    assert (metrics.add(turned, p.pose, cube) > 0.5).all()
    assert metrics.add_s(turned, p.pose, cube).abs().max() < 1e-12
    assert torch.allclose(metrics.add_s(shifted, p.pose, model, chunk=7), metrics.add_s(shifted, p.pose, model))


def test_projection_rotation_translation_errors():
    p = random_problems(3, 20, seed=1)
    other = p.pose.clone()
    other[:, :3] = bpnp.rotmat_to_rvec(
        bpnp.rvec_to_rotmat(torch.tensor([0.0, 0.0, 0.01], dtype=F64)) @ bpnp.rvec_to_rotmat(p.pose[:, :3])
    )
    assert torch.allclose(metrics.rotation_error_deg(other, p.pose), torch.full((3,), math.degrees(0.01), dtype=F64))
    assert torch.allclose(metrics.translation_error(other, p.pose), torch.zeros(3, dtype=F64))
    direct = (bpnp.project(p.x3d[0], other, p.K) - bpnp.project(p.x3d[0], p.pose, p.K)).norm(dim=-1).mean(-1)
    assert torch.allclose(metrics.projection_error(other, p.pose, p.x3d[0], p.K), direct)
    ok = metrics.cm_deg_accuracy(other, p.pose, cm=5, deg=5, unit_per_cm=0.01)  # poses in metres
    assert ok.all() and not metrics.cm_deg_accuracy(other, p.pose, deg=0.1, unit_per_cm=0.01).any()


def test_keypoint_scale_error_is_the_spread_about_the_centre_relative_to_the_truth():
    centre = torch.tensor([[50.0, 40.0], [0.0, 0.0]], dtype=F64)
    true = centre[:, None] + torch.tensor([[[10.0, 0.0], [0.0, -20.0], [-5.0, 5.0]]], dtype=F64)
    shrunk = centre[:, None] + 0.97 * (true - centre[:, None])
    assert torch.allclose(metrics.keypoint_scale_error(shrunk, true, centre), torch.full((2,), -0.03, dtype=F64))
    # An error across each radius is no change of scale, nor is a keypoint at the centre itself.
    offset = true - centre[:, None]
    across = torch.stack([-offset[..., 1], offset[..., 0]], -1) * 0.2
    at_centre = torch.cat([true, centre[:, None]], 1), torch.cat([shrunk, centre[:, None] + 4.0], 1)
    assert metrics.keypoint_scale_error(true + across, true, centre).abs().max() < 1e-12
    assert torch.allclose(
        metrics.keypoint_scale_error(at_centre[1], at_centre[0], centre), torch.full((2,), -0.03, dtype=F64)
    )
    assert metrics.keypoint_scale_error(true, true, centre).abs().max() == 0


def test_depth_and_lateral_error_split_the_translation_error_along_and_across_the_ray():
    true = torch.tensor([[0.1, 0.2, 0.3, 0.0, 0.0, 500.0], [0.0, 0.0, 0.0, 30.0, -40.0, 120.0]], dtype=F64)
    pred = true.clone()
    pred[0, 3:] += torch.tensor([3.0, -4.0, 12.0], dtype=F64)  # 12 deeper, 5 across
    ray = true[1, 3:] / true[1, 3:].norm()
    across = torch.linalg.cross(ray, torch.tensor([0.0, 0.0, 1.0], dtype=F64))
    pred[1, 3:] += -7.0 * ray + 2.0 * across / across.norm()  # 7 nearer, 2 across
    depth, lateral = metrics.depth_and_lateral_error(pred, true)
    assert torch.allclose(depth, torch.tensor([12.0, 7.0], dtype=F64))
    assert torch.allclose(lateral, torch.tensor([5.0, 2.0], dtype=F64))
    assert torch.allclose(depth**2 + lateral**2, metrics.translation_error(pred, true) ** 2)
    # Signed: > 0 when the estimate lies beyond the true position, < 0 when before it.
    signed, lateral_too = metrics.depth_and_lateral_error(pred, true, signed=True)
    assert torch.allclose(signed, torch.tensor([12.0, -7.0], dtype=F64)) and torch.equal(lateral_too, lateral)
    # A pure rotation moves neither.
    turned = true.clone()
    turned[:, :3] += 0.2
    assert metrics.depth_and_lateral_error(turned, true)[0].abs().max() == 0


def test_auc():
    errors = torch.tensor([0.0, 0.05, 0.2], dtype=F64)
    # accuracy: 1/3 on [0, 0.05), 2/3 on [0.05, 0.1]: area ~ (1/3 * 0.05 + 2/3 * 0.05) / 0.1 = 0.5
    assert abs(metrics.auc(errors, 0.1, steps=10000) - 0.5) < 1e-3
    assert metrics.auc(torch.zeros(5), 0.1) == 1.0
