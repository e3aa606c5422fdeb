"""Synthetic chessboard photographs with known intrinsics, for the built-in calibration demo."""

from __future__ import annotations

import numpy as np
import torch

from ..geometry import rvec_to_rotmat


def board_texture(board: tuple[int, int], pixels_per_square: int = 24) -> np.ndarray:
    """A printed board: (cols+1) x (rows+1) squares and a white margin of one square.

    Texture pixel (u, v) is board point ((u + 0.5) / pps - 2, (v + 0.5) / pps - 2) in square units;
    inner corner (i, j) of OpenCV's grid sits at board point (i, j).
    """
    cols, rows = board
    pps = pixels_per_square
    w, h = (cols + 3) * pps, (rows + 3) * pps
    u = (np.arange(w) + 0.5) / pps - 2.0
    v = (np.arange(h) + 0.5) / pps - 2.0
    X, Y = np.meshgrid(u, v)
    inside = (X >= -1) & (X < cols) & (Y >= -1) & (Y < rows)
    black = ((np.floor(X) + np.floor(Y)) % 2 == 0) & inside
    return np.where(black, 20, 235).astype(np.uint8)


def render_views(
    K: np.ndarray,
    count: int,
    board: tuple[int, int] = (9, 6),
    size: tuple[int, int] = (640, 480),
    seed: int = 0,
    blur: float = 0.8,
    noise: float = 2.0,
    supersample: int = 2,
):
    """Render ``count`` photographs of the board under random poses.

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
        img = cv2.warpPerspective(
            tex,
            H,
            (w * supersample, h * supersample),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=128,
        )
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA).astype(np.float64)
        if blur > 0:
            img = cv2.GaussianBlur(img, (0, 0), blur)
        img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
        # Keep views whose whole board (with margin) is inside the image.
        corners = np.array([[-1.5, -1.5, 0], [cols + 0.5, -1.5, 0], [-1.5, rows + 0.5, 0], [cols + 0.5, rows + 0.5, 0]])
        pc = (corners @ R.T + t) @ K.T
        uv = pc[:, :2] / pc[:, 2:]
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
) -> dict:
    """The built-in calibration demo: render, detect, learn, and compare with the truth."""
    from .calibrate import calibrate

    truth = {"fx": 620.0, "fy": 610.0, "cx": 323.0, "cy": 236.0}
    K = np.array([[truth["fx"], 0, truth["cx"]], [0, truth["fy"], truth["cy"]], [0, 0, 1.0]])
    images, _ = render_views(K, count, seed=seed)
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
