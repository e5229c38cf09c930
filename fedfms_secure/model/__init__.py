"""SAM with Medical SAM Adapters: builders, freezing rules per mode, the communicated vector.

Names are imported lazily (PEP 562), so ``fedfms_secure.commands.model`` can be imported to
register the CLI without importing torch.

It may import torch, ``segment_anything``, ``errors`` and the package's shipped weights; nothing
of the federation (``he``, ``keys``, ``transport``, ``server``, ``site``), so a model is built the
same way by a site, the baselines, prediction and the benchmarks.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Adapter": "adapters",
    "MSABlock": "adapters",
    "LoadReport": "checkpoint",
    "load_sam_checkpoint": "checkpoint",
    "save_sam_checkpoint": "checkpoint",
    "MODES": "modes",
    "apply_mode": "modes",
    "mode_parameters": "modes",
    "mode_summary": "modes",
    "boxes_from_labels": "prompts",
    "label_targets": "prompts",
    "PRESETS": "registry",
    "SamPreset": "registry",
    "build_model": "registry",
    "build_sam": "registry",
    "get_preset": "registry",
    "PROMPTS": "segmenter",
    "SamSegmenter": "segmenter",
    "flatten": "vector",
    "load_vector": "vector",
    "vector_length": "vector",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
