"""Rotations, rigid transforms and the pinhole projection.

Conventions (OpenCV): a pose is ``[rvec, t]`` of shape ``(..., 6)``; a point ``X`` of the
object maps to the camera frame as ``R(rvec) @ X + t``; ``K`` is an upper-triangular camera
matrix and a camera-frame point ``P`` projects to ``(K P)[:2] / (K P)[2]``.

All functions accept arbitrary leading batch dimensions and are differentiable.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "skew",
    "rvec_to_rotmat",
    "rotmat_to_rvec",
    "rotmat_to_quaternion",
    "quaternion_to_rotmat",
    "transform_points",
    "project_points",
    "project",
    "project_jacobian",
    "pose_to_Rt",
    "Rt_to_pose",
    "distort",
    "distort_jacobian",
    "undistort",
    "undistort_points",
    "undistort_pixels",
]


def skew(v: Tensor) -> Tensor:
    """Cross-product matrix.

    Args:
        v: ``(..., 3)`` vectors.
    Returns:
        ``(..., 3, 3)`` matrices ``[v]_x`` with ``[v]_x @ u == cross(v, u)``.
    """
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v.unbind(-1)
    return torch.stack(
        [
            torch.stack([zero, -z, y], -1),
            torch.stack([z, zero, -x], -1),
            torch.stack([-y, x, zero], -1),
        ],
        -2,
    )


def rvec_to_rotmat(rvec: Tensor) -> Tensor:
    """Rodrigues' formula: rotation vector to rotation matrix.

    Stable at and near ``rvec = 0`` including its first and second derivatives: below
    ``|rvec| = 1e-4`` the coefficients use their Taylor series in ``|rvec|^2``, which is smooth,
    so autograd (and the exact Hessian built on it) stays exact at the identity.

    Args:
        rvec: ``(..., 3)`` axis * angle (radians).
    Returns:
        ``(..., 3, 3)`` rotation matrices.
    """
    theta2 = (rvec * rvec).sum(-1)
    small = theta2 < 1e-8
    # The where-trick: the unused branch must see a harmless value, or its NaN gradient leaks.
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    half = 0.5 * theta
    # sin(t)/t and (1-cos t)/t^2 = 2 sin^2(t/2)/t^2 (no cancellation for small t).
    a_big = torch.sin(theta) / theta
    b_big = 2.0 * (torch.sin(half) / theta) ** 2
    a_small = 1.0 - theta2 / 6.0 + theta2 * theta2 / 120.0
    b_small = 0.5 - theta2 / 24.0 + theta2 * theta2 / 720.0
    a = torch.where(small, a_small, a_big)[..., None, None]
    b = torch.where(small, b_small, b_big)[..., None, None]
    k = skew(rvec)
    eye = torch.eye(3, dtype=rvec.dtype, device=rvec.device).expand(k.shape)
    return eye + a * k + b * (k @ k)


def rotate_by(rvec: Tensor, R: Tensor) -> Tensor:
    """``rvec_to_rotmat(rvec) @ R`` in ten tensor operations, for the solvers' updates.

    Rodrigues' coefficients ``sin(t)/t`` and ``(1 - cos t)/t^2 = sinc(t/2)^2 / 2`` come from
    :func:`torch.sinc`, exact at ``t = 0``; the values equal :func:`rvec_to_rotmat`'s to rounding,
    but second derivatives through it at ``rvec = 0`` are not smooth (use :func:`rvec_to_rotmat`
    where autograd differentiates twice).

    Args:
        rvec: ``(..., 3)``; R: ``(..., 3, 3)`` (broadcast against each other).
    Returns:
        ``(..., 3, 3)``.
    """
    generators, scales, powers = _rodrigues_constants(rvec.dtype, rvec.device)
    sincs = torch.sinc(torch.linalg.vector_norm(rvec, dim=-1, keepdim=True) * scales)
    coef = sincs.pow(powers) / powers  # (sin t / t, (1 - cos t) / t^2)
    k = (rvec @ generators).unflatten(-1, (3, 3))  # [rvec]_x
    kR = k @ R
    return torch.addcmul(torch.addcmul(R, coef[..., :1, None], kR), coef[..., 1:, None], k @ kR)


@functools.cache
def _rodrigues_constants(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`rotate_by`'s constants on ``device`` (made once): the ``(3, 9)`` map of a vector to
    its flattened cross-product matrix, the sinc arguments' scales ``(1/pi, 1/(2 pi))`` per unit
    angle, and the powers ``(1, 2)`` (their inverses are also the coefficients' factors)."""
    generators = skew(torch.eye(3, dtype=dtype, device=device))  # [e_k]_x
    scales = torch.tensor([1.0 / math.pi, 0.5 / math.pi], dtype=dtype, device=device)
    powers = torch.tensor([1.0, 2.0], dtype=dtype, device=device)
    return generators.reshape(3, 9), scales, powers


def rotmat_to_quaternion(R: Tensor) -> Tensor:
    """Rotation matrix to unit quaternion ``(w, x, y, z)`` with ``w >= 0``.

    Shepperd's method: of the four algebraically equal formulas the one with the largest
    pivot is used per item, so the result is accurate for every rotation, 180 degrees included.

    Args:
        R: ``(..., 3, 3)`` rotation matrices.
    Returns:
        ``(..., 4)`` quaternions.
    """
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    trace = m00 + m11 + m22
    pivots = torch.stack([trace, m00, m11, m22], -1)
    # Each candidate is 4 * q * q_pivot; normalising divides the common factor away.
    cand = torch.stack(
        [
            torch.stack([1 + trace, m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, 1 + m00 - m11 - m22, m01 + m10, m02 + m20], -1),
            torch.stack([m02 - m20, m01 + m10, 1 - m00 + m11 - m22, m12 + m21], -1),
            torch.stack([m10 - m01, m02 + m20, m12 + m21, 1 - m00 - m11 + m22], -1),
        ],
        -2,
    )  # ...x4x4
    idx = pivots.argmax(-1)
    q = torch.gather(cand, -2, idx[..., None, None].expand(*idx.shape, 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_to_rotmat(q: Tensor) -> Tensor:
    """Unit quaternion ``(w, x, y, z)`` ``(..., 4)`` to rotation matrix ``(..., 3, 3)``.

    The quaternion is normalised first, so any non-zero 4-vector gives a rotation.
    """
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def rotmat_to_rvec(R: Tensor) -> Tensor:
    """Rotation matrix to rotation vector with angle in ``[0, pi]`` (OpenCV's ``Rodrigues``).

    Args:
        R: ``(..., 3, 3)`` rotation matrices.
    Returns:
        ``(..., 3)`` rotation vectors.
    """
    q = rotmat_to_quaternion(R)
    w, v = q[..., 0], q[..., 1:]
    n = v.norm(dim=-1)
    small = n < 1e-6
    n_safe = torch.where(small, torch.ones_like(n), n)
    scale_big = 2.0 * torch.atan2(n_safe, w) / n_safe
    # 2 atan(n/w)/n = (2/w)(1 - n^2/(3 w^2) + ...), with w ~ 1 here.
    scale_small = (2.0 / w) * (1.0 - n * n / (3.0 * w * w))
    return torch.where(small, scale_small, scale_big)[..., None] * v


def transform_points(x3d: Tensor, R: Tensor, t: Tensor) -> Tensor:
    """Object points to the camera frame.

    Args:
        x3d: ``(..., n, 3)`` points.
        R: ``(..., 3, 3)`` rotations.
        t: ``(..., 3)`` translations.
    Returns:
        ``(..., n, 3)`` points ``R @ X + t``.
    """
    return x3d @ R.transpose(-1, -2) + t[..., None, :]


def project_points(xcam: Tensor, K: Tensor) -> Tensor:
    """Pinhole projection of camera-frame points.

    Args:
        xcam: ``(..., n, 3)`` camera-frame points.
        K: ``(..., 3, 3)`` upper-triangular camera matrices.
    Returns:
        ``(..., n, 2)`` pixel coordinates ``(K P)[:2] / (K P)[2]``.
    """
    a = xcam[..., 0] / xcam[..., 2]
    b = xcam[..., 1] / xcam[..., 2]
    k = K[..., None, :, :]  # ...x1x3x3, broadcast over points
    k22 = k[..., 2, 2]
    u = (k[..., 0, 0] * a + k[..., 0, 1] * b + k[..., 0, 2]) / k22
    v = (k[..., 1, 1] * b + k[..., 1, 2]) / k22
    return torch.stack([u, v], -1)


def pose_to_Rt(pose: Tensor) -> tuple[Tensor, Tensor]:
    """Split a pose ``(..., 6)`` into ``R (..., 3, 3)`` and ``t (..., 3)``."""
    return rvec_to_rotmat(pose[..., :3]), pose[..., 3:]


def Rt_to_pose(R: Tensor, t: Tensor) -> Tensor:
    """Join ``R (..., 3, 3)`` and ``t (..., 3)`` into a pose ``(..., 6)``."""
    return torch.cat([rotmat_to_rvec(R), t], -1)


def _coefficients(dist: Tensor) -> tuple[Tensor, ...]:
    """``k1, k2, p1, p2, k3`` of ``(5,)`` (scalars) or ``(B, 5)`` (each ``(B, 1)``) coefficients."""
    if dist.shape[-1] != 5 or dist.dim() not in (1, 2):
        raise ValueError(f"dist: expected shape (5,) or (B, 5) = (k1, k2, p1, p2, k3), got {tuple(dist.shape)}")
    if dist.dim() == 1:  # shared: scalars broadcast against any leading shape
        return tuple(dist[k] for k in range(5))
    return tuple(dist[:, k : k + 1] for k in range(5))  # (B, 1) against (B, n)


def distort(xn: Tensor, dist: Tensor) -> Tensor:
    """OpenCV's radial-tangential lens model on normalised image coordinates; differentiable.

    Args:
        xn: ``(n, 2)`` or ``(B, n, 2)`` undistorted normalised coordinates ``(X/Z, Y/Z)``.
        dist: ``(5,)`` or ``(B, 5)`` coefficients ``(k1, k2, p1, p2, k3)``.
    Returns:
        Distorted normalised coordinates, the shape of ``xn``.
    """
    k1, k2, p1, p2, k3 = _coefficients(dist)
    x, y = xn[..., 0], xn[..., 1]
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2 + k3 * r2 * r2 * r2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return torch.stack([xd, yd], -1)


def distort_jacobian(xn: Tensor, dist: Tensor) -> Tensor:
    """``(..., 2, 2)`` Jacobian of :func:`distort` with respect to ``xn``."""
    k1, k2, p1, p2, k3 = _coefficients(dist)
    x, y = xn[..., 0], xn[..., 1]
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2 + k3 * r2 * r2 * r2
    dradial = k1 + 2 * k2 * r2 + 3 * k3 * r2 * r2  # d radial / d r2
    cross = 2 * x * y * dradial + 2 * p1 * x + 2 * p2 * y
    return torch.stack(
        [
            torch.stack([radial + 2 * x * x * dradial + 2 * p1 * y + 6 * p2 * x, cross], -1),
            torch.stack([cross, radial + 2 * y * y * dradial + 6 * p1 * y + 2 * p2 * x], -1),
        ],
        -2,
    )


def undistort(xd: Tensor, dist: Tensor, iters: int = 20, tol: float = 1e-13) -> Tensor:
    """Invert :func:`distort` by Newton's method from ``xd`` (differentiable).

    Args:
        xd: distorted normalised coordinates ``(n, 2)`` or ``(B, n, 2)``; dist: as in :func:`distort`;
        iters: Newton steps at most; tol: the largest residual accepted (normalised units).
    Raises:
        ValueError: when the iteration does not reach ``tol`` at some point (coefficients not
            invertible there); :func:`undistort_points` marks such points instead.
    """
    xn, ok = undistort_points(xd, dist, iters, tol)
    if not bool(ok.all()):
        raise ValueError("distortion: the coefficients cannot be inverted at these points")
    return xn


def _native_undistortion(xd: Tensor, dist: Tensor, iters: int, tol: float) -> bool:
    """Whether the C solver's copy of the iteration below can answer (CPU, no gradient, the
    default steps and tolerance, one row of dist per batch item or one for all)."""
    if iters != 20 or tol != 1e-13 or xd.device.type != "cpu" or dist.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (xd.requires_grad or dist.requires_grad):
        return False
    shared = dist.dim() == 1 and dist.shape[0] == 5
    per_item = dist.dim() == 2 and dist.shape[1] == 5 and xd.dim() == 3 and dist.shape[0] == xd.shape[0]
    if not (shared or per_item):
        return False
    from .solvers.native import native_available

    return native_available()


def undistort_points(xd: Tensor, dist: Tensor, iters: int = 20, tol: float = 1e-13) -> tuple[Tensor, Tensor]:
    """Invert :func:`distort` point by point: Newton's method from ``xd``, each point frozen once
    its residual is below ``tol`` (so a point's answer does not depend on the others).

    Args:
        xd: distorted normalised coordinates ``(..., n, 2)``; dist: as in :func:`distort`;
        iters: Newton steps at most; tol: the largest residual accepted (normalised units).
    Returns:
        ``xn (..., n, 2)`` (``xd`` itself where no inverse was found) and ``ok (..., n)`` bool.
    """
    if _native_undistortion(xd, dist, iters, tol):
        from .solvers.native import undistort_points_native

        xn, ok = undistort_points_native(xd, dist)
        return xn.to(xd.dtype), ok
    xn = xd
    done = torch.zeros(xd.shape[:-1], dtype=torch.bool, device=xd.device)
    for _ in range(iters):
        r = distort(xn, dist) - xd
        done = done | (r.detach().abs().amax(-1) <= tol)
        if bool(done.all()):
            break
        # The 2x2 Newton step in closed form: a singular Jacobian (the model's fold) gives a
        # non-finite step, and that point stays where it is, unlike a batched solve that raises.
        J = distort_jacobian(xn, dist)
        det = J[..., 0, 0] * J[..., 1, 1] - J[..., 0, 1] * J[..., 1, 0]
        step = (
            torch.stack(
                [
                    J[..., 1, 1] * r[..., 0] - J[..., 0, 1] * r[..., 1],
                    J[..., 0, 0] * r[..., 1] - J[..., 1, 0] * r[..., 0],
                ],
                -1,
            )
            / det[..., None]
        )
        moved = xn - step
        xn = torch.where(done[..., None] | ~torch.isfinite(moved), xn, moved)
    r = distort(xn, dist) - xd
    ok = torch.isfinite(r).all(-1) & (r.detach().abs().amax(-1) <= tol)
    return torch.where(ok[..., None], xn, xd), ok


def undistort_pixels(x2d: Tensor, K: Tensor, dist: Tensor) -> Tensor:
    """Pixels with the lens distortion removed (the pixels a pinhole camera ``K`` would see).

    Args:
        x2d: ``(n, 2)`` or ``(B, n, 2)`` distorted pixels; K: ``(3, 3)`` upper-triangular camera
        matrix; dist: as in :func:`distort`.
    Raises:
        ValueError: as :func:`undistort`.
    """
    A = K[:2, :2] / K[2, 2]  # focal lengths and skew
    c = K[:2, 2] / K[2, 2]
    xn = undistort((x2d - c) @ torch.linalg.inv(A).transpose(-1, -2), dist)
    return xn @ A.transpose(-1, -2) + c


def project(x3d: Tensor, pose: Tensor, K: Tensor, dist: Tensor | None = None) -> Tensor:
    """Project object points with a pose, a camera matrix and (optionally) lens distortion;
    differentiable in all inputs. Agrees with ``cv2.projectPoints``.

    Args:
        x3d: ``(n, 3)`` shared or ``(B, n, 3)`` object points.
        pose: ``(6,)`` or ``(B, 6)`` poses ``[rvec, t]``.
        K: ``(3, 3)`` or ``(B, 3, 3)`` camera matrices.
        dist: ``(5,)`` or ``(B, 5)`` OpenCV coefficients ``(k1, k2, p1, p2, k3)``, or None.
    Returns:
        ``(B, n, 2)`` pixels, or ``(n, 2)`` when ``pose`` is unbatched.
    """
    if pose.dim() not in (1, 2) or pose.shape[-1] != 6:
        raise ValueError(f"pose: expected shape (6,) or (B, 6), got {tuple(pose.shape)}")
    if x3d.dim() not in (2, 3) or x3d.shape[-1] != 3:
        raise ValueError(f"x3d: expected shape (n, 3) or (B, n, 3), got {tuple(x3d.shape)}")
    if K.shape[-2:] != (3, 3) or K.dim() not in (2, 3):
        raise ValueError(f"K: expected shape (3, 3) or (B, 3, 3), got {tuple(K.shape)}")
    unbatched = pose.dim() == 1
    p = pose[None] if unbatched else pose
    R, t = pose_to_Rt(p)
    xcam = transform_points(x3d, R, t)
    Kb = K if K.dim() == 3 else K[None]
    if dist is None:
        out = project_points(xcam, Kb)
    else:
        xn = distort(xcam[..., :2] / xcam[..., 2:], dist)
        hom = torch.cat([xn, torch.ones_like(xn[..., :1])], -1)
        uvw = hom @ Kb.transpose(-1, -2)
        out = uvw[..., :2] / uvw[..., 2:]
    return out[0] if unbatched else out


def _rotation_left_jacobian(rvec: Tensor) -> Tensor:
    """``(..., 3, 3)`` left Jacobian of SO(3): ``R(r + d) = exp([J_l(r) d]_x) R(r)`` to first order.
    Its coefficients use their Taylor series near ``r = 0``, as :func:`rvec_to_rotmat` does."""
    theta2 = (rvec * rvec).sum(-1)
    small = theta2 < 1e-8
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    # (1 - cos t)/t^2 and (t - sin t)/t^3
    b = torch.where(small, 0.5 - theta2 / 24.0 + theta2 * theta2 / 720.0, 2.0 * (torch.sin(0.5 * theta) / theta) ** 2)
    c = torch.where(
        small, 1.0 / 6.0 - theta2 / 120.0 + theta2 * theta2 / 5040.0, (theta - torch.sin(theta)) / (theta2_safe * theta)
    )
    k = skew(rvec)
    eye = torch.eye(3, dtype=rvec.dtype, device=rvec.device).expand(k.shape)
    return eye + b[..., None, None] * k + c[..., None, None] * (k @ k)


def project_jacobian(x3d: Tensor, pose: Tensor, K: Tensor, dist: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`project` and its Jacobian in closed form, in the columns of OpenCV's
    ``projectPoints``: ``rvec (3), t (3), fx, fy, cx, cy`` and, with ``dist``, ``k1, k2, p1, p2, k3``.

    For Gauss-Newton on camera parameters (calibration) this is one pass of tensor ops, where
    forward-mode autograd of :func:`project` costs about ten.

    Args:
        x3d: ``(n, 3)`` or ``(B, n, 3)``; pose: ``(B, 6)``; K: ``(3, 3)`` or ``(B, 3, 3)`` (a skew
        ``K[0, 1]`` is honoured but gets no column); dist: ``(5,)``, ``(B, 5)`` or None.
    Returns:
        pixels ``(B, n, 2)`` and the Jacobian ``(B, n, 2, 10)``, or ``(B, n, 2, 15)`` with ``dist``.
    """
    if pose.dim() != 2 or pose.shape[-1] != 6:
        raise ValueError(f"pose: expected shape (B, 6), got {tuple(pose.shape)}")
    R, t = pose_to_Rt(pose)
    Kb = (K if K.dim() == 3 else K[None])[:, None]  # Bx1x3x3 against the points
    rotated = x3d @ R.transpose(-1, -2)  # BxNx3
    P = rotated + t[:, None]
    z = P[..., 2]
    xn = P[..., :2] / z[..., None]
    # d xn / d P, BxNx2x3
    zero = torch.zeros_like(z)
    dxn_dP = torch.stack(
        [torch.stack([1 / z, zero, -xn[..., 0] / z], -1), torch.stack([zero, 1 / z, -xn[..., 1] / z], -1)], -2
    )
    dP_drvec = -skew(rotated) @ _rotation_left_jacobian(pose[:, :3])[:, None]  # BxNx3x3
    dP = torch.cat([dP_drvec, torch.eye(3, dtype=P.dtype, device=P.device).expand_as(dP_drvec)], -1)  # BxNx3x6
    k22 = Kb[..., 2, 2]
    fx, s, fy = Kb[..., 0, 0] / k22, Kb[..., 0, 1] / k22, Kb[..., 1, 1] / k22
    A = torch.stack([torch.stack([fx, s], -1), torch.stack([torch.zeros_like(fy), fy], -1)], -2)  # Bx1x2x2
    if dist is None:
        xd, dxd_dxn, lens = xn, None, []
    else:
        xd, dxd_dxn = distort(xn, dist), distort_jacobian(xn, dist)
        x, y = xn[..., 0], xn[..., 1]
        r2 = x * x + y * y
        dxd_dk = torch.stack(
            [
                xn * r2[..., None],
                xn * (r2 * r2)[..., None],
                torch.stack([2 * x * y, r2 + 2 * y * y], -1),
                torch.stack([r2 + 2 * x * x, 2 * x * y], -1),
                xn * (r2 * r2 * r2)[..., None],
            ],
            -1,
        )  # BxNx2x5
        lens = [A @ dxd_dk]
    pixels = (xd @ A.transpose(-1, -2)[:, 0]) + (Kb[..., :2, 2] / k22[..., None])
    chain = A @ (dxn_dP if dxd_dxn is None else dxd_dxn @ dxn_dP)  # BxNx2x3
    one, nil = torch.ones_like(xd[..., 0]) / k22, torch.zeros_like(xd[..., 0])
    intrinsics = torch.stack(
        [
            torch.stack([xd[..., 0] / k22, nil, one, nil], -1),
            torch.stack([nil, xd[..., 1] / k22, nil, one], -1),
        ],
        -2,
    )  # BxNx2x4
    return pixels, torch.cat([chain @ dP, intrinsics, *lens], -1)
