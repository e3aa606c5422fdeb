"""OpenCV-style helpers: numpy in, numpy out, OpenCV's argument names and shapes.

``solvePnP`` and ``projectPoints`` mirror ``cv2.solvePnP`` and ``cv2.projectPoints`` for code that
moves between the two libraries; the solve is bpnp's global one (float64) and needs no OpenCV.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import PnPInputError
from .geometry import project
from .layer import solve_pnp
from .options import SolverOptions

__all__ = ["solvePnP", "projectPoints", "read_camera", "camera_from_dict", "INTRINSICS", "DISTORTION"]

#: The names of a camera's intrinsics and of OpenCV's lens coefficients in a camera JSON.
INTRINSICS = ("fx", "fy", "cx", "cy")
DISTORTION = ("k1", "k2", "p1", "p2", "k3")


def read_camera(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``K (3, 3)`` and the distortion ``(5,)`` (or None) of a camera JSON: ``fx, fy, cx, cy`` and
    optionally ``k1, k2, p1, p2, k3`` (what ``bpnp calibrate --json`` writes; an absent coefficient
    is 0), or ``{"K": [[...], ...], "dist": [...]}``.

    Raises:
        ValueError: neither form, naming the file and what is missing.
    """
    return camera_from_dict(json.loads(Path(path).read_text()), str(path))


def camera_from_dict(data: dict, source: str = "camera") -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`read_camera` of a dictionary (e.g. ``bpnp calibrate``'s result); ``source`` names it
    in the error."""
    if "K" in data:
        K = np.asarray(data["K"], dtype=np.float64).reshape(3, 3)
        dist = data.get("dist")
        return K, None if dist is None else np.asarray(dist, dtype=np.float64).reshape(5)
    missing = [k for k in INTRINSICS if k not in data]
    if missing:
        raise ValueError(f"{source}: a camera needs fx, fy, cx, cy (or K); missing {', '.join(missing)}")
    K = np.array([[data["fx"], 0.0, data["cx"]], [0.0, data["fy"], data["cy"]], [0.0, 0.0, 1.0]])
    dist = np.array([data.get(k, 0.0) for k in DISTORTION]) if any(k in data for k in DISTORTION) else None
    return K, dist


def _points(name: str, a, dim: int) -> torch.Tensor:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 3 and 1 in arr.shape[:2]:  # OpenCV's (N, 1, d) and (1, N, d)
        arr = arr.reshape(-1, arr.shape[-1])
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise PnPInputError(f"{name}: expected shape (N, {dim}), (N, 1, {dim}) or (1, N, {dim}), got {np.shape(a)}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _dist(distCoeffs) -> torch.Tensor | None:
    if distCoeffs is None:
        return None
    d = np.asarray(distCoeffs, dtype=np.float64).ravel()
    if d.size == 0 or not d.any():
        return None
    if d.size not in (4, 5):
        raise PnPInputError(f"distCoeffs: bpnp supports (k1, k2, p1, p2[, k3]), got {d.size} coefficients")
    return torch.from_numpy(np.concatenate([d, np.zeros(5 - d.size)]))


def _camera(cameraMatrix) -> torch.Tensor:
    K = np.asarray(cameraMatrix, dtype=np.float64)
    if K.shape != (3, 3):
        raise PnPInputError(f"cameraMatrix: expected shape (3, 3), got {K.shape}")
    return torch.from_numpy(np.ascontiguousarray(K))


def solvePnP(  # noqa: N802 - OpenCV's name
    objectPoints,  # noqa: N803
    imagePoints,  # noqa: N803
    cameraMatrix,  # noqa: N803
    distCoeffs=None,  # noqa: N803
    rvec=None,
    tvec=None,
    useExtrinsicGuess: bool = False,  # noqa: N803
    weights=None,
    options: SolverOptions | None = None,
) -> tuple[bool, np.ndarray, np.ndarray]:
    """``cv2.solvePnP`` with bpnp's global solver.

    Args:
        objectPoints: ``(N, 3)`` (or ``(N, 1, 3)``) object points.
        imagePoints: ``(N, 2)`` (or ``(N, 1, 2)``) pixels.
        cameraMatrix: ``(3, 3)``.
        distCoeffs: None or OpenCV's ``(k1, k2, p1, p2[, k3])``: the pose minimises the
            reprojection error in the distorted pixels (as ``solvePnPRefineLM`` and the default
            ``SOLVEPNP_ITERATIVE`` do; ``solve_pnp(..., dist=...)``).
        rvec, tvec: ``(3, 1)`` start, used with ``useExtrinsicGuess`` (a warm start: the global
            search still runs unless ``options.global_search`` is False).
        weights: optional ``(N,)`` non-negative per-point weights (an addition to OpenCV's API).
        options: :class:`~bpnp.options.SolverOptions`.
    Returns:
        ``(retval, rvec (3, 1), tvec (3, 1))``; ``retval`` is ``converged``.
    """
    x3d = _points("objectPoints", objectPoints, 3)
    x2d = _points("imagePoints", imagePoints, 2)
    K = _camera(cameraMatrix)
    dist = _dist(distCoeffs)
    init = None
    if useExtrinsicGuess:
        if rvec is None or tvec is None:
            raise PnPInputError("useExtrinsicGuess: needs rvec and tvec")
        init = torch.from_numpy(
            np.concatenate([np.asarray(rvec, np.float64).ravel(), np.asarray(tvec, np.float64).ravel()])
        )
    w = None if weights is None else torch.from_numpy(np.asarray(weights, dtype=np.float64).ravel())
    res = solve_pnp(x2d, x3d, K, w, init_pose=init, options=options, dist=dist, warn=False)
    pose = res.pose.numpy()
    return bool(res.converged), pose[:3].reshape(3, 1).copy(), pose[3:].reshape(3, 1).copy()


def projectPoints(objectPoints, rvec, tvec, cameraMatrix, distCoeffs=None) -> tuple[np.ndarray, None]:  # noqa: N802, N803
    """``cv2.projectPoints``: ``(imagePoints (N, 1, 2), None)`` (no Jacobian: use autograd on
    :func:`bpnp.project`, which this wraps)."""
    x3d = _points("objectPoints", objectPoints, 3)
    pose = torch.from_numpy(
        np.concatenate([np.asarray(rvec, np.float64).ravel(), np.asarray(tvec, np.float64).ravel()])
    )
    if pose.numel() != 6:
        raise PnPInputError("rvec, tvec: expected 3 values each")
    uv = project(x3d, pose, _camera(cameraMatrix), _dist(distCoeffs))
    return uv.numpy().reshape(-1, 1, 2), None
