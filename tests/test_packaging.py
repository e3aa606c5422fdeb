"""The native solver is built with the package: a wheel runs it on a machine without a compiler,
and a source install without a compiler runs the torch solver and says so."""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys, warnings, torch, bpnp
from bpnp.synthetic import random_problems
print("file", bpnp.__file__)
p = random_problems(16, 10, seed=0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    res = bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights)
    bpnp.solve_pnp(p.x2d, p.x3d, p.K, p.weights)
print("backend", res.backend, bool(res.converged.all()))
print("warnings", sum(issubclass(w.category, bpnp.NativeSolverWarning) for w in caught))
for w in caught:
    print("warning", w.message)
"""


def _run(cmd, **env):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **env}, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def _source_copy(tmp_path: Path) -> Path:
    """The project's sources without build products (a fresh checkout, as CI has)."""
    dest = tmp_path / "src-copy"
    shutil.copytree(
        ROOT,
        dest,
        ignore=shutil.ignore_patterns(
            ".git",
            "build",
            "dist",
            "*.egg-info",
            "*.so",
            "__pycache__",
            ".pytest_cache",
            "runs",
            "third_party",
            ".venv",
        ),
    )
    return dest


def _venv(path: Path) -> Path:
    # System site-packages give it torch and numpy without a download; the package installed into
    # the venv shadows the developer's editable install (checked through bpnp.__file__).
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(path)
    return path / "bin" / "python"


def _probe(python: Path, venv_dir: Path) -> dict:
    # PATH without any compiler: only the venv's bin.
    out = _run([str(python), "-c", PROBE], PATH=str(venv_dir / "bin"), CC="/no/such/cc")
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines() if " " in line)
    assert lines["file"].startswith(str(venv_dir)), lines["file"]
    return {"lines": lines, "out": out}


pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")]


def test_wheel_runs_native_without_compiler(tmp_path):
    wheels = tmp_path / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(_source_copy(tmp_path)),
        ]
    )
    (wheel,) = wheels.glob("bpnp-*.whl")
    assert "linux" in wheel.name or "macosx" in wheel.name, f"not a platform wheel: {wheel.name}"
    env_dir = tmp_path / "env"
    python = _venv(env_dir)
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)])
    got = _probe(python, env_dir)
    assert got["lines"]["backend"] == "native True", got["out"]
    assert got["lines"]["warnings"] == "0", got["out"]


def test_source_install_without_compiler_falls_back_and_says_so(tmp_path):
    env_dir = tmp_path / "env"
    python = _venv(env_dir)
    # The build sees no compiler: the optional extensions are skipped, the install succeeds.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-build-isolation",
            str(_source_copy(tmp_path)),
        ],
        CC="/no/such/cc",
        LDSHARED="/no/such/cc -shared",
    )
    got = _probe(python, env_dir)
    assert got["lines"]["backend"] == "torch True", got["out"]
    assert got["lines"]["warnings"] == "1", got["out"]  # once per process, naming the cause
    assert "not built" in got["lines"]["warning"], got["out"]
