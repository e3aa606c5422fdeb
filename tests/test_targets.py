"""Planar targets: the chessboard mesh, and a flat object through render, train and evaluate."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trimesh")
pytest.importorskip("PIL")

from bpnp.pose.mesh import hull_vertices, load_mesh, mesh_diameter  # noqa: E402
from bpnp.pose.targets import chessboard_corners, chessboard_texture, write_chessboard  # noqa: E402


def test_the_board_texture_follows_opencv_and_has_no_half_turn_symmetry():
    tex = chessboard_texture(9, 6, margin=0.0, pixels_per_square=4)
    assert tex.shape == (7 * 4, 10 * 4)
    assert tex[0, 0] == 0 and tex[0, 4] == 255 and tex[4, 0] == 255  # the top-left square is black
    assert not np.array_equal(tex, tex[::-1, ::-1])  # 9x6: colours swap under a half turn
    assert np.array_equal(chessboard_texture(8, 6, 0.0, 4), chessboard_texture(8, 6, 0.0, 4)[::-1, ::-1])
    padded = chessboard_texture(9, 6, margin=0.5, pixels_per_square=4)
    assert padded.shape == (7 * 4 + 4, 10 * 4 + 4) and padded[0, 0] == 255


def test_the_board_mesh_is_in_the_board_frame(tmp_path):
    path = write_chessboard(tmp_path, 9, 6, square_mm=20.0, margin=0.5)
    mesh = load_mesh(path, diameter_mm=None)
    assert mesh.texture is not None and mesh.uv is not None
    # the quad spans -1.5 .. 9.5 squares in x and -1.5 .. 6.5 in y, centred by load_mesh
    assert np.allclose(mesh.centre, [4.0 * 20.0, 2.5 * 20.0, 0.0])
    assert np.allclose(np.ptp(mesh.vertices, 0), [11 * 20.0, 8 * 20.0, 0.0])
    corners = chessboard_corners(9, 6, 20.0)
    assert corners.shape == (54, 3) and np.allclose(corners[1], [20.0, 0, 0]) and np.allclose(corners[9], [0, 20.0, 0])


def test_flat_and_thin_point_sets_have_a_hull_and_a_diameter():
    g = np.random.default_rng(0)
    flat = np.c_[g.uniform(-1, 1, (500, 2)), np.zeros(500)]
    square = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], dtype=float)
    assert mesh_diameter(np.r_[flat, square]) == pytest.approx(np.sqrt(8.0))
    rod = np.c_[np.linspace(0, 3, 300), np.zeros(300), np.zeros(300)]
    assert len(hull_vertices(rod)) == 2 and mesh_diameter(rod) == pytest.approx(3.0)


def rendered_boards(folder: Path, count: int, split: str, seed: int) -> Path:
    """A tiny split (32 px, no occluders) of a 9x6 board with 25 mm squares; skips without OpenGL."""
    from bpnp.pose.config import RenderSettings
    from bpnp.pose.render import RenderUnavailableError
    from bpnp.pose.synthesis import render_dataset

    board = write_chessboard(folder / "board", 9, 6, square_mm=25.0)
    try:
        settings = RenderSettings(size=32, occluder_prob=0.0)
        return render_dataset(board, folder / "data", count, settings, seed=seed, split=split, diameter_mm=None)
    except RenderUnavailableError as exc:
        pytest.skip(f"no OpenGL here: {exc}")


def tiny_training(data: Path, out: Path, variant: str, steps: int):
    from bpnp.pose.config import TrainConfig
    from bpnp.pose.train import train

    config = TrainConfig(
        data=str(data), out=str(out), variant=variant, steps=steps, batch_size=8, size=32, width=8, lr=1e-2,
        log_every=steps, checkpoint_every=steps, workers=0, progress=False, threads=1, warmup_frac=0.5,
    )  # fmt: skip
    return train(config)


def test_a_flat_target_renders_trains_and_evaluates(tmp_path):
    from bpnp.pose.evaluate import evaluate

    train_split = rendered_boards(tmp_path, 16, "train", seed=1)
    rendered_boards(tmp_path, 6, "test", seed=2)
    summary = tiny_training(train_split, tmp_path / "run", "bpnp-add", 50)
    assert summary["nonfinite_steps"] == 0
    metrics = evaluate(tmp_path / "run" / "model.pt", tmp_path / "data" / "test", tmp_path / "eval")
    assert metrics["images"] == 6
    assert metrics["diameter_mm"] == pytest.approx(np.hypot(11 * 25.0, 8 * 25.0))
    for key in ("kp_error_px_mean", "proj2d_5px", "add_0.1d"):
        assert np.isfinite(metrics[key]), key


SHARED_BOARDS = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "chessboard").glob("left*.jpg"))


def synthetic_photographs(folder: Path, count: int, seed: int):
    """Rendered photographs of a 9x6 board with known poses (square units), and their camera JSON."""
    import json

    import cv2

    from bpnp.paper.synthetic_boards import render_views

    K = np.array([[600.0, 0, 320], [0, 600, 240], [0, 0, 1]])
    images, poses = render_views(K, count, (9, 6), seed=seed)
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"view{i}.png")
        cv2.imwrite(str(paths[-1]), img)
    camera = folder / "camera.json"
    camera.write_text(json.dumps({"fx": 600.0, "fy": 600.0, "cx": 320.0, "cy": 240.0}))
    return paths, poses, camera


def test_photographs_of_a_board_become_a_split_with_the_poses_they_were_taken_at(tmp_path):
    import json

    from bpnp.geometry import rvec_to_rotmat
    from bpnp.pose.board_split import board_split
    from bpnp.pose.data import load_split

    paths, poses, camera = synthetic_photographs(tmp_path, 4, seed=3)
    square = 20.0
    summary = board_split(paths, tmp_path / "data", (9, 6), square, camera=camera, quiet=True)
    assert len(summary["images"]) == 4 and summary["gt_rms_px_max"] < 0.5
    gt = json.loads((tmp_path / "data" / "test" / "000000" / "scene_gt.json").read_text())
    centre = np.array([4.0, 2.5, 0.0]) * square  # the board mesh's centre in the board frame
    for k, pose in enumerate(poses):
        R_true = rvec_to_rotmat(torch.from_numpy(pose[:3])).numpy()
        t_true = pose[3:] * square + R_true @ centre  # square units -> mm, board -> model frame
        R = np.array(gt[str(k)][0]["cam_R_m2c"]).reshape(3, 3)
        assert np.degrees(np.arccos(np.clip((np.trace(R.T @ R_true) - 1) / 2, -1, 1))) < 0.2
        assert np.linalg.norm(np.array(gt[str(k)][0]["cam_t_m2c"]) - t_true) < 0.005 * np.linalg.norm(t_true)
    data = load_split(tmp_path / "data" / "test", size=64)
    assert data.images.shape == (4, 64, 64, 3) and data.keypoints3d.shape == (9, 3)


def test_renders_through_a_lens_show_the_corners_where_the_lens_puts_them(tmp_path):
    # Windows of a strong barrel lens, up to 0.8 off its axis: every inner corner of the board
    # lies, in the rendered image, where projecting through the lens puts it (a sub-pixel corner
    # search started there stays put); without the lens it would be pixels off.
    import dataclasses

    import cv2

    from bpnp.pose.config import RenderSettings
    from bpnp.pose.data import load_split
    from bpnp.pose.synthesis import render_dataset
    from bpnp.pose.targets import board_keypoints, write_chessboard

    lens = (-0.32, 0.1, 0.0005, -0.0005, 0.0)
    mesh = write_chessboard(tmp_path / "mesh", 9, 6, 20.0, margin=1.0)
    # 384 px: squares of 12-25 px, where the corner search itself is good to ~0.15 px (pinhole).
    settings = RenderSettings(
        size=384, occluder_prob=0.0, view_cone=30.0, background="black", lens=lens, lens_field=0.8
    )
    split = render_dataset(
        mesh, tmp_path / "data", 6, settings, seed=1, diameter_mm=None, keypoints=board_keypoints(9, 6, 20.0)
    )
    data = load_split(split, size=384, cache=False)
    assert data.dist is not None and np.allclose(data.dist, lens)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 50, 1e-4)
    moved = []
    for j in range(len(data)):
        gray = cv2.cvtColor(data.images[j], cv2.COLOR_RGB2GRAY)
        start = data.keypoints2d[j, :8].astype(np.float32)  # the eight inner corners
        found = cv2.cornerSubPix(gray, start.reshape(-1, 1, 2).copy(), (3, 3), (-1, -1), criteria)[:, 0]
        moved.append(np.linalg.norm(found - start, axis=-1))
    moved = np.concatenate(moved)
    pinhole = dataclasses.replace(data, dist=None).project(data.keypoints3d)
    pinhole_off = np.linalg.norm(pinhole[:, :8] - data.keypoints2d[:, :8], axis=-1)
    assert np.median(moved) < 0.15 and moved.max() < 0.5, moved
    assert pinhole_off.max() > 3.0


def test_a_lens_flows_from_the_photographs_through_loading_and_scoring(tmp_path):
    # Boards photographed through a strong barrel lens: the split records its dist, a crop keeps
    # it (K' = A K), the loaded keypoints are where OpenCV projects them through that lens, and
    # scoring measures the 2D error through it.
    import json

    import cv2

    from bpnp.paper.synthetic_boards import render_views
    from bpnp.pose.board_split import board_split
    from bpnp.pose.data import _crop_matrix, load_split
    from bpnp.pose.evaluate import score_predictions

    K = np.array([[420.0, 0, 320], [0, 420, 240], [0, 0, 1]])
    dist = np.array([-0.3, 0.09, 0.001, -0.0005, -0.01])
    images, _ = render_views(K, 4, (9, 6), seed=5, dist=dist)
    paths = [tmp_path / f"wide{i}.png" for i in range(len(images))]
    for path, img in zip(paths, images):
        cv2.imwrite(str(path), img)
    camera = tmp_path / "camera.json"
    camera.write_text(json.dumps({"K": K.tolist(), "dist": dist.tolist()}))
    summary = board_split(paths, tmp_path / "data", (9, 6), 20.0, camera=camera, quiet=True)
    assert len(summary["images"]) >= 3 and summary["gt_rms_px_max"] < 0.5
    split = tmp_path / "data" / "test"
    data = load_split(split, size=128, cache=False)
    assert data.dist is not None and np.allclose(data.dist, dist)
    info = json.loads((split / "000000" / "scene_gt_info.json").read_text())
    gt = json.loads((split / "000000" / "scene_gt.json").read_text())
    far = 0.0
    for j, (_, im_id, _) in enumerate(data.ids):
        entry = gt[str(im_id)][0]
        R, t = np.array(entry["cam_R_m2c"]).reshape(3, 3), np.array(entry["cam_t_m2c"])
        uv, _ = cv2.projectPoints(data.keypoints3d, cv2.Rodrigues(R)[0], t, K, dist)
        A = _crop_matrix(tuple(info[str(im_id)][0]["bbox_obj"]), 128, 0.2)
        expected = uv[:, 0] @ A[:, :2].T + A[:, 2]
        assert np.abs(data.keypoints2d[j] - expected).max() < 1e-6
        pinhole, _ = cv2.projectPoints(data.keypoints3d, cv2.Rodrigues(R)[0], t, K, None)
        far = max(far, np.abs(pinhole[:, 0] - uv[:, 0]).max())
    assert far > 5.0  # the lens matters here: ignoring it would be pixels off
    # The true poses score perfectly; a shifted one by its error through the lens.
    rows = ["scene_id,im_id,obj_id,score,R,t,time"]
    shift = np.array([2.0, 0.0, 0.0])
    for _, im_id, obj in data.ids:
        entry = gt[str(im_id)][0]
        t = np.array(entry["cam_t_m2c"]) + (shift if im_id == data.ids[0][1] else 0.0)
        rows.append(f"0,{im_id},{obj},1,{' '.join(map(str, entry['cam_R_m2c']))},{' '.join(map(str, t))},-1")
    (tmp_path / "p.csv").write_text("\n".join(rows) + "\n")
    _, per = score_predictions(tmp_path / "p.csv", split)
    assert np.allclose(per["proj2d_px"][1:], 0.0, atol=1e-9)
    entry = gt[str(data.ids[0][1])][0]
    R, t = np.array(entry["cam_R_m2c"]).reshape(3, 3), np.array(entry["cam_t_m2c"])
    from bpnp.pose.evaluate import model_points

    points, _ = model_points(split, 1)
    a, _ = cv2.projectPoints(points, cv2.Rodrigues(R)[0], t, K, dist)
    b, _ = cv2.projectPoints(points, cv2.Rodrigues(R)[0], t + shift, K, dist)
    assert abs(per["proj2d_px"][0] - np.linalg.norm(a - b, axis=-1).mean()) < 1e-6


@pytest.mark.skipif(not SHARED_BOARDS, reason="the shared chessboard photographs are not beside this checkout")
def test_the_shared_photographs_make_a_split_from_the_command_line(tmp_path, capsys):
    import json

    from bpnp.cli import main

    assert main(["board-split", *map(str, SHARED_BOARDS), "--out", str(tmp_path / "real"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "real" / "test" / "board_split.json").read_text())
    assert len(summary["images"]) == 13 and summary["gt_rms_px_max"] < 0.3
    assert abs(summary["K"][0][0] - 537.4) < 3.0  # OpenCV's calibrateCamera on these: fx 537.4


def test_views_within_a_cone_see_the_front_of_a_planar_target():
    from bpnp.pose.config import RenderSettings
    from bpnp.pose.synthesis import rotation_in_cone

    rng = np.random.default_rng(0)
    R = np.stack([rotation_in_cone(rng, 50.0) for _ in range(2000)])
    assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-12) and np.allclose(np.linalg.det(R), 1.0)
    tilt = np.degrees(np.arccos(R[:, 2, 2]))
    assert tilt.max() <= 50.0 + 1e-9 and tilt.max() > 48.0
    # uniform over the cap: half its area lies below the angle whose cosine is the mean of the two ends
    half = np.degrees(np.arccos((1 + np.cos(np.radians(50.0))) / 2))
    assert abs(np.mean(tilt < half) - 0.5) < 0.04
    with pytest.raises(ValueError, match="view_cone"):
        RenderSettings(view_cone=0.0)


def test_photo_effects_are_reproducible_and_change_what_a_camera_changes():
    from bpnp.pose.photo import camera_effects, hand_occluder, photo_background

    rng = np.random.default_rng
    bg = photo_background(rng(1), 64)
    assert bg.shape == (64, 64, 3) and bg.dtype == np.float32 and 0 <= bg.min() and bg.max() <= 1
    assert np.array_equal(bg, photo_background(rng(1), 64))
    cover, colour = hand_occluder(rng(2), 64, (16, 16, 32, 32))
    assert cover.shape == (64, 64) and cover.max() > 0.9 and cover[16:48, 16:48].max() > 0.9
    img = np.full((64, 64, 3), 0.5, np.float32)
    shots = [camera_effects(img, rng(s)) for s in range(12)]
    assert all(s.dtype == np.uint8 and s.shape == (64, 64, 3) for s in shots)
    assert np.array_equal(shots[0], camera_effects(img, rng(0)))
    means = [float(s.mean()) for s in shots]
    assert max(means) - min(means) > 20  # exposure and gamma vary
    assert any(np.array_equal(s[..., 0], s[..., 1]) and np.array_equal(s[..., 1], s[..., 2]) for s in shots)


def test_board_keypoints_are_corners_in_the_mesh_frame(tmp_path):
    from bpnp.pose.targets import board_keypoints

    kp = board_keypoints(9, 6, 20.0)
    assert kp.shape == (9, 3) and np.allclose(kp[-1], 0) and np.allclose(kp[:, 2], 0)
    assert np.allclose(kp[0], [-80.0, -50.0, 0]) and np.allclose(kp[2], [80.0, 50.0, 0])
    mesh = load_mesh(write_chessboard(tmp_path, 9, 6, 20.0), diameter_mm=None)
    corners = chessboard_corners(9, 6, 20.0) - mesh.centre
    assert all(np.min(np.linalg.norm(corners - k, axis=1)) < 1e-9 for k in kp[:-1])


def test_the_board_experiment_trains_evaluates_on_photographs_and_continues(tmp_path):
    from bpnp.pose.board_study import run
    from bpnp.pose.render import RenderUnavailableError

    photos, _, camera = synthetic_photographs(tmp_path, 3, seed=5)
    tiny = {"count": 16, "size": 32}
    try:
        metrics = run(photos, tmp_path / "exp", steps=8, camera=camera, quiet=True, render=tiny)
    except RenderUnavailableError as exc:
        pytest.skip(f"no OpenGL here: {exc}")
    for variant in ("heatmap", "bpnp-add"):
        entry = metrics["variants"][variant]
        assert len(entry["add_0.1d"]["per_seed"]) == 1 and np.isfinite(entry["kp_error_px"]["mean"])
    assert len(metrics["variants"]["bpnp-add"]["add_0.1d"]["difference"]) == 3
    report = (tmp_path / "exp" / "report.md").read_text()
    assert "3 photographs" in report and "heatmap_seed0/eval/overlays.png" in report
    stamp = (tmp_path / "exp" / "heatmap_seed0" / "model.pt").stat().st_mtime_ns
    run(photos, tmp_path / "exp", steps=8, camera=camera, quiet=True, render=tiny)  # reads the runs back
    assert (tmp_path / "exp" / "heatmap_seed0" / "model.pt").stat().st_mtime_ns == stamp


def test_the_board_experiment_renders_through_the_photographs_lens(tmp_path):
    # A wide-angle camera's lens (its JSON gives dist): the renders are windows of that lens, the
    # photographs' split records it, and evaluation runs through it.
    import json

    import cv2

    from bpnp.paper.synthetic_boards import render_views
    from bpnp.pose.board_study import run
    from bpnp.pose.render import RenderUnavailableError

    K = np.array([[420.0, 0, 320], [0, 420, 240], [0, 0, 1]])
    dist = [-0.3, 0.09, 0.0, 0.0, 0.0]
    images, _ = render_views(K, 3, (9, 6), seed=7, dist=np.array(dist))
    photos = [tmp_path / f"wide{i}.png" for i in range(len(images))]
    for path, img in zip(photos, images):
        cv2.imwrite(str(path), img)
    camera = tmp_path / "camera.json"
    camera.write_text(json.dumps({"K": K.tolist(), "dist": dist}))
    try:
        metrics = run(
            photos, tmp_path / "exp", variants=("heatmap",), steps=4, camera=camera, quiet=True,
            render={"count": 8, "size": 32},
        )  # fmt: skip
    except RenderUnavailableError as exc:
        pytest.skip(f"no OpenGL here: {exc}")
    settings = json.loads((tmp_path / "exp" / "data" / "train" / "render_settings.json").read_text())
    corner = np.linalg.norm([(0 - 320) / 420, (0 - 240) / 420])
    assert settings["lens"] == dist and abs(settings["lens_field"] - 0.8 * corner) < 1e-9
    cameras = json.loads((tmp_path / "exp" / "data" / "train" / "000000" / "scene_camera.json").read_text())
    assert all(c["dist"] == dist for c in cameras.values())
    assert np.isfinite(metrics["variants"]["heatmap"]["kp_error_px"]["mean"])


def test_evaluate_refuses_a_network_of_another_object(tmp_path):
    from bpnp.pose.config import RenderSettings
    from bpnp.pose.evaluate import evaluate
    from bpnp.pose.study import spot_mesh
    from bpnp.pose.synthesis import render_dataset

    train_split = rendered_boards(tmp_path, 8, "train", seed=1)
    render_dataset(spot_mesh(), tmp_path / "spot", 4, RenderSettings(size=32, occluder_prob=0.0), seed=2, split="test")
    tiny_training(train_split, tmp_path / "run", "heatmap", 4)
    with pytest.raises(ValueError, match="trained on another object"):
        evaluate(tmp_path / "run" / "model.pt", tmp_path / "spot" / "test", tmp_path / "eval")
    test_split = rendered_boards(tmp_path, 3, "test", seed=3)
    metrics = evaluate(tmp_path / "run" / "model.pt", test_split, tmp_path / "eval2")
    assert metrics["images"] == 3
