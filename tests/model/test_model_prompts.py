"""Box prompts derived from labels, several classes, other input sizes, SAM's normalisation."""

from __future__ import annotations

import pytest
import torch

from fedfms_secure.errors import ModelError
from fedfms_secure.model import (
    PRESETS,
    boxes_from_labels,
    build_model,
    label_targets,
    load_sam_checkpoint,
    save_sam_checkpoint,
)
from fedfms_secure.model.checkpoint import resize_pos_embed, resize_rel_pos


def _randomised(seed: int = 0, **kwargs):
    model = build_model(seed=seed, pretrained=False, **kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_boxes_are_the_tight_bounding_boxes_and_the_whole_image_when_absent() -> None:
    targets = torch.zeros(2, 2, 16, 16)
    targets[0, 0, 3:7, 5:12] = 1  # rows 3..6, columns 5..11
    targets[0, 1, 10, 2] = 1
    boxes = boxes_from_labels(targets)
    assert boxes.shape == (2, 2, 4)
    assert boxes[0, 0].tolist() == [5, 3, 11, 6]
    assert boxes[0, 1].tolist() == [2, 10, 2, 10]
    assert boxes[1, 0].tolist() == boxes[1, 1].tolist() == [0, 0, 15, 15]


def test_jittered_boxes_move_reproducibly_and_stay_valid() -> None:
    targets = torch.zeros(64, 1, 32, 32)
    targets[:, :, 8:20, 10:24] = 1
    exact = boxes_from_labels(targets)
    a = boxes_from_labels(targets, jitter=0.1, generator=torch.Generator().manual_seed(1))
    b = boxes_from_labels(targets, jitter=0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, exact)
    assert (a[..., :2] <= a[..., 2:]).all() and a.min() >= 0 and a.max() <= 31
    assert (a - exact).abs().max() <= 2 * 0.1 * 14 + 1e-4  # at most 2 std of 10% of the side


def test_label_maps_and_per_class_masks_become_targets() -> None:
    index = torch.tensor([[[[0, 1], [2, 1]]]]).float()
    assert label_targets(index, 2).tolist() == [[[[0, 1], [0, 1]], [[0, 0], [1, 0]]]]
    multi = torch.rand(1, 2, 2, 2)
    assert torch.equal(label_targets(multi, 2), (multi > 0.5).float())
    with pytest.raises(ModelError, match="class 2.*num_classes=1"):
        label_targets(index, 1)
    with pytest.raises(ModelError, match="3 channels"):
        label_targets(torch.zeros(1, 3, 2, 2), 2)


def test_box_prompted_single_class_equals_segment_anythings_decoder() -> None:
    model = _randomised()
    sam = model.sam
    images = torch.rand(3, 1, 64, 64)
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [10.0, 10.0, 60.0, 50.0], [0.0, 0.0, 63.0, 63.0]])
    with torch.no_grad():
        logits, iou = model(images, boxes, with_iou=True)
        embeddings = sam.image_encoder(model._preprocess(images))
        for i in range(3):
            sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[i : i + 1], masks=None)
            low_res, their_iou = sam.mask_decoder(
                image_embeddings=embeddings[i : i + 1],
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            up = torch.nn.functional.interpolate(low_res, size=(64, 64), mode="bilinear",
                                                 align_corners=False)  # fmt: skip
            torch.testing.assert_close(logits[i : i + 1], up, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(iou[i : i + 1], their_iou, rtol=1e-4, atol=1e-5)
    free = model(images)
    assert not torch.allclose(free, logits, atol=1e-3)  # the box matters


def test_multi_class_outputs_one_map_per_class_from_its_own_token() -> None:
    model = _randomised(num_classes=2)
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        logits, iou = model(images, with_iou=True)
        embeddings = model.sam.image_encoder(model._preprocess(images))
        low_res, _ = model._decode(embeddings)
    assert logits.shape == (2, 2, 64, 64) and iou.shape == (2, 2)
    assert not torch.allclose(logits[:, 0], logits[:, 1], atol=1e-3)
    single = build_model(seed=0, pretrained=False)
    single.load_state_dict(model.state_dict())
    with torch.no_grad():  # class 0 of the 2-class model is the single-class model's output
        torch.testing.assert_close(single.eval()(images), logits[:, :1], rtol=1e-4, atol=1e-5)
    boxed = build_model(pretrained=False, num_classes=2, prompt="box")
    boxed.load_state_dict(model.state_dict())
    boxes = torch.tensor([[[0.0, 0, 40, 40], [20, 20, 50, 50]]] * 2)
    with torch.no_grad():
        per_class = boxed.eval()(images, boxes)
        alone = boxed(images, boxes[:, [1, 1]])[:, 1:]  # class 1's pass sees only its own box
    torch.testing.assert_close(per_class[:, 1:], alone)
    with pytest.raises(ModelError, match="prompt='box'.*boxes="):
        boxed(images)
    with pytest.raises(ModelError, match=r"\[B, K, 4\] = \[2, 2, 4\]"):
        boxed(images, torch.zeros(2, 4))


def test_num_classes_and_prompt_are_checked() -> None:
    with pytest.raises(ModelError, match="num_classes=5.*1..4"):
        build_model(pretrained=False, num_classes=5)
    with pytest.raises(ModelError, match="unknown prompt 'points'"):
        build_model(pretrained=False, prompt="points")
    with pytest.raises(ModelError, match="img_size 60 .*patch size 8"):
        build_model(pretrained=False, img_size=60)


def test_sam_pixel_normalisation_is_applied() -> None:
    model = build_model(pretrained=False)
    images = torch.rand(2, 1, 64, 64)
    rgb = images.expand(-1, 3, -1, -1) * 255.0
    expected = model.sam.preprocess(rgb)  # segment_anything's own (x - mean) / std (+ padding)
    torch.testing.assert_close(model._preprocess(images), expected)
    assert abs(float(model._preprocess(torch.full((1, 1, 64, 64), 0.47)).mean())) < 0.1


def test_a_checkpoint_for_another_input_size_is_resized_on_load(tmp_path) -> None:
    source = _randomised(seed=3)  # 64 px: 8x8 grid, global block rel_pos tables of 15 rows
    path = tmp_path / "sam_tiny_64.pth"
    save_sam_checkpoint(source, path, adapters=False)
    official = torch.load(path)
    small = build_model(seed=1, pretrained=False, img_size=32)  # 4x4 grid
    assert small.preset.img_size == 32 and PRESETS["tiny"].img_size == 64
    report = load_sam_checkpoint(small, path)
    state = small.sam.state_dict()
    glob = "image_encoder.blocks.2.attn.rel_pos_h"  # the global block: its table depends on size
    assert set(report.resized) == {"image_encoder.pos_embed", glob,
                                   glob.replace("_h", "_w")}  # fmt: skip
    assert state["image_encoder.pos_embed"].shape == (1, 4, 4, 64)
    torch.testing.assert_close(state["image_encoder.pos_embed"],
                               resize_pos_embed(official["image_encoder.pos_embed"], (4, 4)))  # fmt: skip
    assert state[glob].shape == (7, 16)
    torch.testing.assert_close(state[glob], resize_rel_pos(official[glob], 7))
    windowed = "image_encoder.blocks.0.attn.rel_pos_h"  # 4x4 windows either way: unchanged
    assert torch.equal(state[windowed], official[windowed])
    assert torch.equal(state["mask_decoder.mask_tokens.weight"], official["mask_decoder.mask_tokens.weight"])
    with torch.no_grad():  # and it runs at its own size
        assert small(torch.rand(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    # a constant table stays constant, and bicubic resizing keeps a smooth one close
    ramp = torch.linspace(0, 1, 8).view(1, 8, 1, 1).expand(1, 8, 8, 3)
    resized = resize_pos_embed(ramp, (4, 4))
    assert resized[0, :, 0, 0].diff().gt(0).all()


def test_wrong_shapes_name_the_key_and_both_shapes(tmp_path) -> None:
    state = build_model(pretrained=False).sam.state_dict()
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 16)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"bad\.pth.*mask_decoder\.iou_token\.weight: file "
                                          r"\(1, 16\), model \(1, 32\)"):  # fmt: skip
        load_sam_checkpoint(build_model(pretrained=False), path)


def test_official_vit_b_tables_resize_to_a_256_px_model() -> None:
    from fedfms_secure.model.checkpoint import _resizable

    with torch.device("meta"):
        native = build_model("vit_b", pretrained=False).sam.state_dict()
        small = build_model("vit_b", pretrained=False, img_size=256).sam.state_dict()
    differ = sorted(k for k in native if native[k].shape != small[k].shape)
    glob = [f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in (2, 5, 8, 11) for a in "hw"]
    assert differ == sorted(["image_encoder.pos_embed", *glob])  # windowed blocks keep 14x14
    for key in differ:
        official = torch.randn(native[key].shape)
        assert _resizable(key, official, small[key])
        if key.endswith("pos_embed"):
            resized = resize_pos_embed(official, (16, 16))
        else:
            resized = resize_rel_pos(official, small[key].shape[0])
        assert resized.shape == small[key].shape == ((1, 16, 16, 768) if "pos_embed" in key else (31, 64))
