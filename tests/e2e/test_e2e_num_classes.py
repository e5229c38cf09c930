"""The plan fixes the number of classes: a site whose label map gives another count stops before
it trains (it would spend privacy budget on an update whose length the server refuses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation_kit import provision_sites, running_server
from fedfms_secure.site.daemon import run_site
from fedfms_secure.config import ClientConfig, ServerConfig
from fedfms_secure.data import synth_federation
from fedfms_secure.errors import ConfigError


@pytest.mark.parametrize("plan_classes, labels, he", [(2, None, False), (1, '{"1": 1, "2": 2}', True)])
def test_a_site_whose_label_map_disagrees_with_the_plan_stops_before_training(tmp_path: Path, plan_classes, labels,
                                                                               he):
    """With CKKS no site has run he-init: the site stops at once instead of waiting for the key."""
    provision_sites(tmp_path, ["a"], federation="nc")
    (site_dir,) = synth_federation(tmp_path / "data", sites=1, seed=0, shape=(32, 32, 6))
    state = tmp_path / "state_a"
    with running_server(tmp_path / "server", tmp_path / "state", rounds=1, he=he,
                        num_classes=plan_classes) as address:
        config = ClientConfig(keys=tmp_path / "a", server=address, data=site_dir, state=state, epsilon=8.0,
                              labels=labels, connect_timeout=30, round_timeout=600)
        with pytest.raises(ConfigError) as err:
            run_site(config)
    classes = 2 if labels else 1
    message = str(err.value)
    assert f"gives {classes} foreground class(es), but the federation's plan has {plan_classes}" in message
    assert "--labels" in message
    # no privacy state, no ledger, no split: nothing was spent (the folder holds the daemon's lock only)
    assert not state.exists() or {p.name for p in state.iterdir()} <= {"daemon.lock"}


def test_the_server_refuses_a_class_count_sam_cannot_have(tmp_path: Path) -> None:
    for bad in (0, 5):
        with pytest.raises(ConfigError, match="num_classes must be 1..4"):
            ServerConfig(keys=tmp_path, state=tmp_path, num_classes=bad)
