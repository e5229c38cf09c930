"""Where torch runs: one resolver for every ``--device`` (client, demo, train, evaluate, predict,
benchmarks).

``auto`` takes the first CUDA GPU when torch sees one, else the CPU; ``cpu``, ``cuda`` and
``cuda:N`` name one. Only the model, DP-SGD and evaluation run there: the communicated vector, its
CKKS encoding and everything on the wire stay on the CPU.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from fedfms_secure.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "where the model trains and evaluates: auto (a CUDA GPU when present), cpu, cuda or cuda:N"
_PATTERN = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def check_device_spec(spec: str) -> str:
    """The normalised ``spec`` if it is well formed (without importing torch), else ConfigError."""
    normal = (spec or "auto").strip().lower()
    if not _PATTERN.fullmatch(normal):
        raise ConfigError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    return normal


def resolve_device(spec: str) -> "torch.device":
    """``auto`` (CUDA when ``torch.cuda.is_available()``, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``; ConfigError if the device is malformed or absent."""
    import torch

    spec = check_device_spec(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asked for, but torch sees no CUDA GPU here; use --device cpu or auto")
    match = _PATTERN.fullmatch(spec)
    assert match is not None
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


__all__ = ["DEVICE_HELP", "check_device_spec", "resolve_device"]
