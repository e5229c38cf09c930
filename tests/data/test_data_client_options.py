"""A site's data options from flags and TOML (ClientConfig): parsed, checked, and named when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfms_secure.config import ClientConfig, load_config
from fedfms_secure.errors import ConfigError

BASE = {"keys": "k", "data": "d", "state": "s"}


def test_data_keys_from_toml_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "site.toml"
    toml.write_text('labels = \'{"1": 1, "2": 2}\'\naxis = 0\nclip_percentiles = [1, 99]\n'
                    'keep_empty_every = 0\nskip_bad = true\ncache = "~/slices"\n')
    config = load_config(ClientConfig, toml, BASE)
    assert (config.labels, config.axis, config.clip_percentiles) == ('{"1": 1, "2": 2}', 0, (1.0, 99.0))
    assert config.keep_empty_every == 0 and config.skip_bad is True
    assert config.cache == Path("~/slices").expanduser()
    flags = load_config(ClientConfig, toml, {**BASE, "clip_percentiles": "0.5,99.5", "axis": 2})
    assert flags.clip_percentiles == (0.5, 99.5) and flags.axis == 2
    default = load_config(ClientConfig, None, BASE)
    assert (default.labels, default.axis, default.clip_percentiles, default.cache) == (None, 2, (0.5, 99.5), None)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"labels": '{"1": 2}'}, "without a gap"),
        ({"clip_percentiles": "99,1"}, "LOW < HIGH"),
        ({"clip_percentiles": "a,b"}, "two numbers"),
        ({"axis": 3}, "axis must be 0, 1 or 2"),
        ({"keep_empty_every": -1}, "keep_empty_every"),
    ],
)
def test_wrong_data_keys_are_named(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(ClientConfig, None, {**BASE, **override})
