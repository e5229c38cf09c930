"""A tiny, easy segmentation task: bright noisy ellipses on a darker noisy background."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch.utils.data import TensorDataset

from fedfms_secure.data.synth import ellipses as synth_ellipses


@pytest.fixture
def ellipses() -> Callable[..., TensorDataset]:
    """Factory: ``ellipses(n, size=64, seed=0)``."""
    return synth_ellipses
