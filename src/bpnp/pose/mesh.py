"""Meshes for pose estimation: loading any OBJ/PLY/GLB, physical scale, diameter, keypoints.

A :class:`Mesh` is centred at its bounding-box centre and scaled to a physical diameter in
millimetres (BOP's convention), so that the keypoint centre (the origin) is the object's centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Mesh", "load_mesh", "mesh_diameter", "farthest_point_keypoints", "write_ply"]


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


def mesh_diameter(vertices: np.ndarray) -> float:
    """Largest distance between two points of ``(V, 3)`` (exact: over the convex hull's vertices
    when there are many points)."""
    pts = np.asarray(vertices, dtype=np.float64)
    if len(pts) > 200:
        from scipy.spatial import ConvexHull

        pts = pts[ConvexHull(pts).vertices]
    best = 0.0
    for start in range(0, len(pts), 1024):  # (1024, V) blocks keep memory small
        d = np.linalg.norm(pts[start : start + 1024, None, :] - pts[None, :, :], axis=-1)
        best = max(best, float(d.max()))
    return best


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
    tri = mesh.vertices[mesh.faces]  # Fx3x3
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    face = rng.choice(len(tri), size=count, p=area / area.sum())
    a, b = rng.random(count), rng.random(count)
    flip = a + b > 1
    a, b = np.where(flip, 1 - a, a), np.where(flip, 1 - b, b)
    t = tri[face]
    return t[:, 0] + a[:, None] * (t[:, 1] - t[:, 0]) + b[:, None] * (t[:, 2] - t[:, 0])


def farthest_point_keypoints(mesh: Mesh, count: int = 8, seed: int = 0, samples: int = 20000) -> np.ndarray:
    """Keypoints: ``count`` surface points by farthest point sampling, then the centre.

    Sampling starts from the surface point farthest from the centre; each next point is the
    sample farthest from those chosen. Deterministic for a seed.

    Args:
        mesh: the object; count: surface keypoints; seed: of the surface sampling; samples:
            surface samples to choose from.
    Returns:
        ``(count + 1, 3)`` float64 (mm); the last row is the centre (the origin).
    """
    if count < 3:
        raise ValueError(f"count: PnP needs at least 4 keypoints with the centre, got count={count}")
    pts = _sample_surface(mesh, samples, np.random.default_rng(seed))
    chosen = [int(np.argmax(np.linalg.norm(pts, axis=1)))]
    dist = np.linalg.norm(pts - pts[chosen[0]], axis=1)
    for _ in range(count - 1):
        chosen.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.linalg.norm(pts - pts[chosen[-1]], axis=1))
    return np.concatenate([pts[chosen], np.zeros((1, 3))], 0)


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
