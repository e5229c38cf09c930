"""The pretrained tiny preset that ships with the package."""

from __future__ import annotations

import logging

import pytest
import torch

import fedfms_secure.model.registry as registry
from fedfms_secure.data.synth import ellipses
from fedfms_secure.errors import ModelError
from fedfms_secure.model import apply_mode, build_model, flatten
from fedfms_secure.model.adapters import adapter_parameter_names
from fedfms_secure.model.registry import shipped_weights
from fedfms_secure.train import evaluate_dice

WEIGHTS = shipped_weights("tiny")


def test_the_weights_ship_small_and_in_the_official_format() -> None:
    assert WEIGHTS is not None and WEIGHTS.is_file(), "run python -m benchmarks.pretrain_tiny"
    assert WEIGHTS.stat().st_size <= 20 * 2**20
    state = torch.load(WEIGHTS, weights_only=True)
    with torch.device("meta"):
        sam_keys = set(registry.build_sam(registry.PRESETS["tiny"]).state_dict())
    assert set(state) == sam_keys  # SAM's keys exactly: no adapters


def test_pretrained_is_the_default_for_tiny_and_identical_on_every_site() -> None:
    a, b = build_model("tiny", seed=7), build_model("tiny", seed=7)
    state = torch.load(WEIGHTS, weights_only=True)
    sam = a.sam.state_dict()
    assert all(torch.equal(sam[k], v) for k, v in state.items())
    for mode in ("fedmsa", "fedsam"):  # theta_0 is the same on every site for the same seed
        names = apply_mode(a, mode)
        apply_mode(b, mode)
        assert (flatten(a, names) == flatten(b, names)).all()
    # adapters come from the seed, SAM from the file
    c = build_model("tiny", seed=8)
    adapters = adapter_parameter_names(a)
    pa, pc = dict(a.named_parameters()), dict(c.named_parameters())
    assert all(not torch.equal(pa[n], pc[n]) for n in adapters if n.endswith("down.weight"))
    assert all(torch.equal(pa[n], pc[n]) for n in pa if n not in adapters)
    fresh = build_model("tiny", seed=7, pretrained=False)
    assert all(torch.equal(pa[n], p) for n, p in fresh.named_parameters() if n in adapters)
    assert not torch.equal(fresh.sam.state_dict()["image_encoder.neck.0.weight"],
                           sam["image_encoder.neck.0.weight"])  # fmt: skip


def test_pretrained_tiny_already_segments_generic_shapes() -> None:
    # ellipses are generic shapes (the pretraining never saw this generator or any medical data)
    data = ellipses(32, seed=3)
    pretrained = evaluate_dice(build_model("tiny"), data)
    scratch = evaluate_dice(build_model("tiny", pretrained=False), data)
    assert pretrained > 0.7 and pretrained > scratch + 0.3, (pretrained, scratch)


def test_a_missing_weights_file_warns_and_falls_back_to_the_seed(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedfms_secure.model"):
        model = build_model("tiny", seed=2)
    assert any("missing" in r.getMessage() and str(tmp_path) in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)  # fmt: skip
    fresh = build_model("tiny", seed=2, pretrained=False)
    pairs = zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


def test_pretrained_choices_that_cannot_work_are_refused(tmp_path) -> None:
    with pytest.raises(ModelError, match="no pretrained weights ship for preset 'vit_b'.*checkpoint="):
        with torch.device("meta"):
            build_model("vit_b", pretrained=True)
    with pytest.raises(ModelError, match="either checkpoint"):
        build_model("tiny", pretrained=True, checkpoint=tmp_path / "x.pth")
