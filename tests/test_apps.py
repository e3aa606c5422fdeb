"""Quick configurations of every experiment, asserting their acceptance figures."""

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
cv2 = pytest.importorskip("cv2")

from bpnp.cli import main  # noqa: E402
from bpnp.paper import learn_intrinsics, learn_pose, learn_structure, synthetic_boards  # noqa: E402

CHESSBOARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "chessboard"


def test_pose_demo(tmp_path):
    m = learn_pose.run(str(tmp_path), iters=300, quiet=True)
    assert m["rotation_error_deg"] < 0.1 and m["translation_error_rel"] < 1e-3
    for name in ("metrics.json", "report.md", "loss.png", "keypoints.png"):
        assert (tmp_path / name).exists()


def test_sfm_demo(tmp_path):
    m = learn_structure.run(str(tmp_path), iters=12, quiet=True)
    assert m["start_rms_error_rel_to_size"] > 0.2
    assert m["rms_error_rel_to_size"] < 0.01
    assert (tmp_path / "points.png").exists()


def test_calib_demo(tmp_path):
    m = learn_intrinsics.run(str(tmp_path), quiet=True, seed=1)
    assert min(m["start_error_rel"].values()) > 0.2
    assert m["max_error_rel"] < 1e-3
    assert (tmp_path / "intrinsics.png").exists()


def test_calibrate_synthetic_against_truth_and_opencv(tmp_path):
    r = synthetic_boards.run_synthetic(str(tmp_path), count=12, quiet=True)
    assert r["images_used"] == 12
    assert r["max_error_rel_to_truth"] < 2e-3
    assert max(abs(v) for v in r["relative_to_opencv"].values()) < 1e-6
    assert (tmp_path / "corners.png").exists()


@pytest.mark.skipif(not CHESSBOARD.is_dir(), reason=f"real photographs not found at {CHESSBOARD}")
def test_calibrate_real_photographs_cli(tmp_path):
    images = sorted(str(p) for p in CHESSBOARD.glob("left*.jpg"))
    assert len(images) == 13
    out_json = tmp_path / "k.json"
    assert (
        main(["calibrate", *images, "--board", "9x6", "--json", str(out_json), "--out", str(tmp_path), "--quiet"]) == 0
    )
    r = json.loads(out_json.read_text())
    # The same minimum as OpenCV's calibrateCamera, in a few solves through the layer.
    for k in ("fx", "fy", "cx", "cy"):
        assert abs(r[k] / r["opencv"][k] - 1) < 1e-7
    assert abs(r["rms"] / r["opencv"]["rms"] - 1) < 1e-10
    assert r["evaluations"] <= 10
    assert set(r["per_image_rms"]) == {Path(p).name for p in images}


def test_cli_demo_layer(tmp_path, capsys):
    assert main(["demo", "layer", "--out", str(tmp_path), "--quiet"]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert max(m["gradient_check"].values()) < 1e-6
    assert m["converged"] == m["batch"]


def test_cli_rejects_bad_board():
    with pytest.raises(SystemExit):
        main(["calibrate", "--board", "nine-by-six"])


@pytest.mark.skipif(not CHESSBOARD.is_dir(), reason=f"real photographs not found at {CHESSBOARD}")
def test_calibrate_real_photographs_with_distortion(tmp_path):
    from bpnp import calibration as calibrate

    paths = sorted(CHESSBOARD.glob("left*.jpg"))
    r = calibrate.calibrate(
        calibrate.load_images(paths), [p.name for p in paths], distortion=True, out=str(tmp_path), quiet=True
    )
    for k in ("fx", "fy", "cx", "cy"):
        assert abs(r[k] / r["opencv"][k] - 1) < 1e-7
    for k in ("k1", "k2", "p1", "p2", "k3"):
        assert abs(r[k] - r["opencv"][k]) < 1e-6
    assert abs(r["rms"] / r["opencv"]["rms"] - 1) < 1e-10
    assert r["evaluations"] <= 10


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_sfm_from_scratch(seed, tmp_path):
    # No knowledge of the shape: a random cloud; plain descent stalls, the factorization start and
    # the layer reach the truth (aligned RMS < 1%).
    m = learn_structure.run(str(tmp_path), seed=seed, from_scratch=True, quiet=True)
    assert m["rms_error_rel_to_size"] < 0.01
    assert m["random_start_plain_descent_rms_rel_to_size"] > 0.05
    assert (tmp_path / "points.png").exists()


def test_cli_from_scratch_only_for_sfm(capsys):
    assert main(["demo", "pose", "--from-scratch"]) == 2
    assert "--from-scratch" in capsys.readouterr().err
