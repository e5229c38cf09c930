"""What trains and what travels, per federated mode: the one place where that is decided.

What travels is each method's model as FedFMS defines it; what trains is the part of it that the
forward pass reaches (only a reached parameter can change):

=========  ===========================================  ===========================================
mode       travels (the communicated vector)            trains
=========  ===========================================  ===========================================
``fedsam`` all of SAM (FedSAM is plain SAM; the         all of SAM that the forward reaches: the
           adapters stay at their identity start and    whole image encoder (``pos_embed`` and
           neither train nor travel)                    ``rel_pos_*`` included), the used prompt
                                                        embeddings, the used mask decoder
``fedmsa`` every Medical SAM Adapter and the whole      every adapter and the used mask decoder;
           mask decoder                                 image and prompt encoders stay frozen
=========  ===========================================  ===========================================

A travelling parameter that does not train always sends a zero delta (about 0.43M of vit_b's
93.7M in FedSAM: the unused prompt embeddings and hypernetworks), which keeps the communicated
vector, and so its cost, that of the method's definition. Never reached, so frozen in both modes:

* the hypernetwork MLPs of mask tokens ``K..3`` for a model with ``K`` classes (token ``k``
  serves class ``k``);
* the prompt encoder's point embeddings 0/1 and ``not_a_point_embed`` (click prompts) and
  ``mask_downscaling`` (mask prompts), which no prompt used here reaches; the box-corner
  embeddings (point embeddings 2/3) unless the model takes box prompts (``prompt="box"``).

Opacus gives every trainable parameter a per-sample gradient: embeddings are read through their
modules (:class:`~fedfms_secure.model.segmenter.SamSegmenter`), positional tables through
batch-first modules (:mod:`fedfms_secure.model.encoder`), and the IoU head trains on the predicted
masks' true IoU (:func:`~fedfms_secure.train.losses.segmentation_loss`). The same rules hold with
and without DP, so a mode's communicated vector never changes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedfms_secure.errors import ModelError
from fedfms_secure.model.adapters import adapter_parameter_names
from fedfms_secure.model.segmenter import SamSegmenter

MODES: tuple[str, ...] = ("fedmsa", "fedsam")

_DECODER = "sam.mask_decoder."
_HYPERNETS = "sam.mask_decoder.output_hypernetworks_mlps."
_PROMPT = "sam.prompt_encoder."
_NO_MASK = "sam.prompt_encoder.no_mask_embed."
_BOX_CORNERS = ("sam.prompt_encoder.point_embeddings.2.", "sam.prompt_encoder.point_embeddings.3.")


def unreached(model: SamSegmenter, name: str) -> bool:
    """True for a parameter that the configured forward never uses (no mode trains it)."""
    if name.startswith(_HYPERNETS):
        token = int(name[len(_HYPERNETS) :].split(".", 1)[0])
        return token >= model.num_classes
    if name.startswith(_PROMPT):
        if name.startswith(_NO_MASK):
            return False
        return not (model.prompt == "box" and name.startswith(_BOX_CORNERS))
    return False


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ModelError(f"unknown training mode {mode!r}; choose one of: {', '.join(MODES)}")


def mode_parameters(model: SamSegmenter, mode: str) -> list[str]:
    """Names of the parameters that travel in ``mode``, in ``named_parameters`` order."""
    _check_mode(mode)
    adapters = adapter_parameter_names(model)
    names = []
    for name, _ in model.named_parameters():
        if mode == "fedsam":
            inside = name not in adapters
        else:
            inside = name in adapters or name.startswith(_DECODER)
        if inside:
            names.append(name)
    return names


def trained_parameters(model: SamSegmenter, mode: str) -> list[str]:
    """Names of the parameters that train in ``mode``: those that travel and the forward reaches."""
    return [name for name in mode_parameters(model, mode) if not unreached(model, name)]


def apply_mode(model: SamSegmenter, mode: str) -> list[str]:
    """Set ``requires_grad`` for ``mode`` and return the names that travel, in order.

    The order is ``model.named_parameters()`` order, the same on every site.
    """
    chosen = set(trained_parameters(model, mode))
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return mode_parameters(model, mode)


def mode_summary(model: SamSegmenter, mode: str) -> dict[str, Any]:
    """Parameter counts of ``model`` in ``mode``: ``total`` (adapters included), ``trainable``,
    ``communicated`` (values that travel per round), ``adapter`` and ``bytes_fp32`` (the
    communicated values as float32). Does not change ``requires_grad``."""
    adapters = adapter_parameter_names(model)
    params = dict(model.named_parameters())
    communicated = sum(params[n].numel() for n in mode_parameters(model, mode))
    return {
        "total": sum(p.numel() for p in params.values()),
        "trainable": sum(params[n].numel() for n in trained_parameters(model, mode)),
        "communicated": communicated,
        "adapter": sum(params[n].numel() for n in adapters),
        "bytes_fp32": 4 * communicated,
    }


def sam_parameter_count(model: nn.Module) -> int:
    """Parameters of SAM itself (everything but the adapters)."""
    adapters = adapter_parameter_names(model)
    return sum(p.numel() for n, p in model.named_parameters() if n not in adapters)


__all__ = ["MODES", "apply_mode", "mode_parameters", "mode_summary", "sam_parameter_count",
           "trained_parameters", "unreached"]  # fmt: skip
