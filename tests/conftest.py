"""Test fixtures shared by the whole suite.

Every test starts from an empty Pyro parameter store and a fixed seed, so tests are independent of their order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def float64_default():
    """Make float64 torch's default dtype for one test (unit tests of numerics), restoring it afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def shared_directory() -> Path | None:
    """Locate the shared data folder: ``$PPVI_SHARED``, else ``../shared`` beside the repository root."""
    candidate = os.environ.get("PPVI_SHARED")
    path = Path(candidate) if candidate else Path(__file__).resolve().parents[1].parent / "shared"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared data folder; tests that need it skip, saying why, only when it is absent."""
    path = shared_directory()
    if path is None:
        pytest.skip("shared data folder not found: set PPVI_SHARED or place it at ../shared beside the repo")
    return path
