"""Rendering, meshes, keypoints and the BOP format of bpnp.pose."""

import json

import numpy as np
import pytest
import torch

import bpnp

pytest.importorskip("trimesh")
pytest.importorskip("moderngl")

from bpnp.pose import bop  # noqa: E402
from bpnp.pose.config import RenderSettings  # noqa: E402
from bpnp.pose.data import load_split  # noqa: E402
from bpnp.pose.mesh import farthest_point_keypoints, load_mesh, mesh_diameter  # noqa: E402
from bpnp.pose.render import Renderer, RenderUnavailableError  # noqa: E402
from bpnp.pose.study import spot_mesh  # noqa: E402
from bpnp.pose.synthesis import render_dataset  # noqa: E402


@pytest.fixture(scope="module")
def spot():
    return load_mesh(spot_mesh(), diameter_mm=100.0)


@pytest.fixture(scope="module")
def renderer(spot):
    try:
        r = Renderer(spot, 96, 80, supersample=4)
    except RenderUnavailableError as exc:
        pytest.skip(f"no OpenGL here: {exc}")
    yield r
    r.release()


def test_mesh_scaled_centred_textured(spot):
    assert spot.diameter == pytest.approx(100.0, rel=1e-9)
    assert np.allclose((spot.vertices.min(0) + spot.vertices.max(0)) / 2, 0, atol=1e-9)
    assert spot.texture is not None and spot.texture.shape == (1024, 1024, 3)
    assert spot.uv.shape == (len(spot.vertices), 2)
    assert np.allclose(np.linalg.norm(spot.normals, axis=1), 1)


def test_diameter_exact_against_brute_force():
    pts = np.random.default_rng(0).normal(size=(900, 3))
    brute = np.linalg.norm(pts[:, None] - pts[None], axis=-1).max()
    assert mesh_diameter(pts) == pytest.approx(brute, rel=1e-12)


def test_keypoints_farthest_and_deterministic(spot):
    kp = farthest_point_keypoints(spot, 8, seed=3)
    assert kp.shape == (9, 3) and np.all(kp[-1] == 0)
    assert np.array_equal(kp, farthest_point_keypoints(spot, 8, seed=3))
    d = np.linalg.norm(kp[:8, None] - kp[None, :8], axis=-1) + np.eye(8) * 1e9
    assert d.min() > 0.2 * spot.diameter  # spread over the surface, not clustered
    with pytest.raises(ValueError, match="count"):
        farthest_point_keypoints(spot, 2)


@pytest.mark.parametrize("rvec", [(0.0, 0.0, 0.0), (0.3, -2.0, 0.7), (2.5, 0.4, -1.0)])
def test_silhouette_matches_projection(spot, renderer, rvec):
    """The shader's camera is OpenCV's: the rendered mask's box equals the projected vertices' box."""
    K = np.array([[150.0, 0.0, 44.0], [0.0, 140.0, 41.5], [0.0, 0.0, 1.0]])
    pose = torch.tensor([*rvec, 8.0, -5.0, 260.0], dtype=torch.float64)
    R = bpnp.rvec_to_rotmat(pose[:3]).numpy()
    rgb, cover = renderer.render(R, pose[3:].numpy(), K)
    assert rgb.shape == (80, 96, 3) and cover.shape == (80, 96)
    uv = bpnp.project(torch.from_numpy(spot.vertices), pose[None], torch.from_numpy(K))[0].numpy()
    # A pixel is touched when one of its 16 samples is covered: the extreme pixels lie within
    # 0.5 px (rounding) plus a sample spacing of the extreme vertices, and no shift beyond that.
    ys, xs = np.nonzero(cover > 0)
    assert abs(xs.min() - uv[:, 0].min()) < 0.75 and abs(xs.max() - uv[:, 0].max()) < 0.75
    assert abs(ys.min() - uv[:, 1].min()) < 0.75 and abs(ys.max() - uv[:, 1].max()) < 0.75
    # Every projected vertex lands on (or next to) a covered pixel.
    inside = np.round(uv).astype(int)
    near = np.zeros_like(cover, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near |= np.roll(np.roll(cover > 0, dy, 0), dx, 1)
    assert near[inside[:, 1], inside[:, 0]].all()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    render_dataset(spot_mesh(), root, 12, RenderSettings(size=64), seed=5, split="train")
    return root


def test_render_writes_bop_and_is_deterministic(rendered, tmp_path):
    split = rendered / "train"
    anns = bop.read_scene(split / "000000")
    assert len(anns) == 12 and {a.obj_id for a in anns} == {1}
    info = bop.read_models_info(rendered / "models")[1]
    assert info["diameter"] == pytest.approx(100.0)
    assert (rendered / "models" / "obj_000001.ply").is_file()
    gt_info = json.loads((split / "000000" / "scene_gt_info.json").read_text())
    for entry in gt_info.values():
        x, y, w, h = entry[0]["bbox_obj"]
        side = max(w, h) / 64
        assert 0.3 < side <= 1.0  # the object fills 40-80% of the image (box side, +- AA)
        assert 0 <= entry[0]["visib_fract"] <= 1
    data = load_split(split, size=64)
    assert data.images.shape == (12, 64, 64, 3) and data.keypoints2d.shape == (12, 9, 2)
    assert (data.keypoints2d > -1).all() and (data.keypoints2d < 65).all()
    stored = json.loads((split / "000000" / "scene_keypoints.json").read_text())
    assert np.allclose(np.array([stored[str(i)] for i in range(12)]), data.keypoints2d, atol=1e-9)
    again = tmp_path / "again"
    render_dataset(spot_mesh(), again, 12, RenderSettings(size=64), seed=5, split="train")
    twin = load_split(again / "train", size=64)
    assert np.array_equal(twin.images, data.images) and np.array_equal(twin.pose, data.pose)
    other = tmp_path / "other"
    render_dataset(spot_mesh(), other, 12, RenderSettings(size=64), seed=6, split="train")
    assert not np.array_equal(load_split(other / "train", size=64).pose, data.pose)


def test_crop_margin_frames_an_object_as_the_renders_did(rendered, tmp_path):
    from bpnp.pose.data import DEFAULT_CROP_MARGIN, crop_margin_for

    # renders: the box side spans 0.4-0.8 of the image; a crop with margin m makes it 1 / (1 + m)
    margin = crop_margin_for(rendered / "train")
    assert 1.0 / (1.0 + margin) == pytest.approx(0.6)
    assert crop_margin_for(tmp_path) == DEFAULT_CROP_MARGIN  # not rendered by bpnp: the BOP default
    (tmp_path / "render_settings.json").write_text('{"size": 64}')  # a record that predates fill
    assert crop_margin_for(tmp_path) == DEFAULT_CROP_MARGIN


def test_cache_matches_fresh_read(rendered):
    split = rendered / "train"
    cached = load_split(split, size=64)
    fresh = load_split(split, size=64, cache=False)
    for name in ("images", "K", "pose", "keypoints2d", "ids"):
        assert np.array_equal(getattr(cached, name), getattr(fresh, name)), name


def test_bop_crop_keeps_geometry(tmp_path):
    """Large BOP images are cropped around the object and K follows: the object's pixels in the
    crop lie where the model projects with the new K."""
    render_dataset(spot_mesh(), tmp_path, 4, RenderSettings(size=192, background="black", occluder_prob=0), seed=1)
    data = load_split(tmp_path / "train", size=64, margin=0.2)
    mesh = load_mesh(spot_mesh())
    assert data.images.shape == (4, 64, 64, 3)
    for j in range(4):
        uv = bpnp.project(
            torch.from_numpy(mesh.vertices), torch.from_numpy(data.pose[j : j + 1]), torch.from_numpy(data.K[j])
        )[0]
        ys, xs = np.nonzero(data.images[j].max(-1) > 10)
        assert abs(xs.min() - uv[:, 0].min().item()) < 1.5 and abs(xs.max() - uv[:, 0].max().item()) < 1.5
        assert abs(ys.min() - uv[:, 1].min().item()) < 1.5 and abs(ys.max() - uv[:, 1].max().item()) < 1.5
        side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        assert side == pytest.approx(64 / 1.2, abs=2.5)  # the margin


def test_results_csv_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        {
            "scene_id": 1,
            "im_id": i,
            "obj_id": 5,
            "score": 0.5,
            "R": np.linalg.qr(rng.normal(size=(3, 3)))[0],
            "t": rng.normal(size=3) * 100,
            "time": 0.01,
        }
        for i in range(3)
    ]
    bop.write_results_csv(tmp_path / "r.csv", rows)
    back = bop.read_results_csv(tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines()[0] == "scene_id,im_id,obj_id,score,R,t,time"
    for a, b in zip(rows, back):
        assert (
            b["im_id"] == a["im_id"]
            and np.allclose(b["R"], a["R"], atol=1e-8)
            and np.allclose(b["t"], a["t"], atol=1e-6)
        )


def test_missing_split_and_object(tmp_path, rendered):
    with pytest.raises(FileNotFoundError, match="no BOP scene"):
        load_split(tmp_path)
    with pytest.raises(ValueError, match="no instance of obj_id 7"):
        load_split(rendered / "train", obj_id=7, size=64, cache=False)


def test_keypoints_from_the_model_when_the_data_set_has_none(tmp_path):
    """A BOP download has no keypoints.json: keypoints are sampled on models/obj_<id>.ply (mm)."""
    from bpnp.pose.data import load_keypoints

    render_dataset(spot_mesh(), tmp_path, 2, RenderSettings(size=64), seed=0)
    (tmp_path / "keypoints.json").unlink()
    kp = load_keypoints(tmp_path / "train", 1)
    mesh = load_mesh(tmp_path / "models" / "obj_000001.ply", diameter_mm=None)
    assert kp.shape == (9, 3) and np.allclose(kp[-1], 0, atol=1e-4)  # the model's box centre
    nearest = np.linalg.norm(kp[:8, None] - mesh.vertices[None], axis=-1).min(1)
    assert nearest.max() < 5.0  # on the surface (mm; spot's edges are ~3 mm at 10 cm)
    data = load_split(tmp_path / "train", size=64, cache=False)
    assert np.allclose(data.keypoints3d, kp)


def test_render_splits_reuses_only_what_matches(tmp_path):
    from bpnp.pose.synthesis import render_splits

    settings = RenderSettings(size=32)
    first = render_splits(spot_mesh(), tmp_path, {"train": 3, "test": 2}, settings, seed=4)
    stamp = (first["train"] / "000000" / "rgb" / "000000.png").stat().st_mtime_ns
    again = render_splits(spot_mesh(), tmp_path, {"train": 3, "test": 2}, settings, seed=4)
    assert again == first and (first["train"] / "000000" / "rgb" / "000000.png").stat().st_mtime_ns == stamp
    assert not np.array_equal(load_split(first["train"], size=32).pose[:2], load_split(first["test"], size=32).pose)
    with pytest.raises(ValueError, match="other settings \\(count\\)"):
        render_splits(spot_mesh(), tmp_path, {"train": 5, "test": 2}, settings, seed=4)


def _write_obj(path, parts):
    """An OBJ of the union of trimesh primitives (mm)."""
    import trimesh

    trimesh.util.concatenate(parts).export(str(path))
    return path


@pytest.fixture(scope="module")
def mug(tmp_path_factory):
    """A cylinder about y (radius 30, height 60 mm) with a box handle on +x: its box centre lies
    off the cylinder's axis, as a teapot's does."""
    import trimesh

    body = trimesh.creation.cylinder(radius=30.0, height=60.0, sections=96)
    body.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))  # axis z -> y
    handle = trimesh.creation.box(extents=[16.0, 36.0, 8.0])
    handle.apply_translation([37.0, 0.0, 0.0])
    path = _write_obj(tmp_path_factory.mktemp("mug") / "mug.obj", [body, handle])
    return load_mesh(path, diameter_mm=None)


def test_symmetry_axis_found_off_the_box_centre(mug):
    from bpnp.pose.mesh import symmetry_axis_point

    # Box x from -30 to 45: centre 7.5 mm from the cylinder's axis, which load_mesh moved to x=-7.5.
    axis_point = symmetry_axis_point(mug, "y")
    assert axis_point[1] == 0.0 and np.allclose(axis_point, [-7.5, 0.0, 0.0], atol=1.0)


def test_distinctive_keypoints_break_the_symmetry(mug):
    from bpnp.pose.mesh import distinctive_keypoints

    kp = distinctive_keypoints(mug, 8, axis="y")
    assert kp.shape == (9, 3)
    radius = np.hypot(kp[:, 0] + 7.5, kp[:, 2])  # distance from the cylinder's axis
    on_handle = kp[:, 0] > 30.0 - 7.5 - 1e-6
    assert np.all(on_handle[:8] | (radius[:8] < 2.5)), kp  # never on the body's look-alike wall
    assert on_handle.sum() >= 4  # and spread over the handle
    assert radius[8] < 1.0 and abs(kp[8, 1]) < 1e-9  # the last: on the axis, level with the centre
    assert np.array_equal(kp, distinctive_keypoints(mug, 8, axis=np.array([0.0, 2.0, 0.0])))
    assert np.array_equal(distinctive_keypoints(mug, 8, axis=None), farthest_point_keypoints(mug, 8))
    fps = farthest_point_keypoints(mug, 8)
    assert not np.all((fps[:8, 0] > 22.5) | (np.hypot(fps[:8, 0] + 7.5, fps[:8, 2]) < 2.5))  # fps: on the wall


def test_distinctive_keypoints_refuse_a_symmetric_object(tmp_path):
    import trimesh

    from bpnp.pose.mesh import distinctive_keypoints

    body = trimesh.creation.cylinder(radius=30.0, height=60.0, sections=96)
    mesh = load_mesh(_write_obj(tmp_path / "can.obj", [body]), diameter_mm=None)
    with pytest.raises(ValueError, match="symmetric throughout"):
        distinctive_keypoints(mesh, 8, axis="z")
    with pytest.raises(ValueError, match="axis"):
        distinctive_keypoints(mesh, 8, axis="w")


def test_keypoint_method_recorded_and_checked(tmp_path):
    from bpnp import cli
    from bpnp.pose.synthesis import KEYPOINT_METHODS, render_splits

    assert cli.KEYPOINT_METHODS == KEYPOINT_METHODS  # the CLI's copy, kept to spare torch at start-up

    settings = RenderSettings(size=32)
    render_splits(spot_mesh(), tmp_path, {"train": 2}, settings, keypoint_method="distinctive")
    assert json.loads((tmp_path / "keypoints.json").read_text())["method"] == "distinctive"
    with pytest.raises(ValueError, match="chosen by 'distinctive', not 'fps'"):
        render_splits(spot_mesh(), tmp_path, {"train": 2}, settings)
    with pytest.raises(ValueError, match="keypoint_method"):
        render_splits(spot_mesh(), tmp_path / "other", {"train": 2}, settings, keypoint_method="random")


def test_hidden_by_surface_agrees_with_the_normals_on_a_convex_body():
    """On a convex body a surface point can be seen exactly when its outward normal faces the
    camera: an oracle that shares nothing with ray casting."""
    import trimesh

    from bpnp.pose.mesh import Mesh, hidden_by_surface

    sphere = trimesh.creation.icosphere(subdivisions=2, radius=40.0)
    mesh = Mesh(np.asarray(sphere.vertices), np.asarray(sphere.faces), np.asarray(sphere.vertex_normals))
    points = np.asarray(sphere.triangles_center)[::4]
    normals = np.asarray(sphere.face_normals)[::4]
    rng = np.random.default_rng(0)
    R = bpnp.rvec_to_rotmat(torch.from_numpy(rng.normal(size=(6, 3)))).numpy()
    t = np.column_stack([rng.uniform(-30, 30, (6, 2)), rng.uniform(150, 400, 6)])
    hidden = hidden_by_surface(mesh, points, R, t)
    centres = -np.einsum("nji,nj->ni", R, t)
    towards = centres[:, None, :] - points[None]
    cos = np.einsum("nkc,kc->nk", towards, normals) / np.linalg.norm(towards, axis=-1)
    clear = np.abs(cos) > 0.05  # grazing views are decided by rounding
    assert clear.mean() > 0.9 and 0.2 < hidden.mean() < 0.8
    assert np.array_equal(hidden[clear], (cos < 0)[clear])
    assert hidden_by_surface(mesh, np.zeros((1, 3)), R, t).all()  # the centre lies inside
    with pytest.raises(ValueError, match="points"):
        hidden_by_surface(mesh, np.zeros(3), R, t)
    with pytest.raises(ValueError, match="R, t"):
        hidden_by_surface(mesh, points, R, t[:2])


def test_keypoint_visibility_codes(tmp_path):
    import cv2

    from bpnp.pose.data import COVERED, INTERIOR, OFF_IMAGE, VISIBLE, keypoint_visibility

    render_dataset(spot_mesh(), tmp_path, 6, RenderSettings(size=64, occluder_prob=0.0), seed=3, split="test")
    split = tmp_path / "test"
    data = load_split(split, size=64)
    codes = keypoint_visibility(split, data.keypoints3d)
    assert codes.shape == (6, 9) and codes.dtype == np.uint8
    assert np.all(codes[:, -1] == INTERIOR) and not np.any(codes[:, :-1] == INTERIOR)  # the centre
    assert not np.isin(codes, (COVERED, OFF_IMAGE)).any()  # no occluders, the object in the frame
    seen = codes[:, :-1] == VISIBLE
    assert 0.2 < seen.mean() < 0.9
    # A keypoint the object does not hide lies on its silhouette (mask), up to a pixel.
    masks = [cv2.imread(str(split / "000000" / "mask" / f"{i:06d}_000000.png"), 0) > 0 for i in range(6)]
    dilated = [cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0 for m in masks]
    uv = np.rint(data.keypoints2d).astype(int)
    assert all(dilated[i][uv[i, j, 1], uv[i, j, 0]] for i, j in zip(*np.nonzero(seen)))
    # Something in front of image 2 (its visible mask emptied): its seen keypoints become covered.
    cv2.imwrite(str(split / "000000" / "mask_visib" / "000002_000000.png"), np.zeros((64, 64), np.uint8))
    covered = keypoint_visibility(split, data.keypoints3d)
    assert np.array_equal(covered[2] == COVERED, codes[2] == VISIBLE) and codes[2].tolist().count(VISIBLE) > 0
    assert np.array_equal(np.delete(covered, 2, 0), np.delete(codes, 2, 0))
    # A keypoint off the image: the object moved far to the side in the annotations.
    gt = json.loads((split / "000000" / "scene_gt.json").read_text())
    gt["0"][0]["cam_t_m2c"][0] += 1000.0
    (split / "000000" / "scene_gt.json").write_text(json.dumps(gt))
    assert np.all(keypoint_visibility(split, data.keypoints3d)[0, :-1] == OFF_IMAGE)
    assert keypoint_visibility(split, data.keypoints3d, limit=2).shape == (2, 9)


def test_keypoints_are_never_chosen_where_nothing_sees_them(tmp_path):
    """Surface inside the object (a plate in a box; a handle sunk into a mug's body) has no
    look-alike and lies far from the outer points, so the sampling would pick it if let."""
    import trimesh

    from bpnp.pose.mesh import distinctive_keypoints, seen_share

    box, plate = trimesh.creation.box(extents=[100.0] * 3), trimesh.creation.box(extents=[60.0, 60.0, 2.0])
    boxed = load_mesh(_write_obj(tmp_path / "boxed.obj", [box, plate]), diameter_mm=None)
    blind = farthest_point_keypoints(boxed, 9, min_seen=0.0)
    assert seen_share(boxed, blind[:9]).min() == 0.0  # the plate's centre, 87 mm from every corner
    chosen = farthest_point_keypoints(boxed, 9)
    assert seen_share(boxed, chosen[:9]).min() >= 0.05 and np.all(np.abs(chosen[:9]).max(1) > 49.0)

    body = trimesh.creation.cylinder(radius=30.0, height=60.0, sections=96)
    body.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))
    handle = trimesh.creation.box(extents=[40.0, 36.0, 8.0])
    handle.apply_translation([30.0, 0.0, 0.0])  # half of it inside the body
    mug = load_mesh(_write_obj(tmp_path / "sunk.obj", [body, handle]), diameter_mm=None)
    assert seen_share(mug, distinctive_keypoints(mug, 8, axis="y", min_seen=0.0)[:8]).min() == 0.0
    assert seen_share(mug, distinctive_keypoints(mug, 8, axis="y")[:8]).min() >= 0.05
    # A mesh without hidden surface keeps its keypoints: the filter changes nothing on spot.
    spot = load_mesh(spot_mesh(), diameter_mm=100.0)
    assert np.array_equal(farthest_point_keypoints(spot, 8), farthest_point_keypoints(spot, 8, min_seen=0.0))
    with pytest.raises(ValueError, match="seen from"):
        farthest_point_keypoints(boxed, 9, min_seen=0.99)


def test_render_dataset_records_the_symmetry_axis_and_refuses_a_bad_one_before_writing(tmp_path):
    render_dataset(spot_mesh(), tmp_path / "ok", 1, RenderSettings(size=64), symmetric="z")
    info = bop.read_models_info(tmp_path / "ok" / "models")[1]
    assert info["symmetries_continuous"] == [{"axis": [0.0, 0.0, 1.0], "offset": [0.0, 0.0, 0.0]}]
    with pytest.raises(ValueError, match="symmetric: expected 'x', 'y', 'z'"):
        render_dataset(tmp_path / "no_mesh_needed.obj", tmp_path / "bad", 2, symmetric="w")
    assert not (tmp_path / "bad").exists()


def test_a_missing_material_file_is_named(tmp_path):
    from bpnp.pose.mesh import load_mesh

    obj = tmp_path / "m.obj"
    obj.write_text("mtllib gone.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\n")
    with pytest.warns(UserWarning, match="gone.mtl is not beside it"):
        load_mesh(obj)
