"""Planar targets: the chessboard mesh, and a flat object through render, train and evaluate."""

import numpy as np
import pytest

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


def test_a_flat_target_renders_trains_and_evaluates(tmp_path):
    from bpnp.pose.data import RenderSettings, render_dataset
    from bpnp.pose.evaluate import evaluate
    from bpnp.pose.render import RenderUnavailableError
    from bpnp.pose.train import TrainConfig, train

    board = write_chessboard(tmp_path / "board", 9, 6, square_mm=25.0)
    settings = RenderSettings(size=32, occluder_prob=0.0)
    try:
        render_dataset(board, tmp_path / "data", 16, settings, seed=1, split="train", diameter_mm=None)
    except RenderUnavailableError as exc:
        pytest.skip(f"no OpenGL here: {exc}")
    render_dataset(board, tmp_path / "data", 6, settings, seed=2, split="test", diameter_mm=None)
    config = TrainConfig(
        data=str(tmp_path / "data" / "train"), out=str(tmp_path / "run"), variant="bpnp-add", steps=50,
        batch_size=8, size=32, width=8, lr=1e-2, log_every=10, checkpoint_every=50, workers=0, progress=False,
        threads=1, warmup_frac=0.5,
    )  # fmt: skip
    summary = train(config)
    assert summary["nonfinite_steps"] == 0
    metrics = evaluate(tmp_path / "run" / "model.pt", tmp_path / "data" / "test", tmp_path / "eval")
    assert metrics["images"] == 6
    assert metrics["diameter_mm"] == pytest.approx(np.hypot(11 * 25.0, 8 * 25.0))
    for key in ("kp_error_px_mean", "proj2d_5px", "add_0.1d"):
        assert np.isfinite(metrics[key]), key
