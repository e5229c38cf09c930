"""The server's torch-free table of vector lengths agrees with the model that the sites build."""

from __future__ import annotations

import pytest
import torch

from fedfms_secure.errors import ConfigError
from fedfms_secure.model import MODES, PRESETS, build_model, mode_summary
from fedfms_secure.server.plan_sizes import VECTOR_LENGTHS, plan_vector_length


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_and_mode_has_the_models_count(preset: str) -> None:
    # the official presets are built on the meta device: shapes without memory or time
    with torch.device("meta" if preset != "tiny" else "cpu"):
        model = build_model(preset, pretrained=False, num_classes=2 if preset == "tiny" else 1)
    for mode in MODES:
        assert plan_vector_length(preset, mode) == mode_summary(model, mode)["communicated"], (preset, mode)
    assert {p for p, _ in VECTOR_LENGTHS} == set(PRESETS)


@pytest.mark.parametrize(("preset", "sizes"), [("tiny", (32, 128)), ("vit_b", (128, 256, 512)), ("vit_h", (256,))])
def test_the_input_size_changes_fedsams_count_only(preset: str, sizes: tuple[int, ...]) -> None:
    # FedSAM communicates pos_embed and the global blocks' rel_pos tables, which are sized to the grid
    default = plan_vector_length(preset, "fedsam")
    for size in sizes:
        with torch.device("meta" if preset != "tiny" else "cpu"):
            model = build_model(preset, pretrained=False, img_size=size)
        for mode in MODES:
            assert plan_vector_length(preset, mode, size) == mode_summary(model, mode)["communicated"], (size, mode)
        assert plan_vector_length(preset, "fedmsa", size) == plan_vector_length(preset, "fedmsa")
        assert plan_vector_length(preset, "fedsam", size) != default


def test_an_image_size_off_the_patch_grid_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="patch side 16"):
        plan_vector_length("vit_b", "fedmsa", 100)


def test_an_unknown_plan_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--preset and --mode"):
        plan_vector_length("vit_x", "fedmsa")
