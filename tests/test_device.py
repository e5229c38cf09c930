"""One resolver for every --device: auto takes CUDA when present; a missing GPU is a clear error."""

from __future__ import annotations

import pytest
import torch

from fedfms_secure.device import check_device_spec, resolve_device
from fedfms_secure.errors import ConfigError


def test_auto_and_cpu() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("").type == resolve_device("auto").type
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda:a", "cpu:0", "mps"])
def test_a_malformed_device_says_what_is_allowed(spec: str) -> None:
    with pytest.raises(ConfigError, match="auto, cpu, cuda, cuda:N"):
        check_device_spec(spec)
    with pytest.raises(ConfigError, match="auto, cpu, cuda, cuda:N"):
        resolve_device(spec)


def test_cuda_without_a_gpu_or_past_the_last_index() -> None:
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        assert resolve_device("cuda") == torch.device("cuda", 0)
        assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
        with pytest.raises(ConfigError, match=f"only {count} CUDA device"):
            resolve_device(f"cuda:{count}")
    else:
        for spec in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(ConfigError, match="no CUDA GPU here; use --device cpu or auto"):
                resolve_device(spec)
