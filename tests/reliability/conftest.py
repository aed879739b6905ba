"""The data the reliability tests share: twenty points of the fake Gaussian."""

from __future__ import annotations

import pytest
import torch

from ppvi.models import fake_gaussian


@pytest.fixture(scope="module")
def y() -> torch.Tensor:
    return fake_gaussian.simulate(20).double()
