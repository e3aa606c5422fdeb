"""The BOP data-set format (https://bop.felk.cvut.cz): reading and writing its JSON files and the
result CSV.

A split folder holds scene folders ``000000/`` ... each with ``rgb/``, ``mask/``, ``mask_visib/``
and ``scene_gt.json`` (``cam_R_m2c`` row-major 3x3, ``cam_t_m2c`` mm, ``obj_id``),
``scene_camera.json`` (``cam_K`` row-major 3x3, ``depth_scale``), ``scene_gt_info.json``
(``bbox_obj``, ``bbox_visib`` as x, y, w, h; ``px_count_all``, ``px_count_visib``,
``visib_fract``). Models lie in ``models/obj_NNNNNN.ply`` with ``models/models_info.json``
(``diameter``, extents, ``symmetries_discrete`` / ``symmetries_continuous``), in millimetres.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Annotation",
    "read_scene",
    "write_scene",
    "read_models_info",
    "write_models_info",
    "find_models_dir",
    "model_path",
    "scene_dirs",
    "write_results_csv",
    "read_results_csv",
    "image_path",
]


@dataclass
class Annotation:
    """One object instance in one image of a BOP scene."""

    scene_id: int
    im_id: int
    obj_id: int
    instance: int  # index within the image's list (the mask files' second number)
    R: np.ndarray  # (3, 3)
    t: np.ndarray  # (3,) mm
    K: np.ndarray  # (3, 3)
    bbox_obj: tuple[int, int, int, int] | None = None
    visib_fract: float | None = None
    # OpenCV's (k1, k2, p1, p2, k3) of the image's lens: not a BOP field (BOP images are
    # undistorted); bpnp writes it into scene_camera.json as "dist" for photographs it does not undistort.
    dist: np.ndarray | None = None


def _load(path: Path) -> dict:
    with path.open() as f:
        return json.load(f)


def scene_dirs(split_dir: str | Path) -> list[Path]:
    """The scene folders of a split (those with a ``scene_gt.json``), sorted."""
    split_dir = Path(split_dir)
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and (p / "scene_gt.json").is_file())


def read_scene(scene_dir: str | Path) -> list[Annotation]:
    """Every annotated instance of one scene folder (``scene_gt_info.json`` is optional)."""
    scene_dir = Path(scene_dir)
    gt = _load(scene_dir / "scene_gt.json")
    cam = _load(scene_dir / "scene_camera.json")
    info_path = scene_dir / "scene_gt_info.json"
    info = _load(info_path) if info_path.is_file() else {}
    scene_id = int(scene_dir.name)
    out = []
    for im_key in sorted(gt, key=int):
        K = np.asarray(cam[im_key]["cam_K"], dtype=np.float64).reshape(3, 3)
        dist = cam[im_key].get("dist")
        dist = None if dist is None else np.asarray(dist, dtype=np.float64).reshape(5)
        for inst, entry in enumerate(gt[im_key]):
            meta = info.get(im_key, [{}] * (inst + 1))[inst]
            bbox = meta.get("bbox_obj")
            out.append(
                Annotation(
                    scene_id,
                    int(im_key),
                    int(entry["obj_id"]),
                    inst,
                    np.asarray(entry["cam_R_m2c"], dtype=np.float64).reshape(3, 3),
                    np.asarray(entry["cam_t_m2c"], dtype=np.float64).reshape(3),
                    K,
                    tuple(int(v) for v in bbox) if bbox is not None else None,
                    meta.get("visib_fract"),
                    dist,
                )
            )
    return out


def image_path(scene_dir: Path, im_id: int) -> Path:
    """The colour image of ``im_id`` (BOP ships ``rgb/*.png`` or ``*.jpg``; grey ``gray/``)."""
    for folder, ext in (("rgb", ".png"), ("rgb", ".jpg"), ("gray", ".tif"), ("gray", ".png")):
        path = scene_dir / folder / f"{im_id:06d}{ext}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{scene_dir}: no image for im_id {im_id} (looked in rgb/ and gray/)")


def write_scene(scene_dir: str | Path, gt: dict, camera: dict, info: dict) -> None:
    """Write ``scene_gt.json``, ``scene_camera.json`` and ``scene_gt_info.json``; the dicts map
    ``im_id`` (int) to BOP's entries (numpy arrays are turned into lists)."""
    scene_dir = Path(scene_dir)
    for name, data in (("scene_gt", gt), ("scene_camera", camera), ("scene_gt_info", info)):
        (scene_dir / f"{name}.json").write_text(json.dumps({str(k): v for k, v in data.items()}, default=_plain))


def _plain(value: Any):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def find_models_dir(split_dir: str | Path) -> Path:
    """``models/`` of a data set: beside the split folder (BOP's layout) or inside it."""
    split_dir = Path(split_dir)
    for cand in (split_dir / "models", split_dir.parent / "models"):
        if (cand / "models_info.json").is_file():
            return cand
    raise FileNotFoundError(f"{split_dir}: no models/models_info.json beside or inside it")


def model_path(models_dir: str | Path, obj_id: int) -> Path:
    """The mesh of object ``obj_id`` in a ``models/`` folder (BOP's ``obj_000001.ply``)."""
    return Path(models_dir) / f"obj_{obj_id:06d}.ply"


def read_models_info(models_dir: str | Path) -> dict[int, dict]:
    """``models_info.json`` keyed by integer object id."""
    return {int(k): v for k, v in _load(Path(models_dir) / "models_info.json").items()}


def write_models_info(models_dir: str | Path, info: dict[int, dict]) -> None:
    Path(models_dir, "models_info.json").write_text(
        json.dumps({str(k): v for k, v in info.items()}, indent=1, default=_plain)
    )


def write_results_csv(path: str | Path, rows: list[dict]) -> None:
    """BOP's result CSV: ``scene_id,im_id,obj_id,score,R,t,time``; each row a dict with those
    keys, ``R`` (3, 3), ``t`` (3,) mm; ``time`` in seconds (-1: unknown)."""
    lines = ["scene_id,im_id,obj_id,score,R,t,time"]
    for r in rows:
        R = " ".join(f"{v:.8f}" for v in np.asarray(r["R"]).reshape(-1))
        t = " ".join(f"{v:.6f}" for v in np.asarray(r["t"]).reshape(-1))
        lines.append(f"{r['scene_id']},{r['im_id']},{r['obj_id']},{r['score']:.6f},{R},{t},{r.get('time', -1):.6f}")
    Path(path).write_text("\n".join(lines) + "\n")


def read_results_csv(path: str | Path) -> list[dict]:
    """Rows of a BOP result CSV (inverse of :func:`write_results_csv`)."""
    rows = []
    for line in Path(path).read_text().splitlines()[1:]:
        s, i, o, score, R, t, time = line.split(",")
        rows.append(
            {
                "scene_id": int(s),
                "im_id": int(i),
                "obj_id": int(o),
                "score": float(score),
                "R": np.array(R.split(), dtype=np.float64).reshape(3, 3),
                "t": np.array(t.split(), dtype=np.float64),
                "time": float(time),
            }
        )
    return rows
