"""Synthetic training data: a mesh rendered into a BOP-format data set (poses, lighting,
backgrounds, occluders, photo-like camera effects), with its model and keypoints.

Rendering is deterministic per seed; each split is loaded once after rendering
(:func:`~bpnp.pose.data.load_split`) so that its packed cache is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import bop
from .config import RenderSettings
from .data import OBJ_ID, _project, load_keypoints, load_split
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
    "render_dataset",
    "render_splits",
    "write_model",
    "random_rotation",
    "rotation_in_cone",
    "KEYPOINT_METHODS",
]


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


def _place(
    rng: np.random.Generator,
    verts: np.ndarray,
    diameter: float,
    K: np.ndarray,
    size: int,
    fill,
    cone: float | None,
    lens: tuple | None = None,
):
    """A pose whose projected bounding box spans ``fill`` of the image, placed at random inside it
    (through ``lens``: the pinhole placement, then moved so that the lens's box has its centre)."""
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
    for _ in range(3 if lens is not None else 0):  # the lens moves the box: fixed-point steps back
        uv = _project(verts, R, t, K, lens)
        t[:2] += (want - (uv.min(0) + uv.max(0)) / 2) * t[2] / np.array([K[0, 0], K[1, 1]])
    return R, t


def _shift(margin: int) -> np.ndarray:
    """What a camera matrix gains when its image is padded by ``margin`` pixels on every side."""
    return np.array([[0.0, 0.0, margin], [0.0, 0.0, margin], [0.0, 0.0, 0.0]])


def _lens_window(rng: np.random.Generator, settings: RenderSettings) -> np.ndarray:
    """The camera matrix of a ``size``-pixel window of the lens's camera whose centre lies at a
    random distorted image point within ``lens_field`` of the axis (uniform over that disc)."""
    S, f = settings.size, settings.focal * settings.size
    radius, angle = settings.lens_field * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    centre = radius * np.array([np.cos(angle), np.sin(angle)])
    c = (S - 1) / 2 - f * centre
    return np.array([[f, 0.0, c[0]], [0.0, f, c[1]], [0.0, 0.0, 1.0]])


def _undistorted_window(K: np.ndarray, lens: tuple, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel of a lens window lies in the pinhole image of the same camera matrix:
    ``(size, size, 2)`` pixels, and ``(size, size)`` whether the lens has an inverse there."""
    import torch

    from ..geometry import undistort_points

    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    xd = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]], -1).reshape(-1, 2)
    xn, ok = undistort_points(torch.from_numpy(xd), torch.tensor(lens, dtype=torch.float64))
    xn = xn.numpy()
    pix = np.stack([K[0, 0] * xn[:, 0] + K[0, 2], K[1, 1] * xn[:, 1] + K[1, 2]], -1)
    return pix.reshape(size, size, 2), ok.numpy().reshape(size, size)


def _lens_margin(settings: RenderSettings) -> int:
    """Pixels by which the pinhole render must overhang a lens window, wherever the window lies."""
    if settings.lens is None:
        return 0
    S, f = settings.size, settings.focal * settings.size
    worst = 0.0
    for angle in np.linspace(0, 2 * np.pi, 16, endpoint=False):
        centre = settings.lens_field * np.array([np.cos(angle), np.sin(angle)])
        K = np.array([[f, 0.0, (S - 1) / 2 - f * centre[0]], [0.0, f, (S - 1) / 2 - f * centre[1]], [0, 0, 1.0]])
        pix, ok = _undistorted_window(K, settings.lens, S)
        if not ok.all():
            raise ValueError(f"lens {settings.lens}: not invertible within lens_field {settings.lens_field}")
        worst = max(worst, float(np.abs(pix - np.clip(pix, 0, S - 1)).max()))
    if worst > 2 * S:
        raise ValueError(
            f"lens {settings.lens}: a window {settings.lens_field} off axis needs {worst:.0f} px of render"
        )
    return int(np.ceil(worst)) + 2


def _through_lens(rgb: np.ndarray, cover: np.ndarray, K: np.ndarray, lens: tuple, margin: int, size: int):
    """The window of ``K`` through ``lens``, from the pinhole render padded by ``margin``."""
    import cv2

    pix, _ = _undistorted_window(K, lens, size)
    maps = (pix + margin).astype(np.float32)
    mx, my = np.ascontiguousarray(maps[..., 0]), np.ascontiguousarray(maps[..., 1])
    rgb = cv2.remap(rgb, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    cover = cv2.remap(cover.astype(np.float32), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return rgb, cover


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
    margin = _lens_margin(settings)
    renderer = Renderer(mesh, S + 2 * margin, S + 2 * margin)
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
        if settings.lens is not None:
            K = _lens_window(rng, settings)
        R, t = _place(rng, hull, diameter, K, S, settings.fill, settings.view_cone, settings.lens)
        rgb, cover = renderer.render(R, t, K + _shift(margin), _shading(rng))
        if settings.lens is not None:
            rgb, cover = _through_lens(rgb, cover, K, settings.lens, margin, S)
        mask = cover > 0.5
        img, visible = _compose(rng, settings, rgb, cover, mask)
        img8 = camera_effects(img, rng) if settings.photo else np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
        cv2.imwrite(str(scene_dir / "rgb" / f"{im_id:06d}.png"), img8[..., ::-1])
        cv2.imwrite(str(scene_dir / "mask" / f"{im_id:06d}_000000.png"), mask.astype(np.uint8) * 255)
        cv2.imwrite(str(scene_dir / "mask_visib" / f"{im_id:06d}_000000.png"), visible.astype(np.uint8) * 255)
        gt, cam, meta, kps = scenes[scene_id]
        kps[im_id] = _project(keypoints, R, t, K, settings.lens).tolist()
        gt[im_id] = [{"cam_R_m2c": R.reshape(-1), "cam_t_m2c": t, "obj_id": OBJ_ID}]
        cam[im_id] = {"cam_K": K.reshape(-1), "depth_scale": 1.0}
        if settings.lens is not None:
            cam[im_id]["dist"] = list(settings.lens)  # not a BOP field: OpenCV's (k1, k2, p1, p2, k3)
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
    write_ply(mesh, bop.model_path(models, OBJ_ID))
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
