"""The repository holds code, docs and summaries; run records live in ``runs/`` (ignored)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("src/", "tests/", "docs/")
LIMIT_BYTES = 5_000_000  # 5 MB, decimal: the figure


def _tracked() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def test_tracked_records_stay_small():
    records = [
        p for p in _tracked() if not p.startswith(CODE_DIRS) and not (p.startswith("benchmarks/") and p.endswith(".py"))
    ]
    size = sum((ROOT / p).stat().st_size for p in records if (ROOT / p).is_file())
    assert size <= LIMIT_BYTES, f"{size / 1e6:.2f} MB of tracked non-code (limit 5 MB): records belong in runs/"


def test_no_run_folders_are_tracked():
    # A run folder is what `bpnp train` writes: its config beside a training summary.
    tracked = set(_tracked())
    runs = sorted(p for p in tracked if p.endswith("/train_summary.json") or p.endswith("/per_image.npz"))
    assert not runs, f"run records tracked: {runs[:3]}"


def test_library_and_tests_do_not_read_results():
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("src", "tests")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "test_layout.py" and ('"results"' in path.read_text() or "results/objpose" in path.read_text())
    ]
    assert not offenders, offenders


def test_the_readme_and_the_guide_stay_short():
    # What it is, the two commands, an example, a table each, links: the findings live in docs/results.md.
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    assert len((ROOT / "docs" / "objpose.md").read_text().splitlines()) <= 300
    assert (ROOT / "docs" / "results.md").is_file()
