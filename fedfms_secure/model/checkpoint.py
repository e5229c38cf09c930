"""Loading and saving SAM weights in the official ``sam_vit_*.pth`` format.

An official checkpoint is a plain ``Sam.state_dict()``. The adapted model keeps every SAM key
(blocks keep their submodules' names; the routed positional tables are renamed back by state-dict
hooks), so an official file loads unchanged; only the adapter keys are missing, and they keep
their seeded initialisation (reported in the returned :class:`LoadReport` and logged). A file
written by :func:`save_sam_checkpoint` is the same format plus the adapter keys.

A checkpoint made for another input size loads too: ``pos_embed`` ``[1, H, W, C]`` is resized
bicubically to the model's grid and each ``rel_pos_h``/``rel_pos_w`` table ``[2S - 1, d]`` is
resized linearly (as segment_anything's ``get_rel_pos`` resizes them), e.g. the official vit_b
1024-px weights into a 256-px model (``build_model("vit_b", img_size=256, checkpoint=...)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fedfms_secure.errors import ModelError
from fedfms_secure.model.adapters import adapter_parameter_names
from fedfms_secure.model.segmenter import SamSegmenter

log = logging.getLogger("fedfms_secure.model")


@dataclass
class LoadReport:
    """What :func:`load_sam_checkpoint` did beyond copying tensors."""

    path: Path
    missing_adapters: list[str] = field(default_factory=list)  # kept their seeded initialisation
    resized: list[str] = field(default_factory=list)  # positional tables resized to this model


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"SAM checkpoint {path} does not exist; pass the path of a sam_vit_*.pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a corrupt or foreign file
        raise ModelError(
            f"cannot read SAM checkpoint {path}: {exc}; it is not a PyTorch weights file (expected "
            "an official sam_vit_*.pth or a file from save_sam_checkpoint)"
        ) from exc
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
    return state


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[1, H, W, C]`` -> ``[1, grid[0], grid[1], C]``, bicubic (as SAM variants at other sizes)."""
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(), size=grid, mode="bicubic",
                            align_corners=False)  # fmt: skip
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """``[L, d]`` -> ``[length, d]``, linear (as segment_anything's ``get_rel_pos``)."""
    resized = F.interpolate(table.float().t().unsqueeze(0), size=length, mode="linear")
    return resized.squeeze(0).t().to(table.dtype)


def _resizable(key: str, theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    if key.endswith("pos_embed"):
        return theirs.dim() == ours.dim() == 4 and theirs.shape[::3] == ours.shape[::3]
    if key.endswith(("rel_pos_h", "rel_pos_w")):
        return theirs.dim() == ours.dim() == 2 and theirs.shape[1] == ours.shape[1]
    return False


def load_sam_checkpoint(model: SamSegmenter, path: str | Path) -> LoadReport:
    """Load an official SAM checkpoint (or one saved here) for the same preset into ``model``.

    Returns a :class:`LoadReport`: adapter keys the file lacks (they keep their seeded
    initialisation) and positional tables resized to the model's input size. Raises
    :class:`ModelError` naming the file and the offending keys (with both shapes) otherwise.
    """
    path = Path(path)
    state = dict(_read_state(path))
    own = model.sam.state_dict()
    adapters = adapter_parameter_names(model.sam)
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - adapters)
    report = LoadReport(path=path, missing_adapters=sorted(adapters - set(state)))
    wrong = []
    for key in sorted(k for k in state if k in own and state[k].shape != own[k].shape):
        if _resizable(key, state[key], own[key]):
            if key.endswith("pos_embed"):
                state[key] = resize_pos_embed(state[key], tuple(own[key].shape[1:3]))
            else:
                state[key] = resize_rel_pos(state[key], own[key].shape[0])
            report.resized.append(key)
        else:
            wrong.append(key)
    shapes = "; ".join(
        f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in wrong[:3]
    )
    if wrong and not unexpected and not missing and set(wrong) <= adapters:
        raise ModelError(
            f"checkpoint {path} has adapters of other shapes than this model ({len(wrong)} "
            f"mis-shaped adapter keys, e.g. {shapes}{_ratio_hint(state, own, wrong)}); build "
            "the model with the adapter_ratio the checkpoint was saved with"
        )
    if unexpected or missing or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} mis-shaped ({shapes})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        raise ModelError(
            f"checkpoint {path} does not match preset {model.preset.name!r}: keys "
            f"{'; '.join(parts)}; pick the preset the checkpoint was made for"
        )
    model.sam.load_state_dict(state, strict=False)
    if report.missing_adapters:
        log.info(
            "checkpoint %s has no adapter weights: %d adapter tensors keep their seeded "
            "initialisation", path, len(report.missing_adapters),
        )  # fmt: skip
    if report.resized:
        log.info("checkpoint %s: resized %s to the model's input size %d", path,
                 ", ".join(report.resized), model.preset.img_size)  # fmt: skip
    return report


def _ratio_hint(state: dict, own: dict, wrong: list[str]) -> str:
    """Both adapter ratios, read from a mis-shaped ``down.weight`` (``""`` if none is)."""
    for key in wrong:
        if key.endswith(".down.weight") and state[key].dim() == 2:
            hidden, dim = state[key].shape
            return (f"; this model has adapter_ratio about {own[key].shape[0] / dim:.3g}, the "
                    f"checkpoint about {hidden / dim:.3g}")  # fmt: skip
    return ""


def save_sam_checkpoint(model: SamSegmenter, path: str | Path, *, adapters: bool = True) -> None:
    """Save ``model.sam``'s weights in the official checkpoint format (``adapters=False``: SAM's
    keys only, exactly what an official ``sam_vit_*.pth`` holds)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.sam.state_dict()
    if not adapters:
        skip = adapter_parameter_names(model.sam)
        state = {k: v for k, v in state.items() if k not in skip}
    torch.save(state, path)


__all__ = ["LoadReport", "load_sam_checkpoint", "resize_pos_embed", "resize_rel_pos",
           "save_sam_checkpoint"]  # fmt: skip
