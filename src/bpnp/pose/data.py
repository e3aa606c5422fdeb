"""Training data for object pose: rendering a data set in BOP format, loading any BOP split into
arrays (cropped around the object when the images are larger), and augmentation.

Rendering is deterministic per seed; loading writes a packed cache (``bpnp_cache_*.npz``) beside
the split so that the next read is one ``np.load``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bop
from .mesh import (
    _unit_axis,
    distinctive_keypoints,
    farthest_point_keypoints,
    load_mesh,
    rotations_about,
    write_ply,
)
from .photo import camera_effects, hand_occluder, photo_background

__all__ = [
    "PoseData",
    "RenderSettings",
    "render_dataset",
    "render_splits",
    "load_split",
    "load_keypoints",
    "keypoint_visibility",
    "random_rotation",
    "augment_image",
]

OBJ_ID = 1  # the object id of rendered data sets


@dataclass
class RenderSettings:
    """How :func:`render_dataset` draws its images.

    Attributes:
        size: image side (pixels); focal: focal length in units of ``size``.
        fill: range of the object's bounding-box side over the image side.
        occluder_prob: chance that an image gets random occluders over the object.
        background: ``"procedural"`` (random noise, gradients, stripes and shapes) or ``"black"``.
        view_cone: None: every viewpoint (rotations uniform on SO(3)); an angle in degrees: the
            camera sees the object's ``-z`` side from within this angle of its ``z`` axis (uniform
            over that cap, any in-plane angle): a planar target (a board, a marker) seen from the
            front and never edge-on.
        photo: look like photographs (:mod:`bpnp.pose.photo`): photo-like backgrounds for half
            the images, a hand over the object's edge instead of polygons for half the occluded
            ones, and a camera's exposure, gamma, vignetting, blur, noise, grayscale and JPEG.
    """

    size: int = 128
    focal: float = 2.0
    fill: tuple[float, float] = (0.4, 0.8)
    occluder_prob: float = 0.3
    background: str = "procedural"
    view_cone: float | None = None
    photo: bool = False

    def __post_init__(self) -> None:
        if self.view_cone is not None and not 0 < self.view_cone <= 180:
            raise ValueError(f"view_cone: expected an angle in (0, 180] degrees, got {self.view_cone}")


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
    """

    images: np.ndarray
    K: np.ndarray
    pose: np.ndarray
    keypoints3d: np.ndarray
    keypoints2d: np.ndarray
    ids: np.ndarray
    visib_fract: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation uniform on SO(3) (every viewpoint on the sphere and in-plane angle alike)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def rotation_in_cone(rng: np.random.Generator, cone_deg: float) -> np.ndarray:
    """A rotation whose third column (the object's z axis in the camera) lies within ``cone_deg``
    of the optical axis, uniform over that spherical cap, with a uniform angle about it."""
    cos_tilt = rng.uniform(np.cos(np.radians(cone_deg)), 1.0)
    tilt = np.arccos(cos_tilt)
    heading = rng.uniform(0, 2 * np.pi)
    axis = np.array([np.cos(heading), np.sin(heading), 0.0])
    spin = rng.uniform(0, 2 * np.pi)
    return rotations_about(axis, [tilt])[0] @ rotations_about(np.array([0.0, 0.0, 1.0]), [spin])[0]


def _project(points: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray) -> np.ndarray:
    cam = points @ R.T + t
    uv = cam @ K.T
    return uv[:, :2] / uv[:, 2:3]


def _place(
    rng: np.random.Generator, verts: np.ndarray, diameter: float, K: np.ndarray, size: int, fill, cone: float | None
):
    """A pose whose projected bounding box spans ``fill`` of the image, placed at random inside it."""
    R = random_rotation(rng) if cone is None else rotation_in_cone(rng, cone)
    d = K[0, 0] * diameter / (0.6 * size)
    target = rng.uniform(*fill) * size
    t = np.array([0.0, 0.0, d])
    for _ in range(3):  # the box side scales ~1/depth: a few fixed-point steps
        uv = _project(verts, R, t, K)
        side = (uv.max(0) - uv.min(0)).max()
        t = t * side / target
    uv = _project(verts, R, t, K)
    lo, hi = uv.min(0), uv.max(0)
    centre = (lo + hi) / 2
    half = (hi - lo) / 2
    want = np.array([rng.uniform(half[i], size - 1 - half[i]) if size - 1 > 2 * half[i] else size / 2 for i in (0, 1)])
    t[:2] += (want - centre) * t[2] / np.array([K[0, 0], K[1, 1]])
    return R, t


def _hull_points(vertices: np.ndarray) -> np.ndarray:
    from .mesh import hull_vertices

    return hull_vertices(vertices)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random procedural background ``(S, S, 3)`` float32 in [0, 1]."""
    import cv2

    kind = rng.integers(4)
    if kind == 0:  # smooth colour noise
        cells = int(rng.integers(2, 12))
        img = cv2.resize(rng.random((cells, cells, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    elif kind == 1:  # linear gradient between two colours
        a, b = rng.random(3), rng.random(3)
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / size
        s = np.clip((np.cos(ang) * xx + np.sin(ang) * yy + 1) / 2, 0, 1)[..., None]
        img = (a * (1 - s) + b * s).astype(np.float32)
    elif kind == 2:  # stripes or checks
        a, b = rng.random(3), rng.random(3)
        period = rng.uniform(4, size / 2)
        ang = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        u = np.cos(ang) * xx + np.sin(ang) * yy
        v = -np.sin(ang) * xx + np.cos(ang) * yy
        m = np.floor(u / period) % 2 if rng.random() < 0.5 else (np.floor(u / period) + np.floor(v / period)) % 2
        img = np.where(m[..., None] > 0, a, b).astype(np.float32)
    else:  # random shapes on a base colour
        img = np.ones((size, size, 3), np.float32) * rng.random(3).astype(np.float32)
        for _ in range(int(rng.integers(3, 12))):
            colour = tuple(float(c) for c in rng.random(3))
            c = tuple(int(v) for v in rng.integers(0, size, 2))
            if rng.random() < 0.5:
                axes = tuple(int(v) for v in rng.integers(2, size // 2, 2))
                cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
            else:
                c2 = tuple(int(v) for v in rng.integers(0, size, 2))
                cv2.rectangle(img, c, c2, colour, -1)
    img = img + rng.normal(0, rng.uniform(0, 0.04), img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _compose(rng, settings: RenderSettings, rgb: np.ndarray, cover: np.ndarray, mask: np.ndarray):
    """The object over a background, occluders over both: ``(S, S, 3)`` float image and the
    ``(S, S)`` visible part of the mask."""
    S = settings.size
    if settings.background != "procedural":
        bg = np.zeros((S, S, 3), np.float32)
    elif settings.photo and rng.random() < 0.5:
        bg = photo_background(rng, S)
    else:
        bg = _background(rng, S)
    img = bg * (1 - cover[..., None]) + rgb.astype(np.float32) / 255 * cover[..., None]
    visible = mask.copy()
    if rng.random() < settings.occluder_prob and mask.any():
        hand = settings.photo and rng.random() < 0.5
        occ, colour = (hand_occluder if hand else _occluders)(rng, S, tuple(_bbox(mask)))
        img = img * (1 - occ[..., None]) + colour * occ[..., None]
        visible &= occ < 0.5
    return img, visible


def _occluders(rng: np.random.Generator, size: int, bbox: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Random polygons over the object's box: ``(S, S)`` coverage and ``(S, S, 3)`` colours."""
    import cv2

    x, y, w, h = bbox
    cover = np.zeros((size, size), np.float32)
    colour = np.zeros((size, size, 3), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = x + rng.uniform(0, w), y + rng.uniform(0, h)
        radius = rng.uniform(0.1, 0.3) * max(w, h)
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
        pts = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
        layer = np.zeros((size, size), np.float32)
        cv2.fillPoly(layer, [np.round(pts * 16).astype(np.int32)], 1.0, lineType=cv2.LINE_AA, shift=4)
        colour = np.where(layer[..., None] > 0, rng.random(3).astype(np.float32), colour)
        cover = np.maximum(cover, layer)
    return cover, colour


def _shading(rng: np.random.Generator):
    from .render import Shading

    light = rng.normal(size=3)
    light[2] = -abs(light[2]) - 0.5  # from the camera's side
    return Shading(
        light_dir=light,
        tint=rng.uniform(0.8, 1.2, 3),
        ambient=rng.uniform(0.2, 0.5),
        diffuse=rng.uniform(0.5, 0.9),
        specular=rng.uniform(0.0, 0.3),
    )


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [-1, -1, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def render_dataset(
    mesh_path: str | Path,
    out: str | Path,
    count: int,
    settings: RenderSettings | None = None,
    seed: int = 0,
    split: str = "train",
    diameter_mm: float = 100.0,
    num_keypoints: int = 8,
    symmetric: str | None = None,
    texture: str | Path | None = None,
    progress: Callable | None = None,
    keypoint_method: str = "fps",
    keypoints: np.ndarray | None = None,
) -> Path:
    """Render ``count`` images of a mesh into ``out/<split>`` in BOP format.

    ``out/models/`` receives the model (PLY, mm) and ``models_info.json``; ``out/keypoints.json``
    the keypoints (farthest-point surface samples and the centre), kept when it already exists
    so that every split of a data set shares them. Per image: ``rgb/``, ``mask/``,
    ``mask_visib/`` PNGs and the entries of ``scene_gt.json``, ``scene_camera.json``,
    ``scene_gt_info.json``, and (beside BOP's files) ``scene_keypoints.json``: the keypoints'
    pixel positions ``(k, 2)`` per image.

    Args:
        mesh_path: any mesh trimesh reads; out: the data-set folder; count: images.
        settings: :class:`RenderSettings`; seed: makes the split reproducible.
        diameter_mm: the physical size given to the mesh; num_keypoints: surface keypoints.
        symmetric: ``"x"``, ``"y"`` or ``"z"``: record a continuous symmetry about that axis of
            the model (through its centre) so that evaluation uses ADD-S; None: not symmetric.
        texture: texture image for a mesh with UV coordinates (default: found beside the mesh).
        progress: wraps the image loop (e.g. a progress bar), called as ``progress(iterable, total)``.
        keypoint_method: ``"fps"`` (farthest point sampling over the whole surface) or
            ``"distinctive"`` (over the points that no turn about the ``symmetric`` axis maps
            onto the surface elsewhere: :func:`bpnp.pose.mesh.distinctive_keypoints`).
        keypoints: ``(k, 3)`` keypoints in the frame of the loaded (centred) mesh instead of
            sampled ones (e.g. a board's corners, :func:`bpnp.pose.targets.board_keypoints`).
    Returns:
        the split folder.
    Raises:
        ValueError: ``out`` holds keypoints chosen by another method; ``symmetric`` is not an
            axis letter.
    """
    import cv2

    from .render import Renderer

    # Checked before anything is written: a bad letter must not leave a half-made data set.
    if symmetric not in (None, "x", "y", "z"):
        raise ValueError(f"symmetric: expected 'x', 'y', 'z' or None, got {symmetric!r}")
    settings = settings or RenderSettings()
    out = Path(out)
    mesh = load_mesh(mesh_path, diameter_mm=diameter_mm, texture=texture)
    diameter = mesh.diameter
    keypoints = write_model(mesh, out, Path(mesh_path).name, num_keypoints, keypoint_method, symmetric, keypoints)
    S = settings.size
    f = settings.focal * S
    K = np.array([[f, 0.0, (S - 1) / 2], [0.0, f, (S - 1) / 2], [0.0, 0.0, 1.0]])
    renderer = Renderer(mesh, S, S)
    hull = _hull_points(mesh.vertices)  # the projected box depends on these alone
    rng = np.random.default_rng(seed)
    split_dir = out / split
    per_scene = 1000
    scenes: dict[int, tuple[dict, dict, dict]] = {}
    loop = range(count) if progress is None else progress(range(count), count)
    for i in loop:
        scene_id, im_id = divmod(i, per_scene)
        scene_dir = split_dir / f"{scene_id:06d}"
        if scene_id not in scenes:
            for sub in ("rgb", "mask", "mask_visib"):
                (scene_dir / sub).mkdir(parents=True, exist_ok=True)
            scenes[scene_id] = ({}, {}, {}, {})
        R, t = _place(rng, hull, diameter, K, S, settings.fill, settings.view_cone)
        rgb, cover = renderer.render(R, t, K, _shading(rng))
        mask = cover > 0.5
        img, visible = _compose(rng, settings, rgb, cover, mask)
        img8 = camera_effects(img, rng) if settings.photo else np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
        cv2.imwrite(str(scene_dir / "rgb" / f"{im_id:06d}.png"), img8[..., ::-1])
        cv2.imwrite(str(scene_dir / "mask" / f"{im_id:06d}_000000.png"), mask.astype(np.uint8) * 255)
        cv2.imwrite(str(scene_dir / "mask_visib" / f"{im_id:06d}_000000.png"), visible.astype(np.uint8) * 255)
        gt, cam, meta, kps = scenes[scene_id]
        kps[im_id] = _project(keypoints, R, t, K).tolist()
        gt[im_id] = [{"cam_R_m2c": R.reshape(-1), "cam_t_m2c": t, "obj_id": OBJ_ID}]
        cam[im_id] = {"cam_K": K.reshape(-1), "depth_scale": 1.0}
        n_all, n_vis = int(mask.sum()), int(visible.sum())
        meta[im_id] = [
            {
                "bbox_obj": _bbox(mask),
                "bbox_visib": _bbox(visible),
                "px_count_all": n_all,
                "px_count_visib": n_vis,
                "visib_fract": n_vis / max(n_all, 1),
            }
        ]
    renderer.release()
    for scene_id, (gt, cam, meta, kps) in scenes.items():
        bop.write_scene(split_dir / f"{scene_id:06d}", gt, cam, meta)
        # Not a BOP file: the 2D keypoints of each image, for tools that want them as data.
        (split_dir / f"{scene_id:06d}" / "scene_keypoints.json").write_text(
            json.dumps({str(k): v for k, v in kps.items()})
        )
    (split_dir / "render_settings.json").write_text(
        json.dumps({**settings.__dict__, "seed": seed, "count": count, "mesh": str(mesh_path)}, indent=1)
    )
    load_split(split_dir, size=S)  # writes the packed cache
    return split_dir


KEYPOINT_METHODS = ("fps", "distinctive")


def write_model(
    mesh,
    out: str | Path,
    source: str,
    num_keypoints: int = 8,
    keypoint_method: str = "fps",
    symmetric: str | None = None,
    keypoints: np.ndarray | None = None,
) -> np.ndarray:
    """Write the model of a data set (``out/models/obj_000001.ply``, ``models_info.json``) and its
    keypoints (``out/keypoints.json``, kept when it exists); returns the keypoints ``(k + 1, 3)``.

    Args:
        mesh: the :class:`~bpnp.pose.mesh.Mesh` (millimetres); out: the data-set folder; source:
        the mesh file's name (recorded); num_keypoints, keypoint_method, symmetric, keypoints: as
        :func:`render_dataset`.
    """
    out = Path(out)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    write_ply(mesh, models / f"obj_{OBJ_ID:06d}.ply")
    lo, hi = mesh.vertices.min(0), mesh.vertices.max(0)
    info = {"diameter": mesh.diameter, "min_x": lo[0], "min_y": lo[1], "min_z": lo[2]}
    info.update({"size_x": hi[0] - lo[0], "size_y": hi[1] - lo[1], "size_z": hi[2] - lo[2]})
    if symmetric is not None:
        info["symmetries_continuous"] = [{"axis": _unit_axis(symmetric).tolist(), "offset": [0.0, 0.0, 0.0]}]
    bop.write_models_info(models, {OBJ_ID: info})
    if keypoints is not None:
        keypoint_method = "given"
    elif _check_keypoint_method(out, keypoint_method):
        return load_keypoints(out, OBJ_ID)
    if keypoints is not None:
        keypoints = np.asarray(keypoints, dtype=np.float64)
    elif keypoint_method == "distinctive":
        keypoints = distinctive_keypoints(mesh, num_keypoints, axis=symmetric, seed=0)
    else:
        keypoints = farthest_point_keypoints(mesh, num_keypoints, seed=0)
    record = {str(OBJ_ID): keypoints.tolist(), "source": source, "method": keypoint_method}
    (out / "keypoints.json").write_text(json.dumps(record, indent=1))
    return keypoints


def _check_keypoint_method(out: Path, method: str) -> bool:
    """Whether ``out/keypoints.json`` exists; ValueError when it was chosen by another method
    (files without a method were written by farthest point sampling)."""
    if method not in KEYPOINT_METHODS:
        raise ValueError(f"keypoint_method: expected one of {KEYPOINT_METHODS}, got {method!r}")
    kp_file = Path(out) / "keypoints.json"
    if not kp_file.is_file():
        return False
    found = json.loads(kp_file.read_text()).get("method", "fps")
    if found != method:
        raise ValueError(f"{kp_file}: keypoints chosen by {found!r}, not {method!r}; use another folder")
    return True


def render_splits(
    mesh_path: str | Path,
    out: str | Path,
    counts: dict[str, int],
    settings: RenderSettings | None = None,
    seed: int = 0,
    symmetric: str | None = None,
    progress: Callable | None = None,
    keypoint_method: str = "fps",
) -> dict[str, Path]:
    """Render each split of ``counts`` (e.g. ``{"train": 4000, "test": 500}``) into ``out``
    unless it is already there with the same settings; split ``i`` uses seed
    ``10000 * (i + 1) + seed``, so that the splits never share an image.

    Returns:
        ``{split: folder}``.
    Raises:
        ValueError: a split exists but was rendered otherwise (another mesh, count, size or seed),
            or the keypoints there were chosen by another ``keypoint_method``.
    """
    settings = settings or RenderSettings()
    _check_keypoint_method(Path(out), keypoint_method)
    folders = {}
    for i, (split, count) in enumerate(counts.items()):
        split_seed = 10_000 * (i + 1) + seed
        wanted = {**settings.__dict__, "seed": split_seed, "count": count, "mesh": str(mesh_path)}
        record = Path(out) / split / "render_settings.json"
        if record.is_file():
            found = json.loads(record.read_text())
            found["fill"] = tuple(found["fill"])
            if found != wanted:
                diff = sorted(k for k in wanted if found.get(k) != wanted[k])
                raise ValueError(
                    f"{record.parent}: rendered with other settings ({', '.join(diff)}); use another folder"
                )
            folders[split] = record.parent
        else:
            folders[split] = render_dataset(
                mesh_path,
                out,
                count,
                settings,
                seed=split_seed,
                split=split,
                symmetric=symmetric,
                progress=progress,
                keypoint_method=keypoint_method,
            )
    return folders


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
    models = bop.find_models_dir(dataset_dir)
    mesh = load_mesh(models / f"obj_{obj_id:06d}.ply", diameter_mm=None)
    # load_mesh centres the mesh on its box; keypoints must be in the model's own frame.
    return farthest_point_keypoints(mesh, count, seed=0) + mesh.centre


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
    stamp = [(p.name, (p / "scene_gt.json").stat().st_size, (p / "scene_gt.json").stat().st_mtime_ns) for p in scenes]
    key = json.dumps([stamp, obj_id, size, margin, min_visib])
    cache_file = split_dir / f"bpnp_cache_obj{obj_id}_{size}.npz"
    if cache and limit is None and cache_file.is_file():
        with np.load(cache_file) as z:
            if str(z["key"]) == key:
                arrays = (z["images"], z["K"], z["pose"], z["ids"], z["visib"])
                return _with_keypoints(*arrays, load_keypoints(split_dir, obj_id))
    # Parsed only on a miss: the scene files of 20,000 images take most of a cached read.
    # Before the keypoints, so that an absent object is named as such, not as a missing model.
    anns = _instances(split_dir, scenes, obj_id, min_visib)
    keypoints3d = load_keypoints(split_dir, obj_id)
    images, Ks, poses, ids, visib = [], [], [], [], []
    for scene_dir, ann in anns[:limit]:
        img = cv2.imread(str(bop.image_path(scene_dir, ann.im_id)), cv2.IMREAD_COLOR)[..., ::-1]
        K = ann.K
        if img.shape[0] != size or img.shape[1] != size:
            bbox = ann.bbox_obj
            if bbox is None or bbox[2] <= 0:
                uv = _project(keypoints3d, ann.R, ann.t, K)
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
    arrays = (np.stack(images), np.stack(Ks), np.stack(poses), np.array(ids, dtype=np.int64), np.array(visib))
    if cache and limit is None:
        try:
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npz")  # ranks of one run may race here
            np.savez(tmp, images=arrays[0], K=arrays[1], pose=arrays[2], ids=arrays[3], visib=arrays[4], key=key)
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
    models = bop.find_models_dir(split_dir)
    mesh = load_mesh(models / f"obj_{obj_id:06d}.ply", diameter_mm=None)
    # load_mesh centres the model: rays must be cast in the file's (the poses') coordinates.
    mesh.vertices = mesh.vertices + mesh.centre
    R = np.stack([a.R for _, a in anns])
    t = np.stack([a.t for _, a in anns])
    codes = np.where(hidden_by_surface(mesh, kp, R, t), HIDDEN_BY_OBJECT, VISIBLE).astype(np.uint8)
    for row, (scene_dir, ann) in enumerate(anns):
        name = f"{ann.im_id:06d}_{ann.instance:06d}.png"
        full = cv2.imread(str(scene_dir / "mask" / name), cv2.IMREAD_GRAYSCALE)
        visib = cv2.imread(str(scene_dir / "mask_visib" / name), cv2.IMREAD_GRAYSCALE)
        if full is None or visib is None:
            continue
        uv = np.rint(_project(kp, ann.R, ann.t, ann.K)).astype(np.int64)
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


def _with_keypoints(images, K, pose, ids, visib, keypoints3d) -> PoseData:
    import torch

    from ..geometry import project

    kp2d = project(torch.from_numpy(keypoints3d), torch.from_numpy(pose), torch.from_numpy(K)).numpy()
    return PoseData(images, K, pose, keypoints3d, kp2d, ids, visib)


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
