"""How many values the communicated vector of a plan holds, without importing torch.

The server sums ciphertexts and never builds a model, so it takes the length of the vector every
site uploads from this table (per preset and mode, with the adapter ratio every site uses; the
number of classes does not change it). ``tests/server/test_server_plan_sizes.py`` checks each
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


def plan_vector_length(preset: str, mode: str) -> int:
    """The number of values each site uploads per round for ``preset`` in ``mode``."""
    try:
        return VECTOR_LENGTHS[(preset, mode)]
    except KeyError:
        known = ", ".join(f"{p}/{m}" for p, m in sorted(VECTOR_LENGTHS))
        raise ConfigError(f"no vector length is known for preset {preset!r} in mode {mode!r} (known: {known}); "
                          "choose one of those for --preset and --mode") from None
