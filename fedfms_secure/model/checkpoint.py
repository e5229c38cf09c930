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
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ModelError(
            f"checkpoint {path} holds non-tensor values under {not_tensors[:3]} "
            f"({len(not_tensors)} keys); expected a SAM state dict of tensors (an official "
            "sam_vit_*.pth or a file from save_sam_checkpoint)"
        )
    own = model.sam.state_dict()
    adapters = adapter_parameter_names(model.sam)
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - adapters)
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if wrong and not unexpected and not missing and set(wrong) <= adapters:
        raise ModelError(
            f"checkpoint {path} has adapters of other shapes than this model ({len(wrong)} "
            f"mis-shaped adapter keys, e.g. {wrong[:3]}{_ratio_hint(state, own, wrong)}); build "
            "the model with the adapter_ratio the checkpoint was saved with"
        )
    if unexpected or missing or wrong:
        detail = (unexpected or missing or wrong)[:3]
        raise ModelError(
            f"checkpoint {path} does not match preset {model.preset.name!r} "
            f"({len(unexpected)} unexpected, {len(missing)} missing, {len(wrong)} mis-shaped "
            f"keys, e.g. {detail}); pick the preset the checkpoint was made for"
        )
    model.sam.load_state_dict(state, strict=False)


def _ratio_hint(state: dict, own: dict, wrong: list[str]) -> str:
    """Both adapter ratios, read from a mis-shaped ``down.weight`` (``""`` if none is)."""
    for key in wrong:
        if key.endswith(".down.weight") and state[key].dim() == 2:
            hidden, dim = state[key].shape
            return (f"; this model has adapter_ratio about {own[key].shape[0] / dim:.3g}, the "
                    f"checkpoint about {hidden / dim:.3g}")  # fmt: skip
    return ""


def save_sam_checkpoint(model: SamSegmenter, path: str | Path) -> None:
    """Save ``model.sam``'s weights (adapters included) in the official checkpoint format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.sam.state_dict(), path)


__all__ = ["load_sam_checkpoint", "save_sam_checkpoint"]
