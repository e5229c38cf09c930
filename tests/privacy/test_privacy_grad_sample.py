"""Opacus' per-sample gradients on the adapted SAM equal a per-sample loop, in both modes.

This guards the traps listed in DESIGN.md: a trainable module inside the window partition (batch
B * windows), parameters read through ``.weight``, unused heads, functorch-fallback layers.
"""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from fedfms_secure.model import MODES, apply_mode, build_model
from fedfms_secure.train import dice_bce_loss


@pytest.mark.parametrize("mode", MODES)
def test_grad_sample_equals_per_sample_loop(mode: str, ellipses) -> None:
    torch.manual_seed(0)
    model = build_model(seed=5)
    with torch.no_grad():
        for p in model.parameters():  # move adapters off their zero start, everything off init
            p.add_(0.05 * torch.randn_like(p))
    names = apply_mode(model, mode)
    images, labels = ellipses(3, seed=2).tensors
    params = dict(model.named_parameters())

    expected: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(len(images)):
        model.zero_grad()
        dice_bce_loss(model(images[i : i + 1]), labels[i : i + 1]).backward()
        for n in names:
            expected[n].append(params[n].grad.detach().clone())

    model.zero_grad()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        dice_bce_loss(gsm(images), labels).backward()
        nonzero = 0
        for n in names:
            grad_sample = params[n].grad_sample
            assert grad_sample is not None, f"no per-sample gradient for {n}"
            want = torch.stack(expected[n])
            torch.testing.assert_close(grad_sample, want, rtol=1e-3, atol=1e-6, msg=n)
            nonzero += int(want.abs().max() > 0)
        assert nonzero > 0.9 * len(names)  # the check compares real gradients, not zeros
    finally:
        gsm.to_standard_module()
