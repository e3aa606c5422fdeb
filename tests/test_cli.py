"""The command line: every user mistake is one line on stderr and a non-zero exit, found before
the long work; calibration finishes on subsets and resized copies of real photographs."""

import json
from pathlib import Path

import numpy as np
import pytest

from bpnp.cli import main

cv2 = pytest.importorskip("cv2")
CHESSBOARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "chessboard"
needs_photos = pytest.mark.skipif(not CHESSBOARD.is_dir(), reason=f"real photographs not found at {CHESSBOARD}")


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.mark.parametrize(
    "argv,message",
    [
        (["calibrate", "--board", "0x0", "x.jpg"], "--board"),
        (["calibrate", "--board", "nine-by-six", "x.jpg"], "--board"),
        (["calibrate", "--square", "0", "x.jpg"], "--square"),
        (["calibrate", "--square", "nan", "x.jpg"], "--square"),
        (["calibrate", "--square", "-1", "x.jpg"], "--square"),
        (["calibrate", "--iters", "0", "x.jpg"], "--iters"),
        (["demo", "sfm", "--iters", "0"], "--iters"),
        (["demo", "pose", "--device", "banana"], "--device"),
        (["demo", "pose", "--device", "cuda:7"], "--device"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    code, err = run_cli(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_and_unreadable_images(tmp_path, capsys):
    code, err = run_cli(["calibrate", str(tmp_path / "nope.jpg"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "no such file" in err
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    code, err = run_cli(["calibrate", str(bad), "--out", str(tmp_path)], capsys)
    assert code == 2 and "cannot read" in err


def test_unwritable_out_found_before_the_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_cli(["calibrate", "--out", str(blocker / "sub"), "x.jpg"], capsys)
    assert code == 2 and "--out" in err


def test_too_few_boards(tmp_path, capsys):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 160), 128, np.uint8))
    code, err = run_cli(["calibrate", str(blank), str(blank), "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 1 and "found in 0 images" in err


def _calibrate(paths, tmp_path, *extra):
    out = tmp_path / "k.json"
    assert main(["calibrate", *map(str, paths), "--json", str(out), "--out", str(tmp_path), "--quiet", *extra]) == 0
    return json.loads(out.read_text())


@needs_photos
@pytest.mark.parametrize("size,seed", [(5, 0), (5, 1), (8, 2), (12, 3)])
def test_calibrate_subsets_of_real_photographs(size, seed, tmp_path):
    paths = sorted(CHESSBOARD.glob("left*.jpg"))
    pick = np.random.default_rng(seed).choice(len(paths), size, replace=False)
    r = _calibrate([paths[i] for i in sorted(pick)], tmp_path)
    for k in ("fx", "fy", "cx", "cy"):
        assert abs(r[k] / r["opencv"][k] - 1) < 1e-6, (k, r[k], r["opencv"][k])
    assert "seconds" in r and "seconds" in r["opencv"]


@needs_photos
def test_calibrate_resized_copies_and_metric_square(tmp_path):
    # Half-size copies (squares ~15 px: the sub-pixel window shrinks with them), 2.5 cm squares.
    paths = []
    for p in sorted(CHESSBOARD.glob("left*.jpg"))[:8]:
        img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        small = tmp_path / p.name
        cv2.imwrite(str(small), cv2.resize(img, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
        paths.append(small)
    r = _calibrate(paths, tmp_path, "--square", "0.025")
    for k in ("fx", "fy", "cx", "cy"):
        assert abs(r[k] / r["opencv"][k] - 1) < 1e-6


@needs_photos
@pytest.mark.slow
@pytest.mark.parametrize("size,seed", [(5, 4), (13, 0)])
def test_calibrate_with_distortion_matches_opencv_rms(size, seed, tmp_path):
    paths = sorted(CHESSBOARD.glob("left*.jpg"))
    pick = np.random.default_rng(seed).choice(len(paths), size, replace=False)
    r = _calibrate([paths[i] for i in sorted(pick)], tmp_path, "--distortion")
    assert abs(r["rms"] / r["opencv"]["rms"] - 1) < 1e-6


LENSES = {
    "barrel": ({"fx": 450.0, "fy": 455.0, "cx": 330.0, "cy": 230.0}, (-0.28, 0.09, 0.001, -0.0008, -0.01)),
    "pincushion": ({"fx": 800.0, "fy": 790.0, "cx": 310.0, "cy": 245.0}, (0.08, -0.05, 0.0, 0.0, 0.0)),
    "mild": ({"fx": 600.0, "fy": 600.0, "cx": 320.0, "cy": 240.0}, (-0.05, 0.01, 0.0005, 0.0005, 0.0)),
}


@pytest.mark.parametrize(
    "lens,count",
    [
        ("barrel", 12),
        pytest.param("pincushion", 8, marks=pytest.mark.slow),
        pytest.param("mild", 5, marks=pytest.mark.slow),
    ],
)
def test_calibrate_rendered_boards_through_lenses(lens, count, tmp_path):
    # Rendered through a known lens: with --distortion the RMS is OpenCV's; the pinhole fit of the
    # same (distorted) photographs finishes too.
    from bpnp.paper import synthetic_boards

    camera, coeffs = LENSES[lens]
    r = synthetic_boards.run_synthetic(
        str(tmp_path), count=count, seed=3, distortion=True, quiet=True, camera=camera, lens=coeffs
    )
    assert r["images_used"] == count
    assert abs(r["relative_to_opencv"]["rms"]) < 1e-6
    assert r["max_error_rel_to_truth"] < 5e-3
    pinhole = synthetic_boards.run_synthetic(
        str(tmp_path / "pinhole"), count=count, seed=3, quiet=True, camera=camera, lens=coeffs
    )
    assert max(abs(pinhole["relative_to_opencv"][k]) for k in ("fx", "fy", "cx", "cy")) < 1e-6


def _stated_default(text: str | None) -> str | None:
    import re

    found = re.search(r"\(default ([^)]+)\)", text or "")
    return found.group(1) if found else None


def test_the_defaults_that_help_states_are_the_ones_that_apply():
    """`bpnp train` leaves its options None so that --config can set them: its help must quote
    TrainConfig's defaults, and every other command's help the parser's own."""
    import argparse

    from bpnp.cli import build_parser
    from bpnp.pose.config import TrainConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    checked = []
    for command in ("render", "train", "evaluate", "score", "experiment"):
        for action in sub.choices[command]._actions:
            stated = _stated_default(action.help)
            if stated is None or stated.startswith("all"):
                continue
            actual = action.default
            if actual is None and command == "train":
                actual = getattr(TrainConfig(), action.dest)
            if actual is None:
                continue
            values = list(actual) if isinstance(actual, (list, tuple)) else [actual]
            words = stated.split()
            if all(isinstance(v, bool) for v in values):
                assert words == ["on" if v else "off" for v in values], (command, action.dest)
            elif all(isinstance(v, (int, float)) for v in values):
                assert [float(w) for w in words] == [float(v) for v in values], (command, action.dest)
            else:
                assert words == [str(v) for v in values], (command, action.dest)
            checked.append(f"{command} {action.dest}")
    assert {"train steps", "train lr", "train out", "experiment seeds", "render size"} <= set(checked), checked


def test_train_refuses_to_overwrite_a_run_and_evaluate_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    from bpnp.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("step,loss\n10,1.0\n")
    (tmp_path / "data").mkdir()
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a training run already" in err[0] and f"--resume {run}" in err[0]
    assert (run / "log.csv").read_text() == "step,loss\n10,1.0\n"
    bogus = tmp_path / "model.pt"
    bogus.write_text("not a checkpoint")
    assert main(["evaluate", "--checkpoint", str(bogus), "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a bpnp checkpoint" in err[0] and str(bogus) in err[0]
    assert not (tmp_path / "eval").exists()
