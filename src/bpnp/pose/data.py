"""Object-pose data as arrays: any BOP split loaded for training and evaluation (cropped around
the object when the images are larger), the keypoints' visibility, and augmentation.

Loading writes a packed cache (``bpnp_cache_*.npz``) beside the split so that the next read is
one ``np.load``. Rendering a data set is :mod:`bpnp.pose.synthesis`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bop
from .mesh import (
    farthest_point_keypoints,
    hull_vertices,
    load_mesh,
)

__all__ = ["PoseData", "load_split", "load_keypoints", "keypoint_visibility", "augment_image", "OBJ_ID"]

OBJ_ID = 1  # the object id of rendered data sets


@dataclass
class PoseData:
    """A split as arrays: one row per object instance.

    Attributes:
        images: ``(N, S, S, 3)`` uint8 RGB.
        K: ``(N, 3, 3)`` camera matrices of the (cropped) images.
        pose: ``(N, 6)`` ``[rvec, t]`` (mm), OpenCV convention.
        keypoints3d: ``(k, 3)`` object keypoints (mm); keypoints2d: ``(N, k, 2)`` their projections.
        ids: ``(N, 3)`` int ``scene_id, im_id, obj_id``.
        visib_fract: ``(N,)`` visible fraction of the object (1 when unknown).
        dist: ``(N, 5)`` OpenCV lens distortion of each image (``"dist"`` in its
            ``scene_camera.json``; a crop keeps it, ``K' = A K``), or None: pinhole images.
    """

    images: np.ndarray
    K: np.ndarray
    pose: np.ndarray
    keypoints3d: np.ndarray
    keypoints2d: np.ndarray
    ids: np.ndarray
    visib_fract: np.ndarray
    dist: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def project(self, points: np.ndarray, pose: np.ndarray | None = None) -> np.ndarray:
        """``points (k, 3)`` in each image under ``pose (N, 6)`` (default: the true poses),
        through the image's camera and lens: ``(N, k, 2)`` pixels."""
        import torch

        from ..geometry import project

        pose = self.pose if pose is None else pose
        dist = None if self.dist is None else torch.from_numpy(self.dist)
        return project(torch.from_numpy(points), torch.from_numpy(pose), torch.from_numpy(self.K), dist).numpy()


def _project(points: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray, dist=None) -> np.ndarray:
    """``(n, 2)`` pixels of ``points (n, 3)``: OpenCV's camera, with its lens when ``dist (5,)`` is given."""
    cam = points @ R.T + t
    xy = cam[:, :2] / cam[:, 2:3]
    if dist is not None and np.any(dist):
        import torch

        from ..geometry import distort

        xy = distort(torch.from_numpy(xy), torch.as_tensor(dist, dtype=torch.float64)).numpy()
    return xy @ K[:2, :2].T + K[:2, 2]


def load_keypoints(dataset_dir: str | Path, obj_id: int, count: int = 8) -> np.ndarray:
    """``(k, 3)`` keypoints of ``obj_id``: from ``keypoints.json`` of the data set when present,
    else farthest-point sampled on ``models/obj_<id>.ply`` (plus the centre of its box)."""
    dataset_dir = Path(dataset_dir)
    for cand in (dataset_dir, dataset_dir.parent):
        path = cand / "keypoints.json"
        if path.is_file():
            data = json.loads(path.read_text())
            if str(obj_id) in data:
                return np.asarray(data[str(obj_id)], dtype=np.float64)
    mesh = load_mesh(bop.model_path(bop.find_models_dir(dataset_dir), obj_id), diameter_mm=None)
    # load_mesh centres the mesh on its box; keypoints must be in the model's own frame.
    return farthest_point_keypoints(mesh, count, seed=0) + mesh.centre


#: The crop margin of images that ``bpnp render`` did not make (its framing is not known).
DEFAULT_CROP_MARGIN = 0.2


def crop_margin_for(split_dir: str | Path) -> float:
    """The crop margin that frames an object's box as the renders of ``split_dir`` frame it.

    A render's object box spans a share of the image drawn from ``RenderSettings.fill``; a crop
    around a box with margin ``m`` makes it span ``1 / (1 + m)``. Matching the two at the centre of
    that range keeps the object at the scale the network learned: evaluated at the default 0.2
    (a span of 0.83, beyond the renders' 0.4-0.8), networks trained on board renders shrank the
    keypoints of photographs by 4-5% and put the board 1-5 cm too far.
    Data not rendered by bpnp (no ``render_settings.json``): :data:`DEFAULT_CROP_MARGIN`.
    """
    record = Path(split_dir) / "render_settings.json"
    fill = json.loads(record.read_text()).get("fill") if record.is_file() else None
    if not fill:
        return DEFAULT_CROP_MARGIN
    low, high = fill
    return 2.0 / (low + high) - 1.0


@functools.lru_cache(maxsize=8)
def object_outline(split_dir: str | Path, obj_id: int) -> np.ndarray:
    """``(h, 3)`` the vertices of the convex hull of the object's model (``models/`` of
    ``split_dir``), in the model's frame: a perspective projection takes its extremes over a convex
    set at vertices, so their projections bound the object's image box exactly. ``(0, 3)`` when
    the split has no model."""
    import trimesh

    try:
        path = bop.model_path(bop.find_models_dir(split_dir), obj_id)
    except FileNotFoundError:
        return np.zeros((0, 3))
    if not path.is_file():
        return np.zeros((0, 3))
    return hull_vertices(np.asarray(trimesh.load(str(path), process=False).vertices, dtype=np.float64))


def _crop_matrix(bbox: tuple[int, int, int, int], size: int, margin: float) -> np.ndarray:
    """The 2x3 affine map from the image to an ``size``-pixel square around ``bbox`` (pixel centres)."""
    x, y, w, h = bbox
    side = max(w, h) * (1 + margin)
    scale = size / side
    cx, cy = x + (w - 1) / 2, y + (h - 1) / 2
    return np.array([[scale, 0.0, (size - 1) / 2 - scale * cx], [0.0, scale, (size - 1) / 2 - scale * cy]])


def load_split(
    split_dir: str | Path,
    obj_id: int = OBJ_ID,
    size: int = 128,
    margin: float = 0.2,
    min_visib: float = 0.0,
    cache: bool = True,
    limit: int | None = None,
) -> PoseData:
    """Load every instance of ``obj_id`` in a BOP split as arrays.

    Images whose side is not ``size`` are cropped to a square around the object's box
    (``bbox_obj`` of ``scene_gt_info.json``, else the projected model) enlarged by ``margin``
    and resized, with ``K`` changed to match (``K' = A K``).

    Args:
        split_dir: a folder of BOP scenes; obj_id: the object; size: output side (pixels).
        margin: crop margin around the box; min_visib: skip instances less visible than this.
        cache: read/write ``bpnp_cache_obj<id>_<size>.npz`` in the split folder.
        limit: read at most this many instances (not cached).
    Returns:
        :class:`PoseData`.
    Raises:
        FileNotFoundError: no scenes or no models; ValueError: no instance of ``obj_id``.
    """
    import cv2
    import torch

    from ..geometry import rotmat_to_rvec

    split_dir = Path(split_dir)
    scenes = _scenes(split_dir)
    stamp = [
        (p.name, (p / name).stat().st_size, (p / name).stat().st_mtime_ns)
        for p in scenes
        for name in ("scene_gt.json", "scene_camera.json")
    ]
    key = json.dumps([stamp, obj_id, size, margin, min_visib])
    cache_file = split_dir / f"bpnp_cache_obj{obj_id}_{size}.npz"
    if cache and limit is None and cache_file.is_file():
        with np.load(cache_file) as z:
            if str(z["key"]) == key:
                arrays = (z["images"], z["K"], z["pose"], z["ids"], z["visib"], z["dist"])
                return _with_keypoints(*arrays, load_keypoints(split_dir, obj_id))
    # Parsed only on a miss: the scene files of 20,000 images take most of a cached read.
    # Before the keypoints, so that an absent object is named as such, not as a missing model.
    anns = _instances(split_dir, scenes, obj_id, min_visib)
    keypoints3d = load_keypoints(split_dir, obj_id)
    images, Ks, poses, ids, visib, dists = [], [], [], [], [], []
    for scene_dir, ann in anns[:limit]:
        img = cv2.imread(str(bop.image_path(scene_dir, ann.im_id)), cv2.IMREAD_COLOR)[..., ::-1]
        K = ann.K
        if img.shape[0] != size or img.shape[1] != size:
            bbox = ann.bbox_obj
            if bbox is None or bbox[2] <= 0:
                uv = _project(keypoints3d, ann.R, ann.t, K, ann.dist)
                lo, hi = uv.min(0), uv.max(0)
                bbox = (int(lo[0]), int(lo[1]), int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1)
            A = _crop_matrix(bbox, size, margin)
            img = cv2.warpAffine(np.ascontiguousarray(img), A, (size, size), flags=cv2.INTER_LINEAR)
            K = np.vstack([A, [0.0, 0.0, 1.0]]) @ K
        images.append(np.ascontiguousarray(img))
        Ks.append(K)
        rvec = rotmat_to_rvec(torch.from_numpy(ann.R)[None])[0].numpy()
        poses.append(np.concatenate([rvec, ann.t]))
        ids.append((ann.scene_id, ann.im_id, ann.obj_id))
        visib.append(1.0 if ann.visib_fract is None else ann.visib_fract)
        dists.append(np.zeros(5) if ann.dist is None else ann.dist)
    arrays = (
        np.stack(images),
        np.stack(Ks),
        np.stack(poses),
        np.array(ids, dtype=np.int64),
        np.array(visib),
        np.stack(dists),
    )
    if cache and limit is None:
        try:
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npz")  # ranks of one run may race here
            # Compressed: smaller than the split's own PNGs (uncompressed it was 1.8x their size);
            # reading it back costs ~1 s per 4,000 images of 128 px.
            names = ("images", "K", "pose", "ids", "visib", "dist")
            np.savez_compressed(tmp, key=key, **dict(zip(names, arrays)))
            tmp.replace(cache_file)
        except OSError:  # a read-only data set: keep it in memory
            pass
    return _with_keypoints(*arrays, keypoints3d)


def _scenes(split_dir: Path) -> list[Path]:
    scenes = bop.scene_dirs(split_dir) if split_dir.is_dir() else []
    if not scenes:
        raise FileNotFoundError(f"{split_dir}: no BOP scene folders (NNNNNN/scene_gt.json)")
    return scenes


def _instances(split_dir: Path, scenes: list[Path], obj_id: int, min_visib: float) -> list:
    """``(scene_dir, annotation)`` of every instance that :func:`load_split` reads, in its order."""
    anns = [
        (scene_dir, ann)
        for scene_dir in scenes
        for ann in bop.read_scene(scene_dir)
        if ann.obj_id == obj_id and (ann.visib_fract is None or ann.visib_fract >= min_visib)
    ]
    if not anns:
        raise ValueError(f"{split_dir}: no instance of obj_id {obj_id}")
    return anns


# Codes of keypoint_visibility.
VISIBLE, HIDDEN_BY_OBJECT, COVERED, OFF_IMAGE, INTERIOR = 0, 1, 2, 3, 4


def keypoint_visibility(
    split_dir: str | Path,
    keypoints3d: np.ndarray,
    obj_id: int = OBJ_ID,
    min_visib: float = 0.0,
    limit: int | None = None,
) -> np.ndarray:
    """Whether each keypoint can be seen in each image of a BOP split, row for row as
    :func:`load_split` reads it (same ``obj_id``, ``min_visib``, ``limit``).

    Codes: ``VISIBLE`` (0); ``HIDDEN_BY_OBJECT`` (1): behind the object's own surface, by ray
    casting the model (:func:`~bpnp.pose.mesh.hidden_by_surface`); ``COVERED`` (2): in the
    object's mask but not in its visible mask (``mask/``, ``mask_visib/``; within a pixel):
    something else lies in front; ``OFF_IMAGE`` (3); ``INTERIOR`` (4): seen from no viewpoint at
    all (inside the object, as the centre is; :func:`~bpnp.pose.mesh.seen_share`), in every row.
    Where the masks are missing, nothing counts as covered.

    Args:
        split_dir: a folder of BOP scenes; keypoints3d: ``(k, 3)`` object points (mm).
    Returns:
        ``(N, k)`` uint8 codes.
    Raises:
        FileNotFoundError: no scenes or no models; ValueError: no instance of ``obj_id``.
    """
    import cv2

    from .mesh import hidden_by_surface, seen_share

    split_dir = Path(split_dir)
    anns = _instances(split_dir, _scenes(split_dir), obj_id, min_visib)[:limit]
    kp = np.asarray(keypoints3d, dtype=np.float64)
    mesh = load_mesh(bop.model_path(bop.find_models_dir(split_dir), obj_id), diameter_mm=None)
    # load_mesh centres the model: rays must be cast in the file's (the poses') coordinates.
    mesh.vertices = mesh.vertices + mesh.centre
    R = np.stack([a.R for _, a in anns])
    t = np.stack([a.t for _, a in anns])
    codes = np.where(hidden_by_surface(mesh, kp, R, t), HIDDEN_BY_OBJECT, VISIBLE).astype(np.uint8)
    for row, (scene_dir, ann) in enumerate(anns):
        name = f"{ann.im_id:06d}_{ann.instance:06d}.png"
        paths = (scene_dir / "mask" / name, scene_dir / "mask_visib" / name)
        if not all(path.is_file() for path in paths):  # photographs have no masks: not asked (OpenCV warns)
            continue
        full, visib = (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) for path in paths)
        if full is None or visib is None:
            continue
        uv = np.rint(_project(kp, ann.R, ann.t, ann.K, ann.dist)).astype(np.int64)
        H, W = full.shape
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
        # Over the pixel's 3x3 neighbourhood: a keypoint on the silhouette may round to just outside.
        kernel = np.ones((3, 3), np.uint8)
        near_full, near_visib = cv2.dilate(full, kernel) > 127, cv2.dilate(visib, kernel) > 127
        u, v = np.clip(uv[:, 0], 0, W - 1), np.clip(uv[:, 1], 0, H - 1)
        covered = near_full[v, u] & ~near_visib[v, u]
        codes[row, covered & (codes[row] == VISIBLE)] = COVERED
        codes[row, ~inside] = OFF_IMAGE
    codes[:, seen_share(mesh, kp) == 0] = INTERIOR
    return codes


def _with_keypoints(images, K, pose, ids, visib, dist, keypoints3d) -> PoseData:
    # Pinhole images (every coefficient 0) keep dist None: the solver's pinhole path, exactly.
    data = PoseData(images, K, pose, keypoints3d, None, ids, visib, dist if np.any(dist) else None)
    data.keypoints2d = data.project(keypoints3d)
    return data


def augment_image(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photometric augmentation of one ``(S, S, 3)`` uint8 image: brightness, contrast,
    saturation, per-channel gain, blur and noise. Returns float32 in [0, 1]."""
    import cv2

    x = img.astype(np.float32) / 255.0
    grey = x.mean(-1, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.6, 1.4)  # saturation
    x = (x - x.mean()) * rng.uniform(0.7, 1.3) + x.mean() + rng.uniform(-0.15, 0.15)  # contrast, brightness
    x = x * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    if rng.random() < 0.3:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.0))
    x = x + rng.normal(0, rng.uniform(0, 0.03), x.shape).astype(np.float32)
    return np.clip(x, 0, 1).astype(np.float32)
