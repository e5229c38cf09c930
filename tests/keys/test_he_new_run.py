"""A second federation run with the same bundles: a new server ``--state`` has no CKKS key, the
sites still hold the first run's. ``he-init`` and the sites set those keys aside (kept in
``he/archive/``) and take the new run's key; a replayed key of the earlier run is still refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from federation_kit import provision_sites, running_server, site_client

from fedfms_secure.errors import FederationError, KeyMaterialError
from fedfms_secure.he.packing import fit_params
from fedfms_secure.keys.bundle import load_bundle, load_envelope_key
from fedfms_secure.keys.hestore import HeStore
from fedfms_secure.protocol import KeyEpoch
from fedfms_secure.site import hekeys
from fedfms_secure.site.hekeys import Keyring, init_key


def _run_keys(address: str, a: Path, b: Path, *, b_first: bool = False) -> tuple[str, str]:
    """he-init at ``a`` and ``b``'s daemon-side key handling; returns both sites' fingerprints."""
    with site_client(address, a) as client_a, site_client(address, b) as client_b:
        ring_b = Keyring(client_b, load_bundle(b, role="client"), timeout=20)
        if b_first:  # b's daemon starts before he-init: it sets its old key aside and waits
            ring_b.start_run(client_b.status().key)
            assert ring_b.codec is None
        init_key(client_a, load_bundle(a, role="client"))
        key = client_b.status().key
        ring_b.start_run(key)
        ring_b.sync(key)
        return HeStore(a).current().fingerprint, ring_b.fingerprint


@pytest.mark.parametrize("b_first", [False, True])
def test_a_second_run_with_the_same_bundles_sets_the_old_keys_aside(tmp_path: Path, b_first: bool) -> None:
    provision_sites(tmp_path, ["a", "b"], federation="again", he_dealer=False,
                    params=fit_params(bound=1.0, sites=2, rounds=1))
    a, b = tmp_path / "a", tmp_path / "b"
    with running_server(tmp_path / "server", tmp_path / "state-1", rounds=1) as address:
        first_a, first_b = _run_keys(address, a, b)
        with site_client(address, b) as client_b:
            old_key = client_b.status().key
            old_envelope = client_b.envelope(1).payload
    assert first_a == first_b
    time.sleep(1.1)  # envelopes carry their sealing time to the second
    with running_server(tmp_path / "server", tmp_path / "state-2", rounds=1) as address:
        second_a, second_b = _run_keys(address, a, b, b_first=b_first)
    assert second_a == second_b != first_a
    for site in (a, b):  # the earlier run's key files are kept, not deleted
        archived = list((site / "he" / "archive").glob("*/epoch-1.ctx"))
        assert len(archived) == 1 and HeStore(site).archived() == {first_a}
    # the earlier run's key, replayed by a server, is refused at b
    bundle_b = load_bundle(b, role="client")
    opened = hekeys._open(bundle_b, load_envelope_key(b), old_envelope, old_key)
    with pytest.raises(KeyMaterialError, match="replayed old key"):
        hekeys._store_opened(HeStore(b), opened, old_key)
    with pytest.raises(KeyMaterialError, match="earlier federation run"):
        HeStore(b).put(1, opened.context_bytes)
    assert HeStore(b).current().fingerprint == second_b


def test_the_same_run_still_refuses_another_key_of_an_epoch_it_holds(tmp_path: Path) -> None:
    provision_sites(tmp_path, ["a", "b"], federation="same", he_dealer=False,
                    params=fit_params(bound=1.0, sites=2, rounds=1))
    with running_server(tmp_path / "server", tmp_path / "state", rounds=1) as address:
        _run_keys(address, tmp_path / "a", tmp_path / "b")
        store = HeStore(tmp_path / "b")
        held = store.current()
        forged = KeyEpoch(held.epoch, "f" * 64, 0, "a")
        with site_client(address, tmp_path / "b") as client_b:
            with pytest.raises(KeyMaterialError, match="never goes back"):
                hekeys.current_key(client_b, load_bundle(tmp_path / "b", role="client"),
                                   load_envelope_key(tmp_path / "b"), forged, store=store)
    assert store.current() == held and not (tmp_path / "b" / "he" / "archive").exists()


def test_a_site_waiting_for_he_init_says_so_once(tmp_path: Path, caplog) -> None:
    provision_sites(tmp_path, ["a", "b"], federation="wait", he_dealer=False,
                    params=fit_params(bound=1.0, sites=2, rounds=1))
    with running_server(tmp_path / "server", tmp_path / "state", rounds=1) as address:
        with site_client(address, tmp_path / "b") as client_b, caplog.at_level("INFO", logger="fedfms_secure.site"):
            with pytest.raises(FederationError, match="waiting for keys he-init"):
                hekeys.current_key(client_b, load_bundle(tmp_path / "b", role="client"),
                                   load_envelope_key(tmp_path / "b"), KeyEpoch(), timeout=4, interval=0.2)
    waiting = [r for r in caplog.records if r.getMessage().startswith("waiting for keys he-init")]
    assert len(waiting) == 1, [r.getMessage() for r in waiting]
