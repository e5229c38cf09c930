"""What trains and what travels, per federated mode: the freezing rules live here only.

* ``fedmsa`` (FedMSA): every Medical SAM Adapter and the mask decoder.
* ``fedsam`` (FedSAM): the whole model.

In both modes some parameters stay frozen at their initial (pretrained) values, because Opacus
cannot give them a correct or affordable per-sample gradient in this prompt-free setup:

* prompt embeddings read through ``.weight`` or never used without prompts: the whole prompt
  encoder (``point_embeddings``, ``not_a_point_embed``, ``no_mask_embed``, ``mask_downscaling``);
* the decoder's ``iou_token`` and ``mask_tokens`` (read through ``.weight``);
* heads the single-mask, IoU-free loss never reaches: ``iou_prediction_head`` and the
  hypernetwork MLPs of mask tokens 1..3;
* positional tables ``pos_embed`` and ``rel_pos_h``/``rel_pos_w`` (a trainable one makes Opacus
  re-run the whole encoder or attention per sample, and ``rel_pos`` would bypass its hooks).

The same rules hold with and without DP, so the communicated vector of a mode never changes.
"""

from __future__ import annotations

from fedfms_secure.errors import ModelError
from fedfms_secure.model.adapters import adapter_parameter_names
from fedfms_secure.model.segmenter import SamSegmenter

MODES: tuple[str, ...] = ("fedmsa", "fedsam")

_FROZEN_PREFIXES: tuple[str, ...] = (
    "sam.prompt_encoder.",
    "sam.mask_decoder.iou_token.",
    "sam.mask_decoder.mask_tokens.",
    "sam.mask_decoder.iou_prediction_head.",
)
_FROZEN_SUFFIXES: tuple[str, ...] = ("pos_embed", "rel_pos_h", "rel_pos_w")
_DECODER_PREFIX = "sam.mask_decoder."
_FIRST_HYPERNET = "sam.mask_decoder.output_hypernetworks_mlps.0."
_HYPERNETS = "sam.mask_decoder.output_hypernetworks_mlps."


def always_frozen(name: str) -> bool:
    """True for a parameter that no mode trains (see the module docstring for why)."""
    if name.startswith(_FROZEN_PREFIXES) or name.endswith(_FROZEN_SUFFIXES):
        return True
    return name.startswith(_HYPERNETS) and not name.startswith(_FIRST_HYPERNET)


def apply_mode(model: SamSegmenter, mode: str) -> list[str]:
    """Set ``requires_grad`` for ``mode`` and return the names that train and travel, in order.

    The order is ``model.named_parameters()`` order, the same on every site.
    """
    if mode not in MODES:
        raise ModelError(f"unknown training mode {mode!r}; choose one of: {', '.join(MODES)}")
    adapters = adapter_parameter_names(model)
    names: list[str] = []
    for name, param in model.named_parameters():
        if mode == "fedsam":
            trains = True
        else:
            trains = name in adapters or name.startswith(_DECODER_PREFIX)
        trains = trains and not always_frozen(name)
        param.requires_grad_(trains)
        if trains:
            names.append(name)
    return names


__all__ = ["MODES", "always_frozen", "apply_mode"]
