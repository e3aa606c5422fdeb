"""Camera calibration from chessboard photographs by gradient descent through the PnP layer.

Corners are detected with OpenCV; the intrinsics (and, with ``distortion=True``, OpenCV's
``k1, k2, p1, p2, k3``) are learned jointly over all images: every image's pose comes from the
layer for the current intrinsics, the loss is the mean squared reprojection error, and
Levenberg-Marquardt minimises it with the residuals' exact Jacobian, in which the layer's backward
supplies how each pose moves with the camera (variable projection: the poses are never unknowns
of the fit). OpenCV's ``calibrateCamera`` on the same detections is reported beside it.

With distortion, the layer itself takes the coefficients (``solve_pnp(..., dist=...)``): its
poses minimise the error in distorted pixels, and its gradient reaches the coefficients
exactly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from . import interop, plots
from .geometry import project, project_jacobian, undistort_pixels
from .layer import solve_pnp
from .progress import progress
from .reporting import finish_experiment, markdown_table, output_dir

INTRINSICS, DISTORTION = interop.INTRINSICS, interop.DISTORTION


def _cv2():
    try:
        import cv2
    except ImportError as err:  # pragma: no cover
        raise ImportError("bpnp calibrate needs OpenCV: pip install 'bpnp[demo]'") from err
    return cv2


def board_points(board: tuple[int, int], square: float = 1.0) -> np.ndarray:
    """``(cols*rows, 3)`` inner-corner coordinates in OpenCV's detection order, z = 0."""
    cols, rows = board
    grid = np.mgrid[0:cols, 0:rows].T.reshape(-1, 2).astype(np.float64) * square
    return np.concatenate([grid, np.zeros((grid.shape[0], 1))], 1)


def subpixel_window(corners: np.ndarray, board: tuple[int, int]) -> int:
    """Half-size of the corner refinement window: 11 px, or less where the squares are small
    (about a third of the median square side), so that the window never reaches the next corner."""
    grid = corners.reshape(board[1], board[0], 2)
    side = np.median(
        np.concatenate(
            [
                np.linalg.norm(np.diff(grid, axis=1), axis=-1).ravel(),
                np.linalg.norm(np.diff(grid, axis=0), axis=-1).ravel(),
            ]
        )
    )
    return int(np.clip(round(side / 3.0), 2, 11))


def detect_corners(images: Sequence[np.ndarray], board: tuple[int, int]):
    """Sub-pixel chessboard corners of each grayscale image, or None where not found."""
    cv2 = _cv2()
    found = []
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 50, 1e-4)
    for img in images:
        ok, corners = cv2.findChessboardCorners(img, board, cv2.CALIB_CB_ADAPTIVE_THRESH + cv2.CALIB_CB_NORMALIZE_IMAGE)
        if not ok:
            found.append(None)
            continue
        win = subpixel_window(corners.reshape(-1, 2), board)
        corners = cv2.cornerSubPix(img, corners, (win, win), (-1, -1), criteria)
        found.append(corners.reshape(-1, 2).astype(np.float64))
    return found


def camera_from_params(params: torch.Tensor) -> torch.Tensor:
    """``(fx, fy, cx, cy, ...)`` to a ``(3, 3)`` camera matrix, differentiably."""
    fx, fy, cx, cy = params[:4].unbind()
    z, o = params.new_zeros(()), params.new_ones(())
    return torch.stack([torch.stack([fx, z, cx]), torch.stack([z, fy, cy]), torch.stack([z, z, o])])


def reproject(x3d: torch.Tensor, pose: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Pixels of ``x3d (n,3)`` for poses ``(B,6)`` and ``params`` = intrinsics [+ distortion]."""
    return project(x3d, pose, camera_from_params(params[:4]), params[4:] if params.numel() > 4 else None)


class CameraFit(NamedTuple):
    """What :func:`learn_camera` found: the parameters, their path and the poses."""

    params: torch.Tensor  # (p,) fx, fy, cx, cy [, k1, k2, p1, p2, k3]
    history: np.ndarray  # (T+1, p) the start, then every accepted step
    losses: list[float]  # (T+1) mean squared reprojection error (px^2) of each entry of history
    poses: torch.Tensor  # (B, 6) the layer's poses for params
    evaluations: int  # solves through the layer (rejected trial steps included)


def camera_residuals(
    x2d: torch.Tensor, x3d: torch.Tensor, params: torch.Tensor, jacobian: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reprojection residuals at the layer's poses for the camera ``params``, and their exact
    Jacobian with respect to ``params``, the poses' dependence on the camera included.

    The layer gives each image's pose ``y_b`` and, by its backward (the implicit function
    theorem), ``d y_b / d params``: six backward passes, one per pose coordinate, each reaching
    every image at once because each image has its own copy of the camera. Then
    ``d r / d params = J_params + J_pose (d y / d params)``, with the projection's Jacobians in
    closed form (:func:`~bpnp.geometry.project_jacobian`).

    Args:
        x2d: ``(B, n, 2)`` detections; x3d: ``(n, 3)`` board points; params: ``(p,)``, p = 4 or 9.
        jacobian: False computes the residuals only.
    Returns:
        residuals ``(B, n, 2)``, poses ``(B, 6)`` (detached) and the Jacobian ``(B*n*2, p)`` or None.
    Raises:
        ValueError: when the distortion cannot be inverted at the detections or a residual is not
            finite (the camera is outside the valid region).
    """
    B, p = x2d.shape[0], params.numel()
    camera = camera_from_params(params[:4])
    K = camera.expand(B, 3, 3).clone().requires_grad_(jacobian)
    dist = params[4:].expand(B, p - 4).clone().requires_grad_(jacobian) if p > 4 else None
    if dist is not None:
        undistort_pixels(x2d, camera, params[4:])
    with torch.enable_grad():
        pose = solve_pnp(x2d, x3d, K, dist=dist, warn=False).pose
    pixels, J = project_jacobian(x3d, pose.detach(), camera, None if dist is None else params[4:])
    residuals = pixels - x2d
    if not bool(torch.isfinite(residuals).all()):
        raise ValueError("the camera gives non-finite reprojections")
    if not jacobian:
        return residuals, pose.detach(), None
    leaves = [K] if dist is None else [K, dist]
    rows = []
    for j in range(6):
        grads = torch.autograd.grad(pose[:, j].sum(), leaves, retain_graph=j < 5)
        columns = [grads[0][:, 0, 0], grads[0][:, 1, 1], grads[0][:, 0, 2], grads[0][:, 1, 2]]
        rows.append(torch.stack(columns + (list(grads[1].unbind(-1)) if dist is not None else []), -1))
    pose_derivative = torch.stack(rows, 1)  # B x 6 x p
    total = J[..., 6 : 6 + p] + J[..., :6] @ pose_derivative[:, None]
    return residuals, pose.detach(), total.reshape(-1, p)


def parameter_units(x2d: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``(p,)`` a unit per camera parameter in which each moves the detections about equally:
    the start's intrinsics; each distortion coefficient in the unit that moves the detections as
    much as a relative change of the focal length (k1, k2, k3 multiply r^2, r^4, r^6: a fixed
    unit would leave k3 a thousand times less sensitive)."""
    scale = start[:4].abs()
    if start.numel() > 4:
        xn = (x2d - start[2:4]) / start[:2]
        r2 = xn.pow(2).sum(-1).flatten()
        unit = torch.stack([r2.mean(), r2.pow(2).mean(), r2.mean(), r2.mean(), r2.pow(3).mean()])
        scale = torch.cat([scale, 1.0 / unit.clamp_min(1e-12)])
    return scale


def learn_camera(
    x2d: torch.Tensor,
    x3d: torch.Tensor,
    start: torch.Tensor,
    iters: int = 30,
    quiet: bool = False,
    rtol: float = 1e-14,
    desc: str = "calibrate",
    loss_floor: float = 0.0,
) -> CameraFit:
    """Levenberg-Marquardt through the layer on ``start`` = (fx, fy, cx, cy[, k1, k2, p1, p2, k3]).

    Each step solves the damped normal equations of the residuals' exact Jacobian
    (:func:`camera_residuals`, the layer's derivatives inside), in :func:`parameter_units`.
    A trial camera outside the valid region (focal lengths not positive, distortion that cannot
    be inverted) or with a higher loss is rejected and the damping raised.
    Stops when a step lowers the loss (or would, by the linear model) by less than ``rtol``
    relative, when the loss falls below
    ``loss_floor`` times the first one (noise-free data), or after ``iters`` steps.
    """
    scale = parameter_units(x2d, start)
    params = start.clone()
    residuals, pose, J = camera_residuals(x2d, x3d, params)
    losses = [float(residuals.pow(2).sum(-1).mean())]
    history, evaluations, damping = [params.cpu().numpy().copy()], 1, 1e-3
    for _ in progress(range(iters), desc=desc, disable=quiet):
        Js = J * scale
        normal, gradient = Js.T @ Js, Js.T @ residuals.flatten()
        damped = normal + damping * torch.diag(torch.diagonal(normal).clamp_min(1e-300))
        step = -torch.linalg.solve(damped, gradient)
        # The linear model's decrease of the sum of squares: when even that is below rtol, no
        # trial is worth a solve (near the optimum, rounding would reject it anyway).
        if float(-2.0 * gradient @ step - step @ normal @ step) <= rtol * float(residuals.pow(2).sum()):
            break
        trial = params + step * scale
        evaluations += 1
        try:
            if not bool(torch.isfinite(trial).all()) or float(trial[0]) <= 0 or float(trial[1]) <= 0:
                raise ValueError("focal lengths must be positive")
            r_trial, pose_trial, J_trial = camera_residuals(x2d, x3d, trial)
            loss = float(r_trial.pow(2).sum(-1).mean())
        except ValueError:
            loss = float("inf")
        if not loss <= losses[-1]:
            damping *= 10.0
            if damping > 1e12:
                break  # no step lowers the loss: the minimum is reached
            continue
        params, residuals, pose, J = trial, r_trial, pose_trial, J_trial
        history.append(params.cpu().numpy().copy())
        losses.append(loss)
        damping = max(damping / 10.0, 1e-12)
        if losses[-2] - loss <= rtol * loss or loss < 1e-24 + loss_floor * losses[0]:
            break
    return CameraFit(params, np.stack(history), losses, pose, evaluations)


def fit_camera(
    x2d: torch.Tensor, x3d: torch.Tensor, start: torch.Tensor, distortion: bool, iters: int = 30, quiet: bool = False
) -> CameraFit:
    """:func:`learn_camera` from the pinhole ``start (4,)``; with ``distortion``, the lens too.

    With distortion the fit starts from ``start`` and zero coefficients, where the undistortion is
    well defined.
    """
    if distortion:
        start = torch.cat([start[:4], torch.zeros(5, dtype=start.dtype, device=start.device)])
    return learn_camera(x2d, x3d, start, iters=iters, quiet=quiet)


def zhang_start(obj: np.ndarray, detections: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """``(fx, fy, cx, cy)`` in closed form from the boards' homographies (Zhang; OpenCV's
    ``initCameraMatrix2D``), or the image-size guess where that fails."""
    cv2 = _cv2()
    w, h = size
    guess = torch.tensor([float(max(w, h)), float(max(w, h)), w / 2.0, h / 2.0], dtype=torch.float64)
    try:
        K = cv2.initCameraMatrix2D(
            [obj.astype(np.float32)] * len(detections), [d.astype(np.float32)[:, None] for d in detections], size
        )
    except cv2.error:
        return guess
    start = torch.tensor([K[0, 0], K[1, 1], K[0, 2], K[1, 2]], dtype=torch.float64)
    ok = bool(torch.isfinite(start).all()) and float(start[0]) > 0 and float(start[1]) > 0
    return start if ok else guess


def opencv_calibration(obj: np.ndarray, detections: list[np.ndarray], size: tuple[int, int], distortion: bool):
    cv2 = _cv2()
    flags = 0 if distortion else (cv2.CALIB_ZERO_TANGENT_DIST | cv2.CALIB_FIX_K1 | cv2.CALIB_FIX_K2 | cv2.CALIB_FIX_K3)
    rms, K, dist, _, _ = cv2.calibrateCamera(
        [obj.astype(np.float32)] * len(detections),
        [d.astype(np.float32)[:, None] for d in detections],
        size,
        None,
        None,
        flags=flags,
    )
    out = {"fx": K[0, 0], "fy": K[1, 1], "cx": K[0, 2], "cy": K[1, 2], "rms": rms}
    if distortion:
        out.update(dict(zip(DISTORTION, dist.ravel()[:5].tolist())))
    return {k: float(v) for k, v in out.items()}


def calibrate(
    images: Sequence[np.ndarray],
    names: Sequence[str],
    board: tuple[int, int] = (9, 6),
    square: float = 1.0,
    distortion: bool = False,
    out: str | None = None,
    iters: int = 30,
    quiet: bool = False,
    truth: dict | None = None,
    title: str = "Calibration",
) -> dict:
    """Detect, learn and compare; writes the JSON-ready result, plots and report.md into ``out``.

    Args:
        images: grayscale uint8 images; names: their names (for per-image errors).
        board: inner corners (cols, rows); square: square size (object units).
        distortion: also learn (k1, k2, p1, p2, k3).
        truth: known intrinsics (synthetic data), compared when given.
    Returns:
        The result dictionary (also ``metrics.json`` in ``out``).
    """
    path = output_dir(out, "calibrate")
    t0 = time.perf_counter()
    found = detect_corners(images, board)
    used = [i for i, c in enumerate(found) if c is not None]
    if len(used) < 3:
        raise ValueError(f"images: the {board[0]}x{board[1]} board was found in {len(used)} images; need at least 3")
    h, w = images[used[0]].shape[:2]
    obj = board_points(board, square)
    x2d = torch.from_numpy(np.stack([found[i] for i in used]))
    x3d = torch.from_numpy(obj)
    start = zhang_start(obj, [found[i] for i in used], (w, h))
    detect_seconds = time.perf_counter() - t0
    fit = fit_camera(x2d, x3d, start, distortion, iters=iters, quiet=quiet)
    params, history, losses, pose = fit.params, fit.history, fit.losses, fit.poses
    seconds = time.perf_counter() - t0
    residual = (reproject(x3d, pose, params) - x2d).pow(2).sum(-1)  # B x n
    rms = float(residual.mean().sqrt())
    per_image = residual.mean(-1).sqrt()
    names_used = [names[i] for i in used]
    result: dict = dict(zip(INTRINSICS, params[:4].tolist()))
    if distortion:
        result.update(dict(zip(DISTORTION, params[4:].tolist())))
    result.update(
        {
            "rms": rms,
            "per_image_rms": dict(zip(names_used, per_image.tolist())),
            "images_used": len(used),
            "images_without_board": [names[i] for i, c in enumerate(found) if c is None],
            "board": list(board),
            "square": square,
            "distortion": distortion,
            "evaluations": fit.evaluations,
            "seconds": seconds,
            "detection_seconds": detect_seconds,
        }
    )
    try:
        t_cv = time.perf_counter()
        ref = opencv_calibration(obj, [found[i] for i in used], (w, h), distortion)
        ref["seconds"] = time.perf_counter() - t_cv
        result["opencv"] = ref
        result["relative_to_opencv"] = {k: result[k] / ref[k] - 1 for k in (*INTRINSICS, "rms")}
    except Exception as err:  # pragma: no cover - OpenCV failure is reported, not fatal
        result["opencv"] = {"error": str(err)}
    if truth is not None:
        result["truth"] = truth
        result["relative_to_truth"] = {k: result[k] / truth[k] - 1 for k in INTRINSICS}
        result["max_error_rel_to_truth"] = max(abs(v) for v in result["relative_to_truth"].values())
    plots.loss_curve(path / "loss.png", losses, "calibrate: reprojection loss", "mean squared error (px^2)")
    ref_vals = [result.get("opencv", {}).get(k, result[k]) for k in INTRINSICS]
    plots.parameter_trajectories(
        path / "intrinsics.png",
        history[:, :4],
        ref_vals,
        INTRINSICS,
        "calibrate: intrinsics (dotted: OpenCV)" if truth is None else "calibrate: intrinsics",
    )
    worst = int(per_image.argmax())
    plots.corners_on_image(
        path / "corners.png",
        images[used[worst]],
        x2d[worst].numpy(),
        reproject(x3d, pose, params)[worst].detach().numpy(),
        f"{names_used[worst]}: detected vs reprojected (worst image, RMS {float(per_image[worst]):.3f} px)",
    )
    table, report = _table_and_report(result, truth, title, len(used), board, fit.evaluations, seconds)
    return finish_experiment(path, report, result, table, quiet)


def _table_and_report(
    result: dict, truth: dict | None, title: str, images: int, board: tuple[int, int], evaluations: int, seconds: float
) -> tuple[str, str]:
    """The markdown table (ours, OpenCV's, the truth's) and ``report.md`` of a calibration."""
    names = list(INTRINSICS) + (list(DISTORTION) if result["distortion"] else [])
    rows = []
    for k in names + ["rms"]:
        row = [k, result[k], result.get("opencv", {}).get(k, float("nan"))]
        if truth is not None:
            row.append(truth.get(k, float("nan")))
        rows.append(tuple(v if isinstance(v, str) else f"{v:.7g}" for v in row))
    header = ["", "bpnp", "OpenCV calibrateCamera"] + (["truth"] if truth is not None else [])
    table = markdown_table(header, rows)
    report = (
        f"# {title}\n\n{images} images, {board[0]}x{board[1]} corners, "
        f"{'with' if result['distortion'] else 'no'} distortion; {evaluations} loss/gradient evaluations through "
        f"the PnP layer, {seconds:.1f} s in all (OpenCV calibrateCamera: "
        f"{result.get('opencv', {}).get('seconds', float('nan')):.2f} s).\n\n{table}\n\n"
        "![loss](loss.png) ![intrinsics](intrinsics.png)\n\n![corners](corners.png)\n"
    )
    return table, report


def load_images(paths: Sequence[str]) -> list[np.ndarray]:
    cv2 = _cv2()
    images = []
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError(f"images: cannot read {p}")
        images.append(img)
    return images
