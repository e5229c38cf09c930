"""Presets, seeded building, parameter counts, adapters and checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition

from fedfms_secure.errors import ModelError
from fedfms_secure.model import (
    PRESETS,
    MSABlock,
    build_model,
    build_sam,
    load_sam_checkpoint,
    save_sam_checkpoint,
)
from fedfms_secure.model.adapters import adapter_parameter_names


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_gives_identical_parameters_and_other_seed_does_not() -> None:
    a, b, c = build_model(seed=3, pretrained=False), build_model(seed=3, pretrained=False), build_model(seed=4, pretrained=False)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_build_leaves_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ModelError, match="tiny.*vit_b|vit_b.*tiny"):
        build_model("vit_x")


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_presets_build_what_segment_anything_builds(name: str) -> None:
    with torch.device("meta"):  # shapes only
        ours = build_sam(PRESETS[name]).state_dict()
        theirs = sam_model_registry[name]().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_vit_b_parameter_counts() -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        plain = build_sam(PRESETS["vit_b"])
        adapted = build_model("vit_b", adapter_ratio=0.25, pretrained=False)
    assert sum(p.numel() for p in plain.parameters()) == 93_735_472
    params = dict(adapted.named_parameters())
    adapter_names = adapter_parameter_names(adapted)
    assert len(adapter_names) == 12 * 2 * 4  # 12 blocks x 2 adapters x (2 weights + 2 biases)
    assert sum(params[n].numel() for n in adapter_names) == 7_100_928
    assert sum(p.numel() for p in adapted.parameters()) == 93_735_472 + 7_100_928


def test_every_encoder_block_is_adapted() -> None:
    model = build_model()
    blocks = model.sam.image_encoder.blocks
    assert len(blocks) == PRESETS["tiny"].encoder_depth
    assert all(isinstance(b, MSABlock) for b in blocks)


@pytest.mark.parametrize("window", [0, 3, 4])  # global, padded windows (8 % 3 != 0), exact windows
def test_msa_block_with_fresh_adapters_equals_the_sam_block(window: int) -> None:
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=4, use_rel_pos=True, window_size=window, input_size=(8, 8))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)  # non-zero rel_pos and biases, so padding behaviour matters
    x = torch.randn(2, 8, 8, 32)
    expected = block(x)
    wrapped = MSABlock(block, ratio=0.25)
    torch.testing.assert_close(wrapped(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        wrapped.space_adapter.up.weight.normal_()
    assert not torch.allclose(wrapped(x), expected, atol=1e-3)


def _explicit_adapter(x: torch.Tensor, adapter, skip: bool) -> torch.Tensor:
    hidden = F.gelu(F.linear(x, adapter.down.weight, adapter.down.bias))
    out = F.linear(hidden, adapter.up.weight, adapter.up.bias)
    return x + out if skip else out


@pytest.mark.parametrize("window", [0, 3, 4])
def test_msa_block_equals_the_msa_formula_with_trained_adapters(window: int) -> None:
    """Medical SAM Adapter: the space adapter (with skip) acts on the attention branch before the
    residual add, the MLP adapter (no skip) runs in parallel to the MLP, scaled by 0.5."""
    torch.manual_seed(1)
    block = Block(dim=32, num_heads=4, use_rel_pos=True, window_size=window, input_size=(8, 8))
    wrapped = MSABlock(block, ratio=0.25)
    with torch.no_grad():
        for p in wrapped.parameters():
            p.normal_(0, 0.2)  # every adapter weight and bias non-zero
    x = torch.randn(2, 8, 8, 32)
    # segment_anything's own windowed attention, as Block.forward runs it
    h = block.norm1(x)
    if window > 0:
        h, pad_hw = window_partition(h, window)
    h = block.attn(h)
    if window > 0:
        h = window_unpartition(h, window, pad_hw, (8, 8))
    x1 = x + _explicit_adapter(h, wrapped.space_adapter, skip=True)
    xn = block.norm2(x1)
    expected = x1 + block.mlp(xn) + 0.5 * _explicit_adapter(xn, wrapped.mlp_adapter, skip=False)
    torch.testing.assert_close(wrapped(x), expected, rtol=1e-5, atol=1e-5)
    # both adapters matter: zeroing either one's output changes the block
    for adapter in (wrapped.space_adapter, wrapped.mlp_adapter):
        saved = adapter.up.weight.detach().clone(), adapter.up.bias.detach().clone()
        with torch.no_grad():
            adapter.up.weight.zero_()
            adapter.up.bias.zero_()
        assert not torch.allclose(wrapped(x), expected, atol=1e-3)
        with torch.no_grad():
            adapter.up.weight.copy_(saved[0])
            adapter.up.bias.copy_(saved[1])


def _randomised_model(seed: int = 0, **kwargs):
    model = build_model(seed=seed, pretrained=False, **kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # adapters and decoder away from their init
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_batched_decode_equals_segment_anythings_mask_decoder_per_image() -> None:
    model = _randomised_model()
    sam = model.sam
    images = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        embeddings = sam.image_encoder(model._preprocess(images))
        batched, _ = model._decode(embeddings)
        dim = sam.prompt_encoder.embed_dim
        grid = PRESETS["tiny"].embedding_size
        for i in range(len(images)):
            low_res, _ = sam.mask_decoder(
                image_embeddings=embeddings[i : i + 1],
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=torch.empty(1, 0, dim),
                dense_prompt_embeddings=sam.prompt_encoder.no_mask_embed.weight.reshape(
                    1, -1, 1, 1
                ).expand(1, -1, grid, grid),
                multimask_output=False,
            )
            torch.testing.assert_close(batched[i : i + 1], low_res, rtol=1e-5, atol=1e-5)
        # and with Sam.forward itself, prompts left out (its own prompt encoder and preprocess)
        outputs = sam(
            [{"image": img.expand(3, -1, -1) * 255.0, "original_size": (64, 64)} for img in images],
            multimask_output=False,
        )
    for i, out in enumerate(outputs):
        torch.testing.assert_close(batched[i : i + 1], out["low_res_logits"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def test_forward_is_batched_and_matches_per_image_outputs() -> None:
    model = build_model(pretrained=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # adapters away from their zero start
    images = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        batched = model(images)
        single = torch.cat([model(images[i : i + 1]) for i in range(4)])
    assert batched.shape == (4, 1, 64, 64)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def test_forward_resizes_other_square_sizes_and_refuses_non_square_or_colour() -> None:
    model = build_model().eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 48, 48))
    assert out.shape == (2, 1, 48, 48)
    with pytest.raises(ModelError, match=r"square gray images .*S = 64.*\(2, 3, 64, 64\)"):
        model(torch.rand(2, 3, 64, 64))
    with pytest.raises(ModelError, match=r"square gray images .*\(2, 1, 64, 48\)"):
        model(torch.rand(2, 1, 64, 48))
    with pytest.raises(ModelError, match="square gray images"):
        model(torch.rand(1, 64, 64))


def test_forward_of_an_empty_batch_is_an_empty_batch() -> None:
    with torch.no_grad():
        out = build_model()(torch.rand(0, 1, 64, 64))
    assert out.shape == (0, 1, 64, 64)


def test_checkpoint_round_trip_and_official_format(tmp_path) -> None:
    source = _randomised_model(seed=1)
    path = tmp_path / "sam_tiny.pth"
    save_sam_checkpoint(source, path)
    target = build_model(seed=2, checkpoint=path)
    pairs = zip(source.state_dict().values(), target.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    # An official file has no adapter keys: SAM weights load, adapters keep their seeded init.
    official = {k: v for k, v in source.sam.state_dict().items() if "adapter" not in k}
    with torch.device("meta"):  # the official key set, from segment_anything's own Sam
        from fedfms_secure.model.registry import build_sam as plain_sam

        assert set(official) == set(plain_sam(PRESETS["tiny"]).state_dict())
    torch.save(official, tmp_path / "official.pth")
    target = build_model(seed=2, pretrained=False)
    report = load_sam_checkpoint(target, tmp_path / "official.pth")
    fresh = build_model(seed=2, pretrained=False)
    assert report.missing_adapters == sorted(adapter_parameter_names(target.sam))
    assert report.resized == []
    for name, value in target.sam.state_dict().items():
        ref = fresh.sam.state_dict()[name] if "adapter" in name else official[name]
        assert torch.equal(value, ref), name
    assert any(not torch.equal(v, fresh.sam.state_dict()[k]) for k, v in official.items())


def test_checkpoint_with_other_adapter_ratio_names_adapter_ratio(tmp_path) -> None:
    path = tmp_path / "ratio.pth"
    save_sam_checkpoint(build_model(adapter_ratio=0.5), path)
    with pytest.raises(ModelError, match=r"adapter_ratio.*0\.25.*0\.5") as info:
        load_sam_checkpoint(build_model(adapter_ratio=0.25), path)
    assert "pick the preset" not in str(info.value)  # the preset is right; the ratio is not


def test_checkpoint_with_non_tensor_values_names_the_key(tmp_path) -> None:
    state = build_model(pretrained=False).sam.state_dict()
    state["image_encoder.neck.0.weight"] = [1.0, 2.0]
    path = tmp_path / "lists.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"non-tensor.*image_encoder\.neck\.0\.weight"):
        load_sam_checkpoint(build_model(), path)


def test_checkpoint_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        build_model(checkpoint=tmp_path / "missing.pth")
    bad = tmp_path / "other.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 2, 2, 8)}, bad)
    with pytest.raises(ModelError, match="does not match preset 'tiny'"):
        load_sam_checkpoint(build_model(), bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        load_sam_checkpoint(build_model(), junk)
