"""The CKKS key made at a site, over a real gRPC server with mutual TLS: `keys he-init`, sites
fetching and opening their envelopes, a round, `keys rotate-he` at a round boundary, and the old
key refused afterwards."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest

from fedfms_secure.cli import main
from fedfms_secure.site.hekeys import Keyring
from fedfms_secure.keys.hestore import HeStore
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.he.packing import fit_params
from fedfms_secure.errors import FederationError
from fedfms_secure.protocol import Chunk
from fedfms_secure.server.plan_sizes import plan_vector_length

from federation_kit import provision_sites, running_server, site_client

SITES = ("a", "b", "c")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    params = fit_params(bound=1.0, sites=len(SITES), rounds=4)
    provision_sites(root, SITES, federation="hk", params=params, he_dealer=False)
    with running_server(root / "server", root / "state", rounds=3) as address:
        yield root, address


def chunks(codec, round_, vec):
    payloads = codec.encrypt_vector(vec)
    step = codec.chunk_values
    return [Chunk(round_, i, len(payloads), min(step, vec.size - i * step), codec.fingerprint, p, vec.size)
            for i, p in enumerate(payloads)]


def wait_for_round(client, round_):
    """The server closes a round apart from the call that brought its last upload: wait, as a site does."""
    deadline = time.monotonic() + 30
    while client.status().round < round_:
        assert time.monotonic() < deadline, f"round {round_ - 1} did not close"
        time.sleep(0.05)


def test_he_init_round_and_rotation_over_grpc(federation, capsys):
    root, address = federation
    clients = {name: site_client(address, root / name) for name in SITES}
    try:
        # before he-init: no key, commits refused, envelopes not there yet
        assert clients["b"].status().key.epoch == 0
        with pytest.raises(FederationError, match="waiting for keys he-init") as info:
            clients["b"].envelope()
        assert info.value.code == "not_found"
        with pytest.raises(FederationError, match="waiting for keys he-init") as info:
            clients["b"].commit_weight(0, "ab" * 32, b"\x00")
        assert info.value.code == "failed_precondition"

        # a site waiting for its key gets it as soon as he-init has run at site a
        ring_b = Keyring(clients["b"], load_bundle(root / "b", role="client"), timeout=60)
        assert ring_b.codec is None
        waiter = threading.Thread(target=ring_b.sync, args=(clients["b"].status().key,))
        waiter.start()
        assert main(["keys", "he-init", "--keys", str(root / "a"), "--server", address, "--json"]) == 0
        made = json.loads(capsys.readouterr().out)
        assert (made["epoch"], made["site"], made["round"], sorted(made["recipients"])) == (1, "a", 0, ["b", "c"])
        waiter.join(timeout=60)
        assert ring_b.fingerprint == made["fingerprint"]
        rings = {"a": Keyring(clients["a"], load_bundle(root / "a", role="client")), "b": ring_b,
                 "c": Keyring(clients["c"], load_bundle(root / "c", role="client"), timeout=10)}
        rings["c"].sync(clients["c"].status().key)
        assert {r.fingerprint for r in rings.values()} == {made["fingerprint"]}
        assert main(["keys", "he-init", "--keys", str(root / "b"), "--server", address]) == 1  # only once
        assert "already" in capsys.readouterr().err

        # one round under epoch 1
        codec = rings["a"].codec
        vec = np.linspace(-0.25, 0.25, plan_vector_length("tiny", "fedmsa"))  # the plan's vector
        for name, ring in rings.items():
            clients[name].commit_weight(0, ring.fingerprint, ring.codec.encrypt_scalar(4.0))
        for name, ring in rings.items():
            assert ring.codec.decrypt_scalar(clients[name].weight_total(0).payload) == pytest.approx(12.0)
            clients[name].upload(lambda ring=ring: chunks(ring.codec, 0, vec / 3))
        wait_for_round(clients["a"], 1)
        assert clients["a"].status().round == 1
        state = clients["b"].global_state(1)
        before = {n: r.codec.decrypt_vector([c.payload for c in state], vec.size) for n, r in rings.items()}
        np.testing.assert_allclose(before["a"], vec, atol=4 * codec.step)
        assert all(np.array_equal(v, before["a"]) for v in before.values())

        # rotate-he from site c at the boundary of round 1 (no commit yet)
        old = {name: ring.codec for name, ring in rings.items()}
        assert main(["keys", "rotate-he", "--keys", str(root / "c"), "--server", address, "--wait", "30",
                     "--json"]) == 0
        rotated = json.loads(capsys.readouterr().out)
        assert (rotated["epoch"], rotated["site"], rotated["round"]) == (2, "c", 1)
        assert sorted(rotated["recipients"]) == ["a", "b"] and rotated["state_chunks"] == len(state)
        status = clients["a"].status()
        assert status.key.epoch == 2 and status.key.fingerprint == rotated["fingerprint"]

        # the old key is refused from now on, naming both epochs
        with pytest.raises(FederationError, match="epoch 1 .* replaced by epoch 2") as info:
            clients["a"].commit_weight(1, old["a"].fingerprint, old["a"].encrypt_scalar(4.0))
        assert info.value.code == "failed_precondition"
        assert old["a"].fingerprint in str(info.value) and rotated["fingerprint"] in str(info.value)

        # every site follows: the state is the same values under the new key
        for name, ring in rings.items():
            assert ring.sync(status.key) is True
            assert ring.fingerprint == rotated["fingerprint"]
        state = clients["a"].global_state(1)
        assert {c.fingerprint for c in state} == {rotated["fingerprint"]}
        for name, ring in rings.items():
            np.testing.assert_array_equal(ring.codec.decrypt_vector([c.payload for c in state], vec.size),
                                          before[name])
        for name in SITES:  # superseded contexts are deleted at every site
            assert [p.name for p in HeStore(root / name).folder.glob("epoch-*.ctx")] == ["epoch-2.ctx"]

        # a rotation while the round has commits waits for a boundary, and gives up after --wait
        clients["a"].commit_weight(1, rings["a"].fingerprint, rings["a"].codec.encrypt_scalar(4.0))
        assert main(["keys", "rotate-he", "--keys", str(root / "b"), "--server", address, "--wait", "1"]) == 1
        assert "no round boundary within --wait 1 s" in capsys.readouterr().err
        assert clients["a"].status().key.epoch == 2
        assert [p.name for p in HeStore(root / "b").folder.glob("epoch-*.ctx")] == ["epoch-2.ctx"]

        # a site never goes back: an older epoch announced (to replay its signed envelope) is refused
        from fedfms_secure.errors import KeyMaterialError
        from fedfms_secure.protocol import KeyEpoch

        with pytest.raises(KeyMaterialError, match="never goes back to an older key"):
            rings["b"].sync(KeyEpoch(1, made["fingerprint"], 0, "a"))
        assert rings["b"].fingerprint == rotated["fingerprint"]
    finally:
        for client in clients.values():
            client.close()


def test_a_site_that_lost_its_key_fetches_it_again(federation, tmp_path):
    """A bundle without he/ (e.g. restored from the export) gets the current key from its envelope;
    the envelope of another site does not open with its key."""
    root, address = federation
    from fedfms_secure.keys.envelope import open_envelope
    from fedfms_secure.keys.bundle import load_envelope_key
    from fedfms_secure.errors import KeyMaterialError

    bundle_dir = tmp_path / "b"
    shutil.copytree(root / "b", bundle_dir)
    shutil.rmtree(bundle_dir / "he")
    bundle = load_bundle(bundle_dir, role="client")
    with site_client(address, root / "b") as client:
        ring = Keyring(client, bundle, timeout=10)
        assert ring.codec is None
        status = client.status()
        assert ring.sync(status.key) is True and ring.fingerprint == status.key.fingerprint
    assert HeStore(bundle_dir).current().epoch == status.key.epoch
    with site_client(address, root / "a") as client_a:
        for_a = client_a.envelope()
    with pytest.raises(KeyMaterialError, match="sealed to site 'a', not to this site 'b'"):
        open_envelope(for_a.payload, recipient="b", recipient_key=load_envelope_key(bundle_dir), federation="hk",
                      sites=SITES, ca_pem=bundle.ca_pem, params=bundle.params)


def test_a_site_that_trained_under_the_old_key_encrypts_again_and_commits(tmp_path):
    """The key is rotated after site b fetched the state of round 0: its commit under the old key
    is refused, it fetches its envelope and commits the same count under the new key."""
    from fedfms_secure.site.hekeys import init_key, rotate_key
    from fedfms_secure.site.daemon import _Site
    from fedfms_secure.config import ClientConfig
    from fedfms_secure.keys.bundle import load_envelope_key

    sites = ("a", "b")
    provision_sites(tmp_path, sites, federation="re", params=fit_params(bound=1.0, sites=2, rounds=2))
    with running_server(tmp_path / "server", tmp_path / "state", rounds=2) as address:
        with site_client(address, tmp_path / "a") as client_a, site_client(address, tmp_path / "b") as client_b:
            bundle_a = load_bundle(tmp_path / "a", role="client")
            init_key(client_a, bundle_a)
            ring_b = Keyring(client_b, load_bundle(tmp_path / "b", role="client"), timeout=30)
            ring_b.sync(client_b.status().key)
            site_b = object.__new__(_Site)  # the real methods, over a real connection; no model needed here
            site_b.client, site_b.keys, site_b.codec = client_b, ring_b, ring_b.codec
            site_b.config = ClientConfig(keys=tmp_path / "b", data=tmp_path, state=tmp_path / "state_b",
                                         round_timeout=30)
            old = ring_b.fingerprint
            rotated = rotate_key(client_a, bundle_a, load_envelope_key(tmp_path / "a"), wait=30)
            assert rotated.key.epoch == 2 and rotated.key.round == 0

            weight: dict[str, float] = {}
            waiter = threading.Thread(target=lambda: weight.update(b=site_b._exchange_weight(0, 30)))
            waiter.start()  # commits under the old key first: refused, then again under the new one
            ring_a = Keyring(client_a, bundle_a)
            deadline = time.monotonic() + 30
            while "b" not in {s.name for s in client_a.status().sites if s.committed}:
                assert time.monotonic() < deadline, "site b never committed"
                time.sleep(0.05)
            client_a.commit_weight(0, ring_a.fingerprint, ring_a.codec.encrypt_scalar(10.0))
            waiter.join(timeout=30)
            assert weight == {"b": pytest.approx(30 / 40)}
            assert site_b.codec.fingerprint == rotated.key.fingerprint != old

