"""Shared test helpers: the GPU skip rule. (The real-data location is conftest_data.REAL_DATA.)"""
import os

import pytest

from minicnn.backend import gpu_status


def require_gpu():
    """Skip (with the reason) when no GPU works; fail instead when MINICNN_REQUIRE_GPU=1."""
    usable, reason = gpu_status()
    if usable:
        return
    if os.environ.get("MINICNN_REQUIRE_GPU") == "1":
        pytest.fail(f"MINICNN_REQUIRE_GPU=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def gpu():
    """Use in a test's arguments to run it only where CuPy has a working GPU."""
    require_gpu()
    import cupy
    return cupy
