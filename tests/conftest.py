"""Shared test configuration: GPU tests skip cleanly on machines without CUDA."""
import os
from pathlib import Path

import pytest

# Helpers that assert for several test modules: their failures show the values compared too.
pytest.register_assert_rewrite("tests.run_metrics")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# One thread per process: on 2 cores, more threads per rank make multi-rank tests far slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
