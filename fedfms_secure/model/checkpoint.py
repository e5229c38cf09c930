"""Loading and saving SAM weights in the official ``sam_vit_*.pth`` format.

An official checkpoint is a plain ``Sam.state_dict()``. Because :class:`MSABlock` keeps each
block's submodules under their original names, it loads into an adapted model unchanged; only
the adapter keys are missing (they keep their seeded initialisation). A file written by
:func:`save_sam_checkpoint` is the same format plus the adapter keys.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedfms_secure.errors import ModelError
from fedfms_secure.model.adapters import adapter_parameter_names
from fedfms_secure.model.segmenter import SamSegmenter


def load_sam_checkpoint(model: SamSegmenter, path: str | Path) -> None:
    """Load an official SAM checkpoint (or one saved here) for the same preset into ``model``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"SAM checkpoint {path} does not exist; pass the path of a sam_vit_*.pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a corrupt or foreign file
        raise ModelError(f"cannot read SAM checkpoint {path}: {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict; expected an official SAM .pth")
    own = model.sam.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - adapter_parameter_names(model.sam))
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if unexpected or missing or wrong:
        detail = (unexpected or missing or wrong)[:3]
        raise ModelError(
            f"checkpoint {path} does not match preset {model.preset.name!r} "
            f"({len(unexpected)} unexpected, {len(missing)} missing, {len(wrong)} mis-shaped "
            f"keys, e.g. {detail}); pick the preset the checkpoint was made for"
        )
    model.sam.load_state_dict(state, strict=False)


def save_sam_checkpoint(model: SamSegmenter, path: str | Path) -> None:
    """Save ``model.sam``'s weights (adapters included) in the official checkpoint format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.sam.state_dict(), path)


__all__ = ["load_sam_checkpoint", "save_sam_checkpoint"]
