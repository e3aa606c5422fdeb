"""Photographs of a chessboard as a BOP test split: the board is the object, its pose in each
photograph comes from its detected corners, so ``bpnp evaluate`` scores a network trained on
renders of the same board (:func:`bpnp.pose.targets.write_chessboard`) on real images.

Per photograph: OpenCV's corner detector with sub-pixel refinement (the calibration tool's),
then the pose through the layer (``solve_pnp`` on the corners, with the lens model when there is
one); the ground truth's quality is the RMS reprojection error of the corners at that pose
(``gt_rms_px`` in ``scene_gt_info.json``). The camera is given (``--camera K.json``: ``fx, fy,
cx, cy`` and optionally ``k1, k2, p1, p2, k3``) or calibrated from the same photographs by the
calibration tool. Poses are in the model frame of the board mesh (``load_mesh`` centres the
board: its centre is added to the board-frame translation).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..calibration import detect_corners
from ..interop import camera_from_dict, read_camera
from ..layer import solve_pnp
from . import bop
from .data import OBJ_ID
from .mesh import load_mesh
from .synthesis import write_model
from .targets import board_keypoints, chessboard_corners, write_chessboard

__all__ = ["board_split"]


def board_split(
    image_paths: Sequence[str | Path],
    out: str | Path,
    board: tuple[int, int] = (9, 6),
    square_mm: float = 25.0,
    margin: float = 0.5,
    camera: str | Path | None = None,
    split: str = "test",
    quiet: bool = False,
    distortion: bool = False,
) -> dict:
    """Write ``out/models``, ``out/keypoints.json`` and the split ``out/<split>/000000`` (BOP) of
    the photographs in which the board is found; returns (and writes as ``out/<split>/board_split.json``)
    the camera, each photograph's ground-truth RMS and the photographs left out.

    Args:
        image_paths: photographs (any size, colour or grayscale); out: the data-set folder.
        board: inner corners (cols, rows); square_mm: square side; margin: the board mesh's white
            border in squares (the same as the renders trained on).
        camera: a camera JSON (:func:`bpnp.interop.read_camera`); None: calibrate from these
            photographs (``distortion``: with OpenCV's k1, k2, p1, p2, k3, for a wide-angle lens).
    """
    import cv2

    out = Path(out)
    colour = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in image_paths]
    unreadable = [str(p) for p, img in zip(image_paths, colour) if img is None]
    if unreadable:
        raise ValueError(f"images: cannot read {', '.join(unreadable)}")
    gray = [cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) for img in colour]
    found = detect_corners(gray, board)
    used = [i for i, c in enumerate(found) if c is not None]
    if not used:
        raise ValueError(f"images: the {board[0]}x{board[1]} board was found in none of them")
    K, dist = _camera(camera, gray, [Path(p).name for p in image_paths], board, square_mm, out, distortion)
    corners = chessboard_corners(*board, square_mm)
    mesh = load_mesh(write_chessboard(out / "board_mesh", *board, square_mm, margin), diameter_mm=None)
    write_model(mesh, out, "board.obj", keypoints=board_keypoints(*board, square_mm))
    x2d = torch.from_numpy(np.stack([found[i] for i in used]))
    dist_t = None if dist is None else torch.from_numpy(dist)
    res = solve_pnp(x2d, torch.from_numpy(corners), torch.from_numpy(K), dist=dist_t, warn=False)
    R, t = res.R.numpy(), res.t.numpy()
    reproj = _project(corners, res.pose.numpy(), K, dist)
    rms = np.sqrt(((reproj - x2d.numpy()) ** 2).sum(-1).mean(-1))
    quad = mesh.vertices + mesh.centre  # the board's outer corners, board frame
    gt, cam, info = {}, {}, {}
    scene = out / split / "000000"
    (scene / "rgb").mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(used):
        t_model = t[k] + R[k] @ mesh.centre  # X_board = X_model + centre
        cv2.imwrite(str(scene / "rgb" / f"{k:06d}.png"), colour[i])
        gt[k] = [{"cam_R_m2c": R[k].reshape(-1), "cam_t_m2c": t_model, "obj_id": OBJ_ID}]
        cam[k] = {"cam_K": K.reshape(-1), "depth_scale": 1.0}
        if dist is not None:
            cam[k]["dist"] = dist.tolist()  # not a BOP field: OpenCV's (k1, k2, p1, p2, k3)
        uv = _project(quad, res.pose.numpy()[k : k + 1], K, dist)[0]
        lo, hi = np.floor(uv.min(0)), np.ceil(uv.max(0))
        bbox = [int(lo[0]), int(lo[1]), int(hi[0] - lo[0]), int(hi[1] - lo[1])]
        info[k] = [{"bbox_obj": bbox, "bbox_visib": bbox, "visib_fract": 1.0, "gt_rms_px": float(rms[k])}]
    bop.write_scene(scene, gt, cam, info)
    summary = {
        "images": [str(image_paths[i]) for i in used],
        "without_board": [str(image_paths[i]) for i, c in enumerate(found) if c is None],
        "gt_rms_px": rms.tolist(),
        "gt_rms_px_max": float(rms.max()),
        "K": K.tolist(),
        "dist": None if dist is None else dist.tolist(),
        "image_size": [int(colour[used[0]].shape[1]), int(colour[used[0]].shape[0])],
        "board": list(board),
        "square_mm": square_mm,
        "margin": margin,
    }
    (out / split / "board_split.json").write_text(json.dumps(summary, indent=1))
    if not quiet:
        print(f"{len(used)} photographs -> {out / split}; ground truth RMS {rms.mean():.3f} px (max {rms.max():.3f})")
    return summary


def _project(points: np.ndarray, poses: np.ndarray, K: np.ndarray, dist: np.ndarray | None) -> np.ndarray:
    """``(B, n, 2)`` pixels of ``points (n, 3)`` under ``poses (B, 6)``, through the lens model."""
    from ..geometry import project

    d = None if dist is None else torch.from_numpy(dist)
    return project(torch.from_numpy(points), torch.from_numpy(poses), torch.from_numpy(K), d).numpy()


def _camera(camera, gray, names, board, square_mm, out: Path, distortion: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if camera is not None:
        return read_camera(camera)
    from ..calibration import calibrate

    result = calibrate(gray, names, board, square_mm, distortion, out=str(out / "calibration"), quiet=True)
    return camera_from_dict(result)
