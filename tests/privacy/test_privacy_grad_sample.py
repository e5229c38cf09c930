"""Opacus' per-sample gradients on the adapted SAM equal a per-sample loop, for every trainable
parameter, in both modes, prompt-free and box-prompted with several classes.

This guards the traps listed in DESIGN.md: a trainable module inside the window partition (batch
B * windows), parameters read through ``.weight``, unused heads, functorch-fallback layers, and
the routed positional tables (``pos_embed``, ``rel_pos_*``) that FedSAM trains.
"""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from fedfms_secure.model import MODES, apply_mode, build_model
from fedfms_secure.train.local import batch_loss

CONFIGS = [(1, "none"), (2, "box")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("num_classes", "prompt"), CONFIGS)
def test_grad_sample_equals_per_sample_loop(mode: str, num_classes: int, prompt: str,
                                            ellipses) -> None:  # fmt: skip
    torch.manual_seed(0)
    model = build_model(seed=5, pretrained=False, num_classes=num_classes, prompt=prompt)
    with torch.no_grad():
        for p in model.parameters():  # move adapters off their zero start, everything off init
            p.add_(0.05 * torch.randn_like(p))
    apply_mode(model, mode)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    images, labels = ellipses(3, seed=2).tensors
    if num_classes == 2:  # class 2: the left half of each ellipse (overlaps class 1)
        inner = labels.clone()
        inner[..., 32:] = 0
        labels = torch.cat([labels, inner], dim=1)
    params = dict(model.named_parameters())
    if mode == "fedsam":  # the routed tables and embeddings train here
        for name in ("sam.image_encoder.pos.pos_embed", "sam.image_encoder.blocks.0.attn.rel_pos.rel_pos_h",
                     "sam.mask_decoder.iou_token.weight", "sam.mask_decoder.mask_tokens.weight",
                     "sam.prompt_encoder.no_mask_embed.weight"):  # fmt: skip
            assert name in names, name
    assert "sam.mask_decoder.iou_prediction_head.layers.0.weight" in names
    if prompt == "box" and mode == "fedsam":
        assert "sam.prompt_encoder.point_embeddings.2.weight" in names

    expected: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(len(images)):
        model.zero_grad()
        batch_loss(model, model, images[i : i + 1], labels[i : i + 1]).backward()
        for n in names:
            grad = params[n].grad
            expected[n].append(torch.zeros_like(params[n]) if grad is None else grad.clone())

    model.zero_grad()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        batch_loss(gsm, model, images, labels).backward()
        nonzero = 0
        for n in names:
            grad_sample = params[n].grad_sample
            assert grad_sample is not None, f"no per-sample gradient for {n}"
            want = torch.stack(expected[n])
            torch.testing.assert_close(grad_sample, want, rtol=1e-3, atol=1e-6, msg=n)
            nonzero += int(want.abs().max() > 0)
        assert nonzero == len(names)  # every trainable parameter gets a real gradient
    finally:
        gsm.to_standard_module()
