"""With ``pip install .`` alone (no extras) every command works or says in one line which extra
it needs: run in a child process whose imports of the optional packages fail."""

import subprocess
import sys
from pathlib import Path

import pytest

SPOT = Path(__file__).resolve().parents[1] / "src" / "bpnp" / "data" / "spot" / "spot_triangulated.obj"

HIDE = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"matplotlib", "cv2", "tqdm", "moderngl", "glcontext", "trimesh", "scipy", "PIL"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hide())
from bpnp.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "argv,extra",
    [
        (["calibrate", "--out", "{tmp}/calib", "--quiet"], "demo"),
        (["demo", "sfm", "--out", "{tmp}/sfm", "--quiet"], "demo"),
        (["demo", "calib", "--out", "{tmp}/calib", "--quiet"], "demo"),
        (["demo", "objpose", "--out", "{tmp}/objpose", "--quiet"], "demo"),
        (["render", "--mesh", str(SPOT), "--out", "{tmp}/render", "--count", "2", "--quiet"], "pose"),
        (["experiment", "--meshes", str(SPOT), "--out", "{tmp}/exp", "--quiet"], "pose"),
    ],
)
def test_a_command_without_its_extra_names_the_extra(tmp_path, argv, extra):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = subprocess.run([sys.executable, "-c", HIDE, *argv], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    if done.returncode == 0:  # works without the extra
        return
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and f"pip install 'bpnp[{extra}]'" in lines[0], done.stderr
