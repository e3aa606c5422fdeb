"""Textured planar targets: a chessboard as a mesh that ``bpnp render`` renders like any other.

The board lies in the plane ``z = 0`` in OpenCV's board frame: the first inner corner at the
origin, x along a row of inner corners (``cols`` of them), y down the columns (``rows``), so a
pose estimated from the board's corners (``cv2.findChessboardCorners`` + ``solvePnP`` with object
points ``(c s, r s, 0)``) is a pose of this mesh. The square at the top-left of the first inner
corner is black (as OpenCV draws and detects it); with an odd and an even count of inner corners
(9x6) the colours do not repeat under a half turn, so the board has no 180-degree symmetry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["chessboard_texture", "write_chessboard", "chessboard_corners", "board_keypoints"]


def chessboard_texture(cols: int, rows: int, margin: float, pixels_per_square: int = 32) -> np.ndarray:
    """``(H, W)`` uint8 image of the board: ``(cols + 1) x (rows + 1)`` squares and a white margin
    of ``margin`` squares around them.

    Args:
        cols, rows: inner corners along x and y (9, 6 for OpenCV's sample board).
        margin: the white border, in squares (>= 0).
        pixels_per_square: texture resolution.
    """
    if cols < 2 or rows < 2:
        raise ValueError(f"a board needs at least 2x2 inner corners, got {cols}x{rows}")
    if margin < 0:
        raise ValueError(f"margin: expected >= 0, got {margin}")
    p = pixels_per_square
    edge = int(round(margin * p))
    squares = np.add.outer(np.arange(rows + 1), np.arange(cols + 1)) % 2 == 0  # True: black
    board = np.where(np.kron(squares, np.ones((p, p), dtype=bool)), 0, 255).astype(np.uint8)
    return np.pad(board, edge, constant_values=255)


def chessboard_corners(cols: int, rows: int, square_mm: float) -> np.ndarray:
    """``(rows * cols, 3)`` the inner corners in the board frame, in OpenCV's order (row by row)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([c.ravel() * square_mm, r.ravel() * square_mm, np.zeros(rows * cols)], -1).astype(np.float64)


def write_chessboard(
    out: str | Path, cols: int = 9, rows: int = 6, square_mm: float = 25.0, margin: float = 0.5, name: str = "board"
) -> Path:
    """Write ``<out>/<name>.obj`` (a textured quad in the board frame, millimetres), its
    ``.mtl`` and ``<name>.png``; returns the OBJ's path.

    Args:
        out: folder (made if missing); cols, rows: inner corners; square_mm: side of a square;
        margin: white border in squares; name: file stem.
    """
    from PIL import Image

    if not square_mm > 0:
        raise ValueError(f"square_mm: expected a positive size, got {square_mm}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image = chessboard_texture(cols, rows, margin)
    Image.fromarray(image).convert("RGB").save(out / f"{name}.png")
    # The squares run from -1 to cols (x) and -1 to rows (y), in squares, plus the margin.
    x0, x1 = (-1.0 - margin) * square_mm, (cols + margin) * square_mm
    y0, y1 = (-1.0 - margin) * square_mm, (rows + margin) * square_mm
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    # Image row 0 is the board's top (y0): texture v runs the other way.
    uv = [(0.0, 1.0), (1.0, 1.0), (1.0, 0.0), (0.0, 0.0)]
    lines = [f"mtllib {name}.mtl", f"usemtl {name}"]
    lines += [f"v {x:.6f} {y:.6f} 0" for x, y in corners]
    lines += [f"vt {u} {v}" for u, v in uv]
    lines += ["vn 0 0 -1"]  # the printed side faces -z: towards a camera that sees the board
    lines += ["f 1/1/1 3/3/1 2/2/1", "f 1/1/1 4/4/1 3/3/1"]
    (out / f"{name}.obj").write_text("\n".join(lines) + "\n")
    (out / f"{name}.mtl").write_text(f"newmtl {name}\nKd 1 1 1\nmap_Kd {name}.png\n")
    return out / f"{name}.obj"


def board_keypoints(cols: int, rows: int, square_mm: float) -> np.ndarray:
    """``(9, 3)`` keypoints of a board in the frame of its mesh (:func:`write_chessboard` centred
    by ``load_mesh``): the four outermost inner corners, four inner corners a third of the way in
    (they tell the board's halves apart, where the colours swap), and the centre. Corners are
    what a network can place on a photograph; the paper's edge is not."""
    corners = chessboard_corners(cols, rows, square_mm)
    grid = corners.reshape(rows, cols, 3)
    a, b = (cols - 1) // 3, (rows - 1) // 3
    picked = [grid[0, 0], grid[0, -1], grid[-1, -1], grid[-1, 0]]
    picked += [grid[b, a], grid[b, cols - 1 - a], grid[rows - 1 - b, cols - 1 - a], grid[rows - 1 - b, a]]
    centre = np.array([(cols - 1) / 2 * square_mm, (rows - 1) / 2 * square_mm, 0.0])
    return np.stack(picked + [centre]) - centre
