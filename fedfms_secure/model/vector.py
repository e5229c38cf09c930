"""The communicated vector: named parameters flattened to one float32 array, and back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedfms_secure.errors import ModelError


def _lookup(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ModelError(
            f"model has no parameter(s) {missing[:3]}{'...' if len(missing) > 3 else ''}; "
            "build the model with the same preset and mode on every site"
        )
    return [params[n] for n in names]


def vector_length(model: nn.Module, names: Sequence[str]) -> int:
    """Number of values :func:`flatten` returns for ``names``."""
    return sum(p.numel() for p in _lookup(model, names))


def flatten(model: nn.Module, names: Sequence[str]) -> np.ndarray:
    """The parameters ``names`` as one float32 1-D array, concatenated in the given order."""
    params = _lookup(model, names)
    if not params:
        return np.zeros(0, dtype=np.float32)
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).to(torch.float32).cpu() for p in params])
    return flat.numpy().copy()


def load_vector(model: nn.Module, names: Sequence[str], vec: np.ndarray) -> None:
    """Write ``vec`` (as made by :func:`flatten` with the same ``names``) into ``model``."""
    params = _lookup(model, names)
    arr = np.asarray(vec)
    expected = sum(p.numel() for p in params)
    if arr.ndim != 1 or arr.size != expected:
        raise ModelError(
            f"parameter vector has shape {arr.shape}, expected ({expected},) for {len(names)} "
            "parameters; the sender used another preset, mode or adapter ratio"
        )
    if not np.all(np.isfinite(arr)):
        raise ModelError("parameter vector contains NaN or infinite values; refusing to load it")
    source = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(source[offset : offset + n].view_as(p).to(p.dtype))
            offset += n


__all__ = ["flatten", "load_vector", "vector_length"]
