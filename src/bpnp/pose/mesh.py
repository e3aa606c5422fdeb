"""Meshes for pose estimation: loading any OBJ/PLY/GLB, physical scale, diameter, keypoints.

A :class:`Mesh` is centred at its bounding-box centre and scaled to a physical diameter in
millimetres (BOP's convention), so that the keypoint centre (the origin) is the object's centre.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Mesh",
    "load_mesh",
    "mesh_diameter",
    "farthest_point_keypoints",
    "distinctive_keypoints",
    "symmetry_axis_point",
    "symmetry_look_alikes",
    "hidden_by_surface",
    "seen_share",
    "write_ply",
]


@dataclass
class Mesh:
    """A triangle mesh in millimetres.

    Attributes:
        vertices: ``(V, 3)`` float64 positions (mm), centred at the bounding-box centre.
        faces: ``(F, 3)`` int64 vertex indices.
        normals: ``(V, 3)`` unit vertex normals.
        uv: ``(V, 2)`` texture coordinates in [0, 1] or None.
        texture: ``(H, W, 3)`` uint8 texture image (rows from the top) or None.
        colors: ``(V, 3)`` float vertex colours in [0, 1] or None.
        name: a short name (the file's stem).
        centre: ``(3,)`` the file's coordinates of the bounding-box centre that was subtracted
            (before any scaling): with ``diameter_mm=None``, ``vertices + centre`` are the file's
            own coordinates.
    """

    vertices: np.ndarray
    faces: np.ndarray
    normals: np.ndarray
    uv: np.ndarray | None = None
    texture: np.ndarray | None = None
    colors: np.ndarray | None = None
    name: str = "object"
    centre: np.ndarray | None = None

    @property
    def diameter(self) -> float:
        """Largest distance between two vertices (mm)."""
        return mesh_diameter(self.vertices)


def hull_vertices(points: np.ndarray) -> np.ndarray:
    """The vertices of the convex hull of ``(V, 3)`` points, taken in the points' own span: a flat
    object (a card, a marker, a board) has a polygon, a rod two ends, a point itself."""
    pts = np.asarray(points, dtype=np.float64)
    centred = pts - pts.mean(0)
    _, sv, axes = np.linalg.svd(centred, full_matrices=False)
    rank = int((sv > 1e-9 * sv[0]).sum()) if len(sv) and sv[0] > 0 else 0
    coords = centred @ axes[:rank].T
    if rank >= 2 and len(pts) > rank + 1:
        from scipy.spatial import ConvexHull

        return pts[ConvexHull(coords).vertices]
    if rank == 1:
        return pts[[int(coords[:, 0].argmin()), int(coords[:, 0].argmax())]]
    return pts if rank >= 2 else pts[:1]


def mesh_diameter(vertices: np.ndarray) -> float:
    """Largest distance between two points of ``(V, 3)`` (exact: over the convex hull's vertices
    when there are many points; flat objects too, see :func:`hull_vertices`)."""
    pts = np.asarray(vertices, dtype=np.float64)
    if len(pts) > 200:
        pts = hull_vertices(pts)
    best = 0.0
    for start in range(0, len(pts), 1024):  # (1024, V) blocks keep memory small
        d = np.linalg.norm(pts[start : start + 1024, None, :] - pts[None, :, :], axis=-1)
        best = max(best, float(d.max()))
    return best


def _warn_missing_materials(path: Path) -> None:
    """An OBJ whose ``mtllib`` file is missing loads without its colours and textures: say so,
    naming the file it looked for."""
    if path.suffix.lower() != ".obj":
        return
    with open(path, errors="replace") as f:
        libraries = [
            line.split(None, 1)[1].strip() for line in f if line.startswith("mtllib ") and len(line.split()) > 1
        ]
    for name in libraries:
        if not (path.parent / name).is_file():
            warnings.warn(
                f"{path}: its material file {name} is not beside it; the mesh renders without its colours and textures",
                stacklevel=3,
            )


def load_mesh(path: str | Path, diameter_mm: float | None = 100.0, texture: str | Path | None = None) -> Mesh:
    """Load a mesh file (OBJ, PLY, GLB, ... through trimesh), centre it and scale it.

    Args:
        path: the mesh file. A texture is kept when the file has UV coordinates and an image
            (its material's, ``texture``, or else the only PNG/JPEG image beside the file).
        diameter_mm: scale so that the diameter is this many millimetres; None keeps the file's
            units (BOP models are already in millimetres).
        texture: an image file to use as the texture of a mesh with UV coordinates.
    Returns:
        :class:`Mesh`.
    Raises:
        ValueError: the file has no triangles.
    """
    import trimesh

    path = Path(path)
    _warn_missing_materials(path)
    # process=False keeps the vertices split along texture seams, so UVs stay per vertex.
    mesh = trimesh.load(str(path), force="mesh", process=False)
    if not hasattr(mesh, "faces") or len(mesh.faces) == 0:
        raise ValueError(f"{path}: no triangles in this mesh")
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    uv = texture = colors = None
    visual = mesh.visual
    if getattr(visual, "kind", None) == "texture" and getattr(visual, "uv", None) is not None:
        image = getattr(visual.material, "image", None)
        if image is None and hasattr(visual.material, "baseColorTexture"):
            image = visual.material.baseColorTexture
        if len(visual.uv) == len(vertices):
            uv = np.asarray(visual.uv, dtype=np.float64)
            texture = _texture_image(path, texture, image)
            if texture is None:
                uv = None
    elif getattr(visual, "kind", None) == "vertex":
        rgba = np.asarray(visual.vertex_colors, dtype=np.float64) / 255.0
        if len(rgba) == len(vertices) and np.ptp(rgba[:, :3]) > 0:
            colors = rgba[:, :3]
    elif texture is not None:
        raise ValueError(f"{path}: texture given but the mesh has no UV coordinates")
    centre = (vertices.min(0) + vertices.max(0)) / 2
    vertices = vertices - centre
    if diameter_mm is not None:
        vertices = vertices * (float(diameter_mm) / mesh_diameter(vertices))
    normals = _vertex_normals(vertices, faces)
    return Mesh(vertices, faces, normals, uv, texture, colors, path.stem, centre)


def _texture_image(path: Path, given: str | Path | None, material_image) -> np.ndarray | None:
    from PIL import Image

    if given is not None:
        return np.asarray(Image.open(given).convert("RGB"), dtype=np.uint8)
    # trimesh invents a tiny placeholder when an OBJ names no material.
    if material_image is not None and min(material_image.size) > 4:
        return np.asarray(material_image.convert("RGB"), dtype=np.uint8)
    beside = sorted(p for p in path.parent.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(beside) == 1:
        return np.asarray(Image.open(beside[0]).convert("RGB"), dtype=np.uint8)
    return None


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = vertices[faces]  # Fx3x3
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # area-weighted
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_n)
    # Seams split vertices: average normals over vertices at the same position.
    _, inverse = np.unique(np.round(vertices, 9), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    merged = np.zeros((inverse.max() + 1, 3))
    np.add.at(merged, inverse, normals)
    normals = merged[inverse]
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.where(length > 0, normals / np.maximum(length, 1e-300), np.array([0.0, 0.0, 1.0]))


def _sample_surface(mesh: Mesh, count: int, rng: np.random.Generator) -> np.ndarray:
    return sample_surface(mesh.vertices, mesh.faces, count, rng)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, 3)`` points uniform over the area of the triangles ``faces (F, 3)`` of ``vertices (V, 3)``."""
    tri = np.asarray(vertices, dtype=np.float64)[np.asarray(faces)]  # Fx3x3
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    face = rng.choice(len(tri), size=count, p=area / area.sum())
    a, b = rng.random(count), rng.random(count)
    flip = a + b > 1
    a, b = np.where(flip, 1 - a, a), np.where(flip, 1 - b, b)
    t = tri[face]
    return t[:, 0] + a[:, None] * (t[:, 1] - t[:, 0]) + b[:, None] * (t[:, 2] - t[:, 0])


def farthest_point_keypoints(
    mesh: Mesh, count: int = 8, seed: int = 0, samples: int = 20000, min_seen: float = 0.05
) -> np.ndarray:
    """Keypoints: ``count`` surface points by farthest point sampling, then the centre.

    Sampling starts from the surface point farthest from the centre; each next point is the
    sample farthest from those chosen. A point that the object itself hides from almost every
    viewpoint (surface inside the object, where parts of a mesh intersect, or deep in a cavity)
    is given up with the samples near it, and the sampling is run again. Deterministic for a seed.

    Args:
        mesh: the object; count: surface keypoints; seed: of the surface sampling; samples:
            surface samples to choose from.
        min_seen: the least share of 64 viewpoints around the object (3 diameters away) from
            which every keypoint must be seen (:func:`seen_share`); 0 keeps every point.
    Returns:
        ``(count + 1, 3)`` float64 (mm); the last row is the centre (the origin).
    Raises:
        ValueError: ``count < 3``, or too few surface points are seen from ``min_seen`` of the views.
    """
    if count < 3:
        raise ValueError(f"count: PnP needs at least 4 keypoints with the centre, got count={count}")
    pts = _sample_surface(mesh, samples, np.random.default_rng(seed))
    return np.concatenate([_farthest_seen_points(mesh, pts, count, min_seen), np.zeros((1, 3))], 0)


def _fibonacci_sphere(count: int) -> np.ndarray:
    """``(count, 3)`` unit vectors spread evenly over the sphere."""
    i = np.arange(count) + 0.5
    z = 1.0 - 2.0 * i / count
    phi = np.pi * (1.0 + 5.0**0.5) * i
    r = np.sqrt(1.0 - z * z)
    return np.column_stack([r * np.cos(phi), r * np.sin(phi), z])


def seen_share(mesh: Mesh, points: np.ndarray, views: int = 64, distance: float = 3.0) -> np.ndarray:
    """The share of viewpoints from which the object does not hide each point.

    Args:
        mesh: the object (mm); points: ``(k, 3)`` (mm).
        views: camera centres spread evenly over a sphere about the box centre, ``distance``
            diameters away, each looking at the centre (the renders' range of distances).
    Returns:
        ``(k,)`` float64 in [0, 1] (0 for a point inside the object).
    """
    eye = _fibonacci_sphere(views) * distance * mesh.diameter  # camera centres, object frame
    return 1.0 - _hidden_from(mesh, np.asarray(points, dtype=np.float64), eye).mean(0)


def _farthest_seen_points(mesh: Mesh, pts: np.ndarray, count: int, min_seen: float) -> np.ndarray:
    """Farthest point sampling over ``pts``, giving up the points (and the samples within 5% of
    the diameter of them) seen from less than ``min_seen`` of the views."""
    if min_seen <= 0:
        return _farthest_points(pts, count)
    from scipy.spatial import cKDTree

    tree, keep = cKDTree(pts), np.ones(len(pts), dtype=bool)
    while keep.sum() >= count:
        chosen = _farthest_points(pts[keep], count)
        unseen = seen_share(mesh, chosen) < min_seen
        if not unseen.any():
            return chosen
        for near in tree.query_ball_point(chosen[unseen], r=0.05 * mesh.diameter):
            keep[near] = False
    raise ValueError(f"fewer than {count} surface points are seen from {min_seen:.0%} of the views")


def _farthest_points(pts: np.ndarray, count: int) -> np.ndarray:
    """``count`` rows of ``pts (N, 3)``: the one farthest from the origin, then each next the
    farthest from those chosen."""
    chosen = [int(np.argmax(np.linalg.norm(pts, axis=1)))]
    dist = np.linalg.norm(pts - pts[chosen[0]], axis=1)
    for _ in range(count - 1):
        chosen.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.linalg.norm(pts - pts[chosen[-1]], axis=1))
    return pts[chosen]


# Rotations about the axis that decide whether a point has a look-alike elsewhere on the surface.
_SYMMETRY_ANGLES_DEG = np.arange(20.0, 360.0, 20.0)


def _unit_axis(axis: str | np.ndarray) -> np.ndarray:
    if isinstance(axis, str):
        if axis not in ("x", "y", "z"):
            raise ValueError(f"axis: expected 'x', 'y', 'z' or a 3-vector, got {axis!r}")
        return np.array([float(axis == a) for a in "xyz"])
    a = np.asarray(axis, dtype=np.float64).reshape(-1)
    if a.shape != (3,) or not np.linalg.norm(a) > 0:
        raise ValueError(f"axis: expected a non-zero 3-vector, got {axis!r}")
    return a / np.linalg.norm(a)


def _rotations_about(axis: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """``(A, 3, 3)`` rotations by each angle (degrees) about the unit ``axis`` (Rodrigues)."""
    return rotations_about(axis, np.deg2rad(angles_deg))


def rotations_about(axis: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """``(A, 3, 3)`` rotations by each angle (radians) about the unit ``axis`` (Rodrigues)."""
    th = np.asarray(angles, dtype=np.float64)[:, None, None]
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(th) * k + (1 - np.cos(th)) * (k @ k)


def _rotated_gaps(pts: np.ndarray, tree, rotations: np.ndarray, point: np.ndarray) -> np.ndarray:
    """``(A, N)``: distance from each point, turned about the axis through ``point``, to the
    nearest surface sample."""
    turned = (pts - point) @ rotations.transpose(0, 2, 1) + point  # AxNx3
    return tree.query(turned.reshape(-1, 3))[0].reshape(len(rotations), len(pts))


def symmetry_axis_point(mesh: Mesh, axis: str | np.ndarray, seed: int = 0, samples: int = 20000) -> np.ndarray:
    """Where a near-symmetry axis of the given direction passes: the point ``(3,)`` (mm), in the
    plane through the origin normal to the axis, about which turning the surface moves it least.

    A teapot's bounding-box centre is off its body's axis, because the spout reaches further
    than the handle; turning about the box centre would find no look-alike points at all.
    The median gap (robust to the parts that break the symmetry) is minimised from the origin.

    Args:
        mesh: the object; axis: ``"x"``, ``"y"``, ``"z"`` or a direction ``(3,)``.
    Returns:
        ``(3,)`` float64 (mm).
    """
    a = _unit_axis(axis)
    pts, tree = _surface_samples(mesh, seed, samples)
    return _axis_point(pts, tree, a, mesh.diameter, seed)


def _surface_samples(mesh: Mesh, seed: int, samples: int):
    """Surface samples ``(N, 3)`` and a k-d tree over them."""
    from scipy.spatial import cKDTree

    pts = _sample_surface(mesh, samples, np.random.default_rng(seed))
    return pts, cKDTree(pts)


def _axis_point(pts: np.ndarray, tree, a: np.ndarray, diameter: float, seed: int) -> np.ndarray:
    from scipy.optimize import minimize

    rotations = _rotations_about(a, _SYMMETRY_ANGLES_DEG)
    # Two directions spanning the plane normal to the axis.
    u = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(a, u)
    probe = pts[np.random.default_rng(seed + 1).choice(len(pts), size=min(2000, len(pts)), replace=False)]

    def median_gap(c: np.ndarray) -> float:
        return float(np.median(_rotated_gaps(probe, tree, rotations, c[0] * u + c[1] * v)))

    scale = diameter * 0.05
    best = minimize(
        median_gap,
        np.zeros(2),
        method="Nelder-Mead",
        options={
            "initial_simplex": [[0, 0], [scale, 0], [0, scale]],
            "xatol": 1e-3 * diameter,
            "fatol": 1e-4 * diameter,
        },
    )
    return best.x[0] * u + best.x[1] * v


def _look_alike_mask(pts: np.ndarray, tree, a: np.ndarray, point: np.ndarray, tol: float) -> np.ndarray:
    gaps = _rotated_gaps(pts, tree, _rotations_about(a, _SYMMETRY_ANGLES_DEG), point)  # AxN
    radius = np.linalg.norm(np.cross(pts - point, a), axis=1)
    moved = 2 * radius[None, :] * np.sin(np.deg2rad(_SYMMETRY_ANGLES_DEG)[:, None] / 2)
    return ((moved > 2 * tol) & (gaps < tol)).any(0)


def symmetry_look_alikes(
    mesh: Mesh,
    points: np.ndarray,
    axis: str | np.ndarray,
    tolerance: float = 0.02,
    seed: int = 0,
    samples: int = 20000,
    axis_point: np.ndarray | None = None,
) -> np.ndarray:
    """Which of ``points`` have a look-alike: a turn about the axis (20 to 340 degrees) that moves
    the point further than ``2 * tolerance * diameter`` and lands it within ``tolerance *
    diameter`` of the surface. A network cannot tell such a point from its look-alikes by the
    geometry alone.

    Args:
        mesh: the object; points: ``(N, 3)`` (mm), usually on its surface.
        axis: ``"x"``, ``"y"``, ``"z"`` or a direction ``(3,)``; it passes through
            ``axis_point`` (default: :func:`symmetry_axis_point`).
        tolerance: as a fraction of the diameter; seed, samples: of the surface sampling.
    Returns:
        ``(N,)`` bool.
    """
    a = _unit_axis(axis)
    surface, tree = _surface_samples(mesh, seed, samples)
    point = _axis_point(surface, tree, a, mesh.diameter, seed) if axis_point is None else axis_point
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return _look_alike_mask(pts, tree, a, np.asarray(point, dtype=np.float64), tolerance * mesh.diameter)


def distinctive_keypoints(
    mesh: Mesh,
    count: int = 8,
    axis: str | np.ndarray | None = None,
    seed: int = 0,
    samples: int = 20000,
    tolerance: float = 0.02,
    min_seen: float = 0.05,
) -> np.ndarray:
    """Keypoints for an object that is (nearly) symmetric about an axis: farthest point
    sampling over the surface points that have no look-alike, then a point on the axis.

    On a near-symmetric object (a teapot's body) most surface points look like other surface
    points turned about the axis, so a network cannot tell where such a keypoint is, and its
    heatmap spreads over every look-alike. Kept are the points without a look-alike
    (:func:`symmetry_look_alikes`): the parts that break the symmetry (spout, handle) and the
    points on the axis (knob, base). The last keypoint, instead of the box centre, is the axis
    point nearest to it, which is unambiguous as well.

    Args:
        mesh: the object; count: surface keypoints.
        axis: ``"x"``, ``"y"``, ``"z"`` or a direction ``(3,)`` of the near-symmetry; None: the
            object has none, every point is distinctive, and this is :func:`farthest_point_keypoints`.
        seed: of the surface sampling; samples: surface samples to choose from.
        tolerance: as a fraction of the diameter (see :func:`symmetry_look_alikes`).
        min_seen: as for :func:`farthest_point_keypoints` (where a spout meets a body, the body's
            surface inside the spout has no look-alike and is seen from nowhere).
    Returns:
        ``(count + 1, 3)`` float64 (mm); the last row lies on the axis.
    Raises:
        ValueError: no distinctive surface point off the axis (the object is symmetric
            throughout: use :func:`farthest_point_keypoints`, and ADD-S to evaluate).
    """
    if axis is None:
        return farthest_point_keypoints(mesh, count, seed=seed, samples=samples, min_seen=min_seen)
    if count < 3:
        raise ValueError(f"count: PnP needs at least 4 keypoints with the centre, got count={count}")
    a = _unit_axis(axis)
    pts, tree = _surface_samples(mesh, seed, samples)
    point = _axis_point(pts, tree, a, mesh.diameter, seed)
    distinct = pts[~_look_alike_mask(pts, tree, a, point, tolerance * mesh.diameter)]
    radius = np.linalg.norm(np.cross(distinct - point, a), axis=1)
    # Points on the axis alone would put every keypoint on one line: PnP could not turn them.
    if len(distinct) < count or not (radius > 2 * tolerance * mesh.diameter).any():
        raise ValueError(
            f"no surface point off the axis {a.tolist()} is without a look-alike under turns about it: "
            "the object is symmetric throughout; use farthest_point_keypoints (and ADD-S)"
        )
    on_axis = point + a * float(np.dot(-point, a))  # the axis point nearest the box centre
    return np.concatenate([_farthest_seen_points(mesh, distinct, count, min_seen), on_axis[None]], 0)


def hidden_by_surface(
    mesh: Mesh, points: np.ndarray, R: np.ndarray, t: np.ndarray, tol: float | None = None, chunk: int = 256
) -> np.ndarray:
    """Which object points the object itself hides from the camera (self-occlusion).

    A point is hidden when the segment from the camera centre to it crosses a face of ``mesh``
    more than ``tol`` before the point (ray casting, Moller-Trumbore, over every face). Points
    inside the object (such as the centre) are always hidden.

    Args:
        mesh: the object (mm); points: ``(k, 3)`` object points (mm), e.g. keypoints.
        R: ``(N, 3, 3)`` rotations and t: ``(N, 3)`` translations (mm), object to camera.
        tol: distance (mm) before the point within which a crossing does not count (the face the
            point lies on); default 0.5% of the diameter.
        chunk: rays per block (memory: ``chunk x F`` floats a block).
    Returns:
        ``(N, k)`` bool, True where the point is hidden.
    Raises:
        ValueError: shapes that do not fit.
    """
    pts = np.asarray(points, dtype=np.float64)
    R, t = np.asarray(R, dtype=np.float64), np.asarray(t, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points: expected (k, 3), got {pts.shape}")
    if R.ndim != 3 or R.shape[1:] != (3, 3) or t.shape != (R.shape[0], 3):
        raise ValueError(f"R, t: expected (N, 3, 3) and (N, 3), got {R.shape} and {t.shape}")
    # The camera centre in object coordinates: R^T (0 - t).
    return _hidden_from(mesh, pts, -np.einsum("nji,nj->ni", R, t), tol, chunk)


def _hidden_from(
    mesh: Mesh, pts: np.ndarray, centres: np.ndarray, tol: float | None = None, chunk: int = 256
) -> np.ndarray:
    """``(N, k)``: whether the segment from camera centre ``centres[n]`` to ``pts[j]`` crosses a
    face of ``mesh`` more than ``tol`` before the point (see :func:`hidden_by_surface`)."""
    tol = 0.005 * mesh.diameter if tol is None else float(tol)
    origins = np.repeat(centres, len(pts), axis=0)  # (N*k, 3)
    seg = np.tile(pts, (len(centres), 1)) - origins
    length = np.linalg.norm(seg, axis=1)
    tri = mesh.vertices[mesh.faces]  # (F, 3, 3)
    v0, e1, e2 = tri[:, 0], tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    hidden = np.zeros(len(origins), dtype=bool)
    for a in range(0, len(origins), chunk):
        d, o = seg[a : a + chunk, None, :], origins[a : a + chunk, None, :]
        p = np.cross(d, e2)
        det = np.einsum("rfc,fc->rf", p, e1)
        # Rays parallel to a face cannot cross it; the sign of det does not matter (both sides).
        inv = np.divide(1.0, det, out=np.zeros_like(det), where=np.abs(det) > 1e-12)
        s = o - v0
        u = np.einsum("rfc,rfc->rf", s, p) * inv
        q = np.cross(s, e1)
        v = np.einsum("rc,rfc->rf", d[:, 0], q) * inv
        along = np.einsum("rfc,fc->rf", q, e2) * inv  # 0 at the camera, 1 at the point
        before = 1.0 - tol / np.maximum(length[a : a + chunk, None], 1e-12)
        crossing = (inv != 0) & (u >= 0) & (v >= 0) & (u + v <= 1) & (along > 0) & (along < before)
        hidden[a : a + chunk] = crossing.any(1)
    return hidden.reshape(len(centres), len(pts))


def write_ply(mesh: Mesh, path: str | Path) -> None:
    """Write the mesh as an ASCII PLY (positions in mm, normals, and UVs when textured), as BOP
    ships its models."""
    path = Path(path)
    has_uv = mesh.uv is not None
    header = [
        "ply",
        "format ascii 1.0",
        f"element vertex {len(mesh.vertices)}",
        "property float x",
        "property float y",
        "property float z",
        "property float nx",
        "property float ny",
        "property float nz",
    ]
    if has_uv:
        header += ["property float texture_u", "property float texture_v"]
    header += [f"element face {len(mesh.faces)}", "property list uchar int vertex_indices", "end_header"]
    cols = [mesh.vertices, mesh.normals] + ([mesh.uv] if has_uv else [])
    rows = np.concatenate(cols, axis=1)
    with path.open("w") as f:
        f.write("\n".join(header) + "\n")
        np.savetxt(f, rows, fmt="%.6f")
        np.savetxt(f, np.concatenate([np.full((len(mesh.faces), 1), 3), mesh.faces], 1), fmt="%d")
