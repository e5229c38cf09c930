"""A tiny, easy segmentation task: bright noisy ellipses on a darker noisy background."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils.data import TensorDataset


def make_ellipses(n: int, size: int = 64, seed: int = 0) -> TensorDataset:
    """``n`` items ``(image [1,S,S] in [0,1], label [1,S,S] in {0,1})``, like the data layer."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        cy, cx = ((torch.rand(2, generator=gen) * 0.5 + 0.25) * size).tolist()
        ry, rx = ((torch.rand(2, generator=gen) * 0.15 + 0.12) * size).tolist()
        mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).float()
        noise = 0.1 * torch.randn(size, size, generator=gen)
        images.append((0.25 + noise + 0.5 * mask).clamp(0, 1))
        labels.append(mask)
    return TensorDataset(torch.stack(images)[:, None], torch.stack(labels)[:, None])


@pytest.fixture
def ellipses() -> Callable[..., TensorDataset]:
    """Factory: ``ellipses(n, size=64, seed=0)``."""
    return make_ellipses
