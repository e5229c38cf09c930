"""What trains and travels per mode."""

from __future__ import annotations

import pytest

from fedfms_secure.errors import ModelError
from fedfms_secure.model import MODES, apply_mode, build_model
from fedfms_secure.model.adapters import adapter_parameter_names

NEVER_TRAINED = (
    "sam.mask_decoder.iou_token.weight",
    "sam.mask_decoder.mask_tokens.weight",
    "sam.prompt_encoder.no_mask_embed.weight",
    "sam.prompt_encoder.not_a_point_embed.weight",
    "sam.prompt_encoder.point_embeddings.0.weight",
    "sam.mask_decoder.iou_prediction_head.layers.0.weight",
    "sam.mask_decoder.output_hypernetworks_mlps.1.layers.0.weight",
    "sam.image_encoder.pos_embed",
    "sam.image_encoder.blocks.0.attn.rel_pos_h",
)


def _trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_fedmsa_trains_only_adapters_and_the_mask_decoder() -> None:
    model = build_model()
    names = apply_mode(model, "fedmsa")
    assert names == _trainable(model)  # returned in named_parameters order, == requires_grad
    adapters = adapter_parameter_names(model)
    assert adapters <= set(names)
    others = [n for n in names if n not in adapters]
    assert others and all(n.startswith("sam.mask_decoder.") for n in others)
    assert "sam.mask_decoder.output_upscaling.0.weight" in names
    assert "sam.mask_decoder.output_hypernetworks_mlps.0.layers.0.weight" in names
    assert not any(n.startswith("sam.image_encoder.") and n not in adapters for n in names)


def test_fedsam_trains_more_including_the_encoder() -> None:
    model = build_model()
    msa = set(apply_mode(model, "fedmsa"))
    sam = apply_mode(model, "fedsam")
    assert msa < set(sam)
    assert "sam.image_encoder.blocks.0.attn.qkv.weight" in sam
    assert "sam.image_encoder.patch_embed.proj.weight" in sam
    assert "sam.image_encoder.neck.0.weight" in sam


@pytest.mark.parametrize("mode", MODES)
def test_parameters_without_per_sample_gradient_stay_frozen(mode: str) -> None:
    model = build_model()
    names = set(apply_mode(model, mode))
    params = dict(model.named_parameters())
    for name in NEVER_TRAINED:
        assert name in params, name
        assert name not in names and not params[name].requires_grad, name
    assert not any(n.startswith("sam.prompt_encoder.") for n in names)


def test_switching_mode_back_restores_the_same_set() -> None:
    model = build_model()
    first = apply_mode(model, "fedmsa")
    apply_mode(model, "fedsam")
    assert apply_mode(model, "fedmsa") == first
    assert _trainable(model) == first


def test_unknown_mode_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="fedmsa, fedsam"):
        apply_mode(build_model(), "fedavg")
