"""Renders that look like photographs: what a camera does to an image that a rasteriser does not.

:func:`photo_background` paints backgrounds with the statistics of indoor photographs rather than
procedural patterns (smooth illumination falloff, large dim surfaces with soft edges, fine
texture), :func:`hand_occluder` puts a skin-toned blob over the object from the image's edge (a
hand holding a board), and :func:`camera_effects` applies exposure and gamma, vignetting, defocus
or motion blur, signal-dependent sensor noise, grayscale and JPEG compression. ``bpnp render
--photo`` (``RenderSettings(photo=True)``) uses all three; every draw comes from the image's own
random generator, so a split stays reproducible per seed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["photo_background", "hand_occluder", "camera_effects"]


def photo_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``(S, S, 3)`` float32 in [0, 1]: a dim, low-contrast scene of a few soft-edged surfaces
    under an illumination gradient, with fine texture."""
    import cv2

    base = rng.uniform(0.05, 0.6) * np.ones(3, np.float32) * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    img = np.ones((size, size, 3), np.float32) * base
    for _ in range(int(rng.integers(2, 7))):  # walls, tables, books: large polygons
        pts = rng.uniform(-0.3, 1.3, (int(rng.integers(3, 6)), 2)) * size
        colour = np.clip(base * rng.uniform(0.4, 1.8) + rng.normal(0, 0.05, 3), 0, 1).astype(np.float32)
        cv2.fillPoly(img, [pts.astype(np.int32)], tuple(float(c) for c in colour), lineType=cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 3.0))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ang = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0.0, 0.8) * (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5))
    cells = int(rng.integers(8, 48))
    texture = cv2.resize(rng.normal(0, 1, (cells, cells)).astype(np.float32), (size, size))
    img = img * light[..., None] * (1.0 + rng.uniform(0, 0.15) * texture[..., None])
    return np.clip(img, 0, 1).astype(np.float32)


def hand_occluder(
    rng: np.random.Generator, size: int, bbox: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A skin-toned blob (a hand) entering over the object's box from its nearest image edge:
    ``(S, S)`` coverage and ``(S, S, 3)`` colours."""
    import cv2

    x, y, w, h = bbox
    side = int(rng.integers(4))  # 0 left, 1 right, 2 top, 3 bottom
    along = rng.uniform(0.2, 0.8)
    reach = rng.uniform(0.1, 0.35)
    if side < 2:
        cy = y + along * h
        cx = x + (reach * w if side == 0 else (1 - reach) * w)
        axes = (rng.uniform(0.15, 0.35) * w, rng.uniform(0.1, 0.2) * h)
        start = (0.0 if side == 0 else float(size), cy)
    else:
        cx = x + along * w
        cy = y + (reach * h if side == 2 else (1 - reach) * h)
        axes = (rng.uniform(0.1, 0.2) * w, rng.uniform(0.15, 0.35) * h)
        start = (cx, 0.0 if side == 2 else float(size))
    layer = np.zeros((size, size), np.float32)
    cv2.ellipse(layer, (int(cx), int(cy)), (max(int(axes[0]), 1), max(int(axes[1]), 1)), 0, 0, 360, 1.0, -1)
    # the arm: from the image's edge to the hand
    width = max(int(min(axes) * 1.2), 1)
    cv2.line(layer, (int(start[0]), int(start[1])), (int(cx), int(cy)), 1.0, width)
    layer = cv2.GaussianBlur(layer, (0, 0), 1.0)
    skin = (
        np.array([0.85, 0.65, 0.55], np.float32) * rng.uniform(0.4, 1.1) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    )
    colour = np.ones((size, size, 3), np.float32) * np.clip(skin, 0, 1)
    return layer, colour


def camera_effects(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rendered ``(S, S, 3)`` float32 image in [0, 1] as a camera would record it: exposure and
    gamma, vignetting, defocus or motion blur, signal-dependent noise, grayscale (half the time),
    JPEG compression (most of the time). Returns uint8."""
    import cv2

    size = img.shape[0]
    x = img * float(np.exp(rng.normal(0.0, 0.4)))  # exposure
    x = np.clip(x, 0, 1) ** rng.uniform(0.6, 1.6)  # gamma / tone curve
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    x = x * (1.0 - rng.uniform(0.0, 0.6) * (xx * xx + yy * yy) * 2.0)[..., None]  # vignetting
    if rng.random() < 0.5:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.5))  # defocus
    elif rng.random() < 0.5:
        length = int(rng.integers(2, 7))  # motion blur along a random direction
        kernel = np.zeros((length * 2 + 1, length * 2 + 1), np.float32)
        ang = rng.uniform(0, np.pi)
        c = length
        cv2.line(kernel, (int(c - length * np.cos(ang)), int(c - length * np.sin(ang))),
                 (int(c + length * np.cos(ang)), int(c + length * np.sin(ang))), 1.0, 1)  # fmt: skip
        x = cv2.filter2D(x, -1, kernel / kernel.sum())
    shot = rng.uniform(0.0, 0.03)
    read = rng.uniform(0.0, 0.03)
    x = x + rng.normal(0, 1, x.shape).astype(np.float32) * np.sqrt(shot * shot * np.clip(x, 0, 1) + read * read)
    if rng.random() < 0.5:
        x = np.repeat(x.mean(-1, keepdims=True), 3, -1)
    out = np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.7:
        ok, buf = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 96))])
        out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return np.ascontiguousarray(out)
