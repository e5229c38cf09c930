"""How many values the communicated vector of a plan holds, without importing torch.

The server sums ciphertexts and never builds a model, so it takes the length of the vector every
site uploads from this table (per preset and mode, with the adapter ratio every site uses; the
number of classes does not change it; the input size changes it in FedSAM only).
``tests/server/test_server_plan_sizes.py`` checks each
figure against ``fedfms_secure.model.mode_summary``: a model change that alters a count fails
there until the table is updated.
"""

from __future__ import annotations

from fedfms_secure.errors import ConfigError

#: (preset, mode) -> values of the communicated vector
VECTOR_LENGTHS: dict[tuple[str, str], int] = {
    ("tiny", "fedmsa"): 53_376,
    ("tiny", "fedsam"): 219_715,
    ("vit_b", "fedmsa"): 11_159_268,
    ("vit_b", "fedsam"): 93_735_472,
    ("vit_l", "fedmsa"): 29_285_604,
    ("vit_l", "fedsam"): 312_342_832,
    ("vit_h", "fedmsa"): 56_589_540,
    ("vit_h", "fedsam"): 641_090_608,
}


#: preset -> (input side, patch side, encoder width, head width, global-attention blocks): the
#: shapes of the image encoder's positional tables, the only communicated values whose number
#: depends on the input size (``pos_embed``: a width-wide vector per patch; each global block's
#: ``rel_pos_h`` / ``rel_pos_w``: 2 * grid - 1 rows of head width; windowed blocks' tables span a
#: window and stay fixed). FedMSA does not communicate them, so its length never depends on size.
PRESET_SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 8, 64, 16, 1),
    "vit_b": (1024, 16, 768, 64, 4),
    "vit_l": (1024, 16, 1024, 64, 4),
    "vit_h": (1024, 16, 1280, 80, 4),
}
#: modes whose vector holds the positional tables
SIZED_MODES = ("fedsam",)


def check_image_size(preset: str, image_size: int | None) -> int:
    """The input side of a plan: the preset's when ``image_size`` is None (or 0), else ``image_size``
    if it is a positive multiple of the preset's patch side; ConfigError otherwise."""
    if preset not in PRESET_SHAPES:
        known = ", ".join(sorted(PRESET_SHAPES))
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {known}")
    default, patch = PRESET_SHAPES[preset][:2]
    if not image_size:
        return default
    if image_size < patch or image_size % patch:
        raise ConfigError(f"image_size {image_size} is not a positive multiple of preset {preset!r}'s patch side "
                          f"{patch}; use e.g. {patch * max(1, round(image_size / patch))}")
    return image_size


def _positional_values(preset: str, image_size: int) -> int:
    _, patch, width, head, global_blocks = PRESET_SHAPES[preset]
    grid = image_size // patch
    return width * grid * grid + global_blocks * 2 * (2 * grid - 1) * head


def plan_vector_length(preset: str, mode: str, image_size: int | None = None) -> int:
    """The number of values each site uploads per round for ``preset`` in ``mode`` at input side
    ``image_size`` (None: the preset's)."""
    try:
        length = VECTOR_LENGTHS[(preset, mode)]
    except KeyError:
        known = ", ".join(f"{p}/{m}" for p, m in sorted(VECTOR_LENGTHS))
        raise ConfigError(f"no vector length is known for preset {preset!r} in mode {mode!r} (known: {known}); "
                          "choose one of those for --preset and --mode") from None
    size = check_image_size(preset, image_size)
    if mode in SIZED_MODES:
        length += _positional_values(preset, size) - _positional_values(preset, PRESET_SHAPES[preset][0])
    return length
