"""SAM with Medical SAM Adapters: builders, freezing rules per mode, the communicated vector."""

from __future__ import annotations

from fedfms_secure.model.adapters import Adapter, MSABlock
from fedfms_secure.model.checkpoint import load_sam_checkpoint, save_sam_checkpoint
from fedfms_secure.model.modes import MODES, apply_mode
from fedfms_secure.model.registry import PRESETS, SamPreset, build_model, build_sam, get_preset
from fedfms_secure.model.segmenter import SamSegmenter
from fedfms_secure.model.vector import flatten, load_vector, vector_length

__all__ = [
    "MODES",
    "PRESETS",
    "Adapter",
    "MSABlock",
    "SamPreset",
    "SamSegmenter",
    "apply_mode",
    "build_model",
    "build_sam",
    "flatten",
    "get_preset",
    "load_sam_checkpoint",
    "load_vector",
    "save_sam_checkpoint",
    "vector_length",
]
