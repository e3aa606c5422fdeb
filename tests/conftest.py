import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("BPNP_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or BPNP_RUNSLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["torch", "native"])
def backend(request):
    """Both forward solvers: the batched torch one and the compiled CPU one."""
    if request.param == "native":
        from bpnp.solvers.native import native_available, native_unavailable_reason

        if not native_available():
            pytest.skip(f"native solver: {native_unavailable_reason()}")
    return request.param


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Every test that takes it runs on the CPU and, where one is present, on a CUDA GPU."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)
