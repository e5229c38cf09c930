"""What trains and travels per mode, and the counts the summary command prints."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from fedfms_secure.errors import ModelError
from fedfms_secure.model import MODES, apply_mode, build_model, mode_summary
from fedfms_secure.model.adapters import adapter_parameter_names
from fedfms_secure.commands.model import register, summarize
from fedfms_secure.model.modes import sam_parameter_count, trained_parameters

UNREACHED = (  # no prompt-free single-class forward uses them: frozen and never sent, any mode
    "sam.prompt_encoder.point_embeddings.0.weight",
    "sam.prompt_encoder.point_embeddings.2.weight",
    "sam.prompt_encoder.not_a_point_embed.weight",
    "sam.prompt_encoder.mask_downscaling.0.weight",
    "sam.mask_decoder.output_hypernetworks_mlps.1.layers.0.weight",
    "sam.mask_decoder.output_hypernetworks_mlps.3.layers.2.bias",
)
ROUTED = (  # read through batch-first modules, so they train (FedSAM) under DP-SGD
    "sam.image_encoder.pos.pos_embed",
    "sam.image_encoder.blocks.0.attn.rel_pos.rel_pos_h",
    "sam.mask_decoder.iou_token.weight",
    "sam.mask_decoder.mask_tokens.weight",
    "sam.prompt_encoder.no_mask_embed.weight",
)
VIT_B_SAM = 93_735_472
VIT_B_ADAPTERS = 7_100_928
VIT_B_DECODER = 4_058_340
VIT_B_HYPERNET = 139_808  # one hypernetwork MLP (256 -> 256 -> 256 -> 32)
VIT_B_UNREACHED_PROMPT = 5_964  # point embeddings, not_a_point_embed, mask_downscaling


def _trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def tiny():
    return build_model(pretrained=False)


def test_fedmsa_sends_adapters_and_the_whole_mask_decoder_and_trains_what_is_reached(tiny) -> None:
    names = apply_mode(tiny, "fedmsa")
    adapters = adapter_parameter_names(tiny)
    decoder = [n for n, _ in tiny.named_parameters() if n.startswith("sam.mask_decoder.")]
    in_order = [n for n, _ in tiny.named_parameters() if n in adapters or n in decoder]
    assert names == in_order  # named_parameters order, the same on every site
    trained = _trainable(tiny)
    assert set(trained) <= set(names)
    assert set(names) - set(trained) == {n for n in decoder if n.startswith(UNREACHED_PREFIXES)}
    for name in ("sam.mask_decoder.iou_token.weight", "sam.mask_decoder.mask_tokens.weight",
                 "sam.mask_decoder.iou_prediction_head.layers.0.weight",
                 "sam.mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"):  # fmt: skip
        assert name in trained, name
    assert not any(n.startswith(("sam.image_encoder.", "sam.prompt_encoder.")) and n not in adapters
                   for n in names)  # fmt: skip


def test_fedsam_sends_all_of_sam_and_trains_what_is_reached(tiny) -> None:
    sam = apply_mode(tiny, "fedsam")
    trained = set(_trainable(tiny))
    adapters = adapter_parameter_names(tiny)
    params = dict(tiny.named_parameters())
    assert set(sam) == set(params) - adapters  # FedSAM is plain SAM: adapters stay the identity, unsent
    for name in ROUTED + ("sam.image_encoder.patch_embed.proj.weight",
                          "sam.image_encoder.neck.0.weight"):  # fmt: skip
        assert name in trained, name
    assert set(sam) - trained == {n for n in params if n.startswith(UNREACHED_PREFIXES)}


UNREACHED_PREFIXES = (
    "sam.prompt_encoder.point_embeddings.",
    "sam.prompt_encoder.not_a_point_embed.",
    "sam.prompt_encoder.mask_downscaling.",
    "sam.mask_decoder.output_hypernetworks_mlps.1.",
    "sam.mask_decoder.output_hypernetworks_mlps.2.",
    "sam.mask_decoder.output_hypernetworks_mlps.3.",
)


@pytest.mark.parametrize("mode", MODES)
def test_parameters_no_forward_reaches_stay_frozen(mode: str, tiny) -> None:
    apply_mode(tiny, mode)
    params = dict(tiny.named_parameters())
    for name in UNREACHED:
        assert name in params, name
        assert not params[name].requires_grad, name


def test_classes_and_box_prompts_widen_what_trains() -> None:
    model = build_model(pretrained=False, num_classes=3, prompt="box")
    sam = set(trained_parameters(model, "fedsam"))
    msa = set(trained_parameters(model, "fedmsa"))
    for k in (1, 2):
        assert f"sam.mask_decoder.output_hypernetworks_mlps.{k}.layers.0.weight" in msa
    assert "sam.mask_decoder.output_hypernetworks_mlps.3.layers.0.weight" not in msa | sam
    assert {"sam.prompt_encoder.point_embeddings.2.weight",
            "sam.prompt_encoder.point_embeddings.3.weight"} <= sam  # fmt: skip
    assert "sam.prompt_encoder.point_embeddings.0.weight" not in sam
    assert not any(n.startswith("sam.prompt_encoder.") for n in msa)


def test_switching_mode_back_restores_the_same_set(tiny) -> None:
    first = apply_mode(tiny, "fedmsa")
    trained = _trainable(tiny)
    apply_mode(tiny, "fedsam")
    assert apply_mode(tiny, "fedmsa") == first
    assert _trainable(tiny) == trained


def test_unknown_mode_is_a_model_error(tiny) -> None:
    with pytest.raises(ModelError, match="fedmsa, fedsam"):
        apply_mode(tiny, "fedavg")


def test_vit_b_counts() -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model("vit_b", pretrained=False)
    assert sam_parameter_count(model) == VIT_B_SAM
    decoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith("sam.mask_decoder."))
    assert decoder == VIT_B_DECODER
    msa = mode_summary(model, "fedmsa")
    sam = mode_summary(model, "fedsam")
    assert msa["adapter"] == sam["adapter"] == VIT_B_ADAPTERS
    assert msa["total"] == sam["total"] == VIT_B_SAM + VIT_B_ADAPTERS
    # FedMSA sends the adapters and the whole mask decoder (about 11.2M), FedSAM all of SAM
    assert msa["communicated"] == VIT_B_ADAPTERS + VIT_B_DECODER == 11_159_268
    assert sam["communicated"] == VIT_B_SAM
    # what trains leaves out the 3 hypernetworks single-class output never uses (and unused prompts)
    assert msa["trainable"] == VIT_B_ADAPTERS + VIT_B_DECODER - 3 * VIT_B_HYPERNET == 10_739_844
    assert sam["trainable"] == VIT_B_SAM - 3 * VIT_B_HYPERNET - VIT_B_UNREACHED_PROMPT
    for counts in (msa, sam):
        assert counts["bytes_fp32"] == 4 * counts["communicated"]
    with torch.device("meta"):  # with one class per mask token, all of the decoder travels
        four = build_model("vit_b", pretrained=False, num_classes=4)
    assert mode_summary(four, "fedmsa")["trainable"] == VIT_B_ADAPTERS + VIT_B_DECODER


def test_summary_command_prints_the_counts_as_json(capsys) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["model", "summary", "--preset", "vit_b", "--mode", "fedsam", "--json"])
    assert args.handler(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"total", "trainable", "communicated", "adapter", "bytes_fp32"}
    assert printed == summarize("vit_b", "fedsam")
    assert printed["adapter"] == VIT_B_ADAPTERS
    args = parser.parse_args(["model", "summary", "--preset", "vit_l", "--mode", "fedmsa"])
    assert args.handler(args) == 0
    assert "communicated" in capsys.readouterr().out
    args = parser.parse_args(["model", "summary", "--mode", "fedavg"])
    with pytest.raises(ModelError, match="fedavg.*fedmsa, fedsam"):
        args.handler(args)
    args = parser.parse_args(["model", "summary", "--preset", "vit_x"])
    with pytest.raises(ModelError, match="vit_x.*tiny"):
        args.handler(args)


def test_registering_the_command_group_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import argparse, sys; from fedfms_secure.commands.model import register; "
            "register(argparse.ArgumentParser().add_subparsers()); "
            "print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("preset", "sam_params"), [("vit_l", 312_342_832), ("vit_h", 641_090_608)])
def test_large_presets_count_on_meta(preset: str, sam_params: int) -> None:
    counts = summarize(preset, "fedsam")
    assert counts["total"] - counts["adapter"] == sam_params
