"""Poses of an object in new photographs from a trained keypoint network.

:class:`PosePredictor` takes whole images (the network finds the object: the most confident of
a grid of crops, then crops around the keypoints it found) or given boxes, crops the
way training did (a square around the box, ``K' = A K``), reads the keypoints from the heatmaps
and solves PnP weighted by their confidences (times a weight head's factors), with the lens
distortion when the camera has one. A pose whose PnP did not converge is flagged, not hidden:
:func:`write_predictions` leaves it out of the BOP CSV and says so in the JSON beside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..geometry import project, rvec_to_rotmat
from ..layer import solve_pnp
from . import bop
from .data import DEFAULT_CROP_MARGIN, _crop_matrix
from .model import heatmap_confidence, learned_weight_factor, soft_argmax, split_outputs
from .train import load_checkpoint, normalise_images

__all__ = ["Prediction", "PosePredictor", "write_predictions", "draw_prediction"]


@dataclass
class Prediction:
    """The pose of the object in one image.

    Attributes:
        pose: ``(6,)`` ``[rvec, t]`` (t in the model's units, mm), OpenCV convention.
        keypoints: ``(k, 2)`` the network's keypoints in the image's pixels.
        confidence: mean heatmap confidence of the keypoints (0-1): the BOP score.
        converged: the PnP solve converged (a well-posed optimum with every keypoint in front).
        box: ``(x, y, w, h)`` the box the last crop was taken around.
    """

    pose: np.ndarray
    keypoints: np.ndarray
    confidence: float
    converged: bool
    box: tuple[float, float, float, float]


class PosePredictor:
    """A trained network (``bpnp train``'s ``model.pt`` or a checkpoint) as a pose predictor.

    Args:
        checkpoint: path of the checkpoint.
        device: where the network runs.
        margin: crop margin around a box; default: the one that frames the object as the
            training renders did (:func:`~bpnp.pose.data.crop_margin_for`, kept in the checkpoint).
        passes: crops of a whole image: the most confident of a grid of crops, then ``passes - 1``
            crops around the keypoints found.
    """

    def __init__(
        self, checkpoint: str | Path, device: str = "cpu", margin: float | None = None, passes: int = 3
    ) -> None:
        self.net, ckpt = load_checkpoint(checkpoint, device)
        self.size = int(ckpt["config"]["size"])
        self.window = ckpt["config"].get("window")
        self.keypoints3d = np.asarray(ckpt["keypoints3d"], dtype=np.float64)
        self.obj_id = int(ckpt["config"]["obj_id"])
        margin = ckpt.get("crop_margin", DEFAULT_CROP_MARGIN) if margin is None else margin
        self.device, self.margin, self.passes = device, float(margin), passes
        # What bounds the object's image box (checkpoints older than it: the keypoints).
        outline = np.asarray(ckpt.get("outline3d", np.zeros((0, 3))), dtype=np.float64)
        self.outline3d = outline if len(outline) else self.keypoints3d

    @torch.no_grad()
    def __call__(
        self,
        images: Sequence[np.ndarray],
        K: np.ndarray,
        boxes: Sequence[Sequence[float] | None] | None = None,
        dist: np.ndarray | None = None,
    ) -> list[Prediction]:
        """Poses of the object in ``images`` (``(H, W, 3)`` uint8 RGB each).

        Args:
            K: ``(3, 3)`` for every image or ``(N, 3, 3)``; dist: ``(5,)`` lens distortion or None.
            boxes: ``(x, y, w, h)`` per image, None (or a None entry) for the whole image.
        Returns:
            One :class:`Prediction` per image.
        """
        N = len(images)
        Ks = np.broadcast_to(np.asarray(K, dtype=np.float64), (N, 3, 3))
        given = list(boxes) if boxes is not None else [None] * N
        if len(given) != N:
            raise ValueError(f"boxes: expected one per image ({N}), got {len(given)}")
        found: list[Prediction | None] = [None] * N
        with_box = [i for i, b in enumerate(given) if b is not None]
        if with_box:
            pick = [tuple(map(float, given[i])) for i in with_box]
            for i, p in zip(with_box, self._pass([images[i] for i in with_box], Ks[with_box], pick, dist)):
                found[i] = p
        for i in (i for i, b in enumerate(given) if b is None):
            found[i] = self._search(images[i], Ks[i], dist)
        return found  # type: ignore[return-value]

    def _search(self, image: np.ndarray, K: np.ndarray, dist: np.ndarray | None, candidates: int = 3) -> Prediction:
        """The object in a whole image: the ``candidates`` crops of a grid over positions and sizes
        where the heatmaps are most confident, each cropped again ``passes - 1`` times around the
        object's box at the pose found (framed as in training); the most confident wins."""
        H, W = image.shape[:2]
        boxes = []
        for frac in (0.35, 0.5, 0.65, 0.8, 1.0):
            side = frac * min(H, W) / (1 + self.margin)
            xs = np.linspace(0.0, max(W - side, 0.0), max(1, int(np.ceil((W - side) / (side / 2))) + 1))
            ys = np.linspace(0.0, max(H - side, 0.0), max(1, int(np.ceil((H - side) / (side / 2))) + 1))
            boxes += [(float(x), float(y), side, side) for y in ys for x in xs]
        boxes.append((0.0, 0.0, float(W), float(H)))
        tries = self._pass([image] * len(boxes), np.broadcast_to(K, (len(boxes), 3, 3)), boxes, dist)
        found = sorted(tries, key=lambda p: -p.confidence)[:candidates]
        for _ in range(self.passes - 1):
            again = [self._object_box(p, K, dist) for p in found]
            found = self._pass([image] * len(found), np.broadcast_to(K, (len(found), 3, 3)), again, dist)
        return max(found, key=lambda p: p.confidence)

    def _object_box(self, p: Prediction, K: np.ndarray, dist: np.ndarray | None) -> tuple[float, float, float, float]:
        """The box of the object's outline projected at ``p.pose`` (the box training framed), or
        of the keypoints found where that pose is not usable (not converged, behind the camera)."""
        pose = torch.from_numpy(np.asarray(p.pose, dtype=np.float64))
        R = rvec_to_rotmat(pose[:3]).numpy()
        depth = self.outline3d @ R[2] + float(pose[5])
        if not p.converged or not np.isfinite(depth).all() or depth.min() <= 0:
            return _box_of(p.keypoints)
        dist_t = None if dist is None else torch.from_numpy(np.asarray(dist, dtype=np.float64))
        # (a copy: K may be a read-only broadcast view, which torch.from_numpy warns about)
        uv = project(torch.from_numpy(self.outline3d), pose, torch.tensor(np.asarray(K), dtype=torch.float64), dist_t)
        return _box_of(uv.numpy())

    @torch.no_grad()
    def _pass(self, images, Ks, boxes, dist) -> list[Prediction]:
        """One network pass and PnP on the crops around ``boxes``."""
        import cv2

        crops, As = [], []
        for img, box in zip(images, boxes):
            A = _crop_matrix(tuple(box), self.size, self.margin)
            crops.append(cv2.warpAffine(np.ascontiguousarray(img), A, (self.size, self.size), flags=cv2.INTER_LINEAR))
            As.append(np.vstack([A, [0.0, 0.0, 1.0]]))
        A = np.stack(As)
        batch = torch.from_numpy(np.stack(crops)).to(self.device)
        logits, weight_logits = split_outputs(self.net(normalise_images(batch)))
        coords, probs = soft_argmax(logits, self.net.stride, self.window)
        conf = heatmap_confidence(probs, coords, self.net.stride)
        w = conf if weight_logits is None else conf * learned_weight_factor(weight_logits, probs)
        K_crop = torch.from_numpy(A @ Ks)
        dist_t = None if dist is None else torch.from_numpy(np.asarray(dist, dtype=np.float64))
        res = solve_pnp(
            coords.double().cpu(), torch.from_numpy(self.keypoints3d), K_crop, w.double().cpu(), dist=dist_t, warn=False
        )
        # keypoints back in the image's pixels: x = A^-1 x'
        uv = coords.double().cpu().numpy()
        inv = np.linalg.inv(A)
        kp = np.einsum("bij,bkj->bki", inv[:, :2, :2], uv) + inv[:, None, :2, 2]
        return [
            Prediction(res.pose[j].numpy(), kp[j], float(conf[j].mean()), bool(res.converged[j]), tuple(boxes[j]))
            for j in range(len(images))
        ]


def _box_of(points: np.ndarray) -> tuple[float, float, float, float]:
    """``(x, y, w, h)`` of ``(m, 2)`` pixels, in the whole-pixel convention of BOP's boxes."""
    lo, hi = points.min(0), points.max(0)
    return (float(lo[0]), float(lo[1]), float(hi[0] - lo[0]) + 1.0, float(hi[1] - lo[1]) + 1.0)


def write_predictions(path: str | Path, names: Sequence[str], predictions: Sequence[Prediction], obj_id: int) -> int:
    """The converged poses as a BOP result CSV (``im_id``: the image's index) and every
    prediction, converged or not, in the JSON beside it (same stem). Returns the number of
    images left out of the CSV."""
    path = Path(path)
    rows, records = [], []
    for j, (name, p) in enumerate(zip(names, predictions)):
        records.append(
            {
                "im_id": j,
                "image": name,
                "converged": p.converged,
                "confidence": p.confidence,
                "pose": p.pose.tolist(),
                "box": list(p.box),
            }
        )
        if p.converged:
            R = rvec_to_rotmat(torch.from_numpy(p.pose[None, :3]))[0].numpy()
            rows.append(
                {
                    "scene_id": 0,
                    "im_id": j,
                    "obj_id": obj_id,
                    "score": p.confidence,
                    "R": R,
                    "t": p.pose[3:],
                    "time": -1,
                }
            )
    bop.write_results_csv(path, rows)
    path.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
    return len(records) - len(rows)


def draw_prediction(image: np.ndarray, p: Prediction, K: np.ndarray, points: np.ndarray, path: str | Path) -> None:
    """The image with the 3D box of ``points (m, 3)`` under the predicted pose (red; orange
    when the PnP did not converge) and the keypoints (yellow), as a JPEG/PNG at ``path``."""
    import cv2

    from .evaluate import _EDGES, _box_corners

    img = np.ascontiguousarray(image[..., ::-1]).copy()
    uv = project(torch.from_numpy(_box_corners(points)), torch.from_numpy(p.pose), torch.from_numpy(K)).numpy()
    colour = (0, 0, 255) if p.converged else (0, 140, 255)
    thick = max(1, round(max(img.shape[:2]) / 400))
    if np.isfinite(uv).all() and np.abs(uv).max() < 1e5:
        for a, b in _EDGES:
            cv2.line(
                img,
                tuple(int(round(v)) for v in uv[a]),
                tuple(int(round(v)) for v in uv[b]),
                colour,
                thick,
                cv2.LINE_AA,
            )
    for x, y in p.keypoints:
        cv2.circle(img, (int(round(x)), int(round(y))), 2 * thick, (0, 220, 255), -1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)
