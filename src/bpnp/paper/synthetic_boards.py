"""Synthetic chessboard photographs with known intrinsics, for the built-in calibration demo."""

from __future__ import annotations

import numpy as np
import torch

from ..geometry import rvec_to_rotmat


def board_texture(board: tuple[int, int], pixels_per_square: int = 24) -> np.ndarray:
    """A printed board: (cols+1) x (rows+1) squares and a white margin of one square, grey
    levels 20 and 235 (:func:`bpnp.pose.targets.chessboard_texture`, the object-pose board).

    Texture pixel (u, v) is board point ((u + 0.5) / pps - 2, (v + 0.5) / pps - 2) in square units;
    inner corner (i, j) of OpenCV's grid sits at board point (i, j).
    """
    from ..pose.targets import chessboard_texture

    tex = chessboard_texture(board[0], board[1], margin=1.0, pixels_per_square=pixels_per_square)
    return np.where(tex == 0, 20, 235).astype(np.uint8)


def render_views(
    K: np.ndarray,
    count: int,
    board: tuple[int, int] = (9, 6),
    size: tuple[int, int] = (640, 480),
    seed: int = 0,
    blur: float = 0.8,
    noise: float = 2.0,
    supersample: int = 2,
    dist: np.ndarray | None = None,
):
    """Render ``count`` photographs of the board under random poses.

    With ``dist`` (OpenCV's ``k1, k2, p1, p2, k3``), every output pixel is undistorted
    (``cv2.undistortPoints`` to 1e-10) and looked up on the board through the inverse homography, so
    the image shows the board through that lens.

    Returns ``(images [count] uint8 (h, w), poses (count, 6))``; poses map board points (square
    units, z = 0) to the camera.
    """
    import cv2

    rng = np.random.default_rng(seed)
    cols, rows = board
    pps = 24
    tex = board_texture(board, pps)
    A = np.array([[1.0 / pps, 0, -2.0 + 0.5 / pps], [0, 1.0 / pps, -2.0 + 0.5 / pps], [0, 0, 1]])
    w, h = size
    # Pixel centres: low-res x maps to high-res s x + (s - 1) / 2 before INTER_AREA averaging.
    half = (supersample - 1) / 2.0
    S = np.array([[supersample, 0, half], [0, supersample, half], [0, 0, 1.0]])
    images, poses = [], []
    centre = np.array([(cols - 1) / 2.0, (rows - 1) / 2.0, 0.0])
    f = K[0, 0]
    while len(images) < count:
        tilt = np.deg2rad(rng.uniform(-35, 35, size=2))
        spin = np.deg2rad(rng.uniform(-25, 25))
        rvec = torch.tensor([tilt[0], tilt[1], spin], dtype=torch.float64)
        R = rvec_to_rotmat(rvec).numpy()
        depth = f * (cols + 1) / (rng.uniform(0.45, 0.75) * w)
        offset = rng.uniform(-0.12, 0.12, size=2) * depth * np.array([w, h]) / f
        t = -R @ centre + np.array([offset[0], offset[1], depth])
        H = S @ K @ np.column_stack([R[:, 0], R[:, 1], t]) @ A
        if dist is None:
            img = cv2.warpPerspective(
                tex,
                H,
                (w * supersample, h * supersample),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=128,
            )
        else:
            # Each supersampled output pixel, in image pixels, undistorted, then on the texture.
            ys, xs = np.mgrid[0 : h * supersample, 0 : w * supersample].astype(np.float64)
            pix = np.stack([(xs - half) / supersample, (ys - half) / supersample], -1).reshape(-1, 1, 2)
            criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-10)
            und = cv2.undistortPoints(pix, K, dist, R=None, P=K, criteria=criteria).reshape(-1, 2)
            Hinv = np.linalg.inv(K @ np.column_stack([R[:, 0], R[:, 1], t]) @ A)
            uvw = np.concatenate([und, np.ones((und.shape[0], 1))], 1) @ Hinv.T
            tex_xy = (uvw[:, :2] / uvw[:, 2:]).reshape(h * supersample, w * supersample, 2).astype(np.float32)
            img = cv2.remap(
                tex, tex_xy[..., 0], tex_xy[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=128
            )
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA).astype(np.float64)
        if blur > 0:
            img = cv2.GaussianBlur(img, (0, 0), blur)
        img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
        # Keep views whose whole board (with margin) is inside the image.
        corners = np.array([[-1.5, -1.5, 0], [cols + 0.5, -1.5, 0], [-1.5, rows + 0.5, 0], [cols + 0.5, rows + 0.5, 0]])
        uv = cv2.projectPoints(corners, cv2.Rodrigues(R)[0], t, K, dist)[0].reshape(-1, 2)
        if (uv.min() < 5) or (uv[:, 0].max() > w - 5) or (uv[:, 1].max() > h - 5):
            continue
        images.append(img)
        poses.append(np.concatenate([rvec.numpy(), t]))
    return images, np.stack(poses)


def run_synthetic(
    out: str | None = None,
    count: int = 25,
    seed: int = 0,
    iters: int = 30,
    distortion: bool = False,
    quiet: bool = False,
    camera: dict | None = None,
    lens: tuple[float, float, float, float, float] | None = None,
) -> dict:
    """The built-in calibration demo: render, detect, learn, and compare with the truth.

    Args:
        camera: true ``fx, fy, cx, cy`` (default 620, 610, 323, 236).
        lens: true distortion ``(k1, k2, p1, p2, k3)`` of the rendering (default none).
    """
    from ..calibration import calibrate

    truth = camera or {"fx": 620.0, "fy": 610.0, "cx": 323.0, "cy": 236.0}
    K = np.array([[truth["fx"], 0, truth["cx"]], [0, truth["fy"], truth["cy"]], [0, 0, 1.0]])
    images, _ = render_views(K, count, seed=seed, dist=None if lens is None else np.asarray(lens, dtype=np.float64))
    result = calibrate(
        images,
        [f"synthetic{i:02d}" for i in range(count)],
        out=out,
        iters=iters,
        distortion=distortion,
        quiet=quiet,
        truth=truth,
        title="Calibration from rendered chessboards (known K)",
    )
    return result
