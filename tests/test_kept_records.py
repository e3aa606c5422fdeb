"""The analysis scripts of the kept object-pose records read what the runs measured."""

import importlib.util
import json
from pathlib import Path

import pytest

QUICK = Path(__file__).resolve().parents[1] / "results" / "objpose_quick"


def _load(name: str):
    # The script puts its own folder on sys.path for its sibling ``balance``.
    spec = importlib.util.spec_from_file_location(f"kept_{name}", QUICK / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (QUICK / "weight_head.py").is_file(), reason="results/objpose_quick not in this tree")
def test_weight_head_differences_are_those_of_the_runs_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    weight_head = _load("weight_head")
    found = weight_head.collect()
    setting = "reprojection loss, weight head"
    for mesh in weight_head.MESHES:
        by_seed = found[mesh][setting]
        assert len(by_seed) >= 3, mesh
        for seed, run in by_seed.items():
            assert run["shared_warmup"], (mesh, seed)
            metrics = [
                json.loads((QUICK / mesh / folder / "eval" / "metrics.json").read_text())
                for folder in (f"bpnp-weight-head_seed{seed}", run["baseline"])
            ]
            # The per-image differences average to the difference of the runs' own summaries.
            for col, key in (("proj", "proj2d_5px"), ("add01", "add_or_adds_0.1d")):
                expected = 100.0 * (metrics[0][key] - metrics[1][key])
                assert run["diffs"][col].mean() == pytest.approx(expected, abs=1e-9), (mesh, seed, col)
            assert run["diffs"]["proj"].shape == (metrics[0]["images"],)
    table = weight_head.table(found)
    assert table.count("| **all** |") == sum(len(s) for s in found.values() if s)
    weight_head.figure(found, tmp_path / "weight_head.png")
    assert (tmp_path / "weight_head.png").stat().st_size > 10_000
