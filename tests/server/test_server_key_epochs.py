"""CKKS key epochs in the coordinator: the first key from a site, envelopes relayed unopened, a
rotation only at a round boundary with the state re-encrypted, old-epoch ciphertexts refused
(real TenSEAL, real envelopes, real SQLite; no network)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedfms_secure.keys import pki
from fedfms_secure.he.ckks import new_secret_context, serialize_site_context
from fedfms_secure.he.codec import make_site_codec, make_aggregator
from fedfms_secure.keys.envelope import open_envelope, seal_for_sites
from fedfms_secure.keys.bundle import load_bundle, load_envelope_key
from fedfms_secure.he.packing import fit_params
from fedfms_secure.he.rekey import reencrypt_chunks
from fedfms_secure.errors import CryptoError, FederationError
from fedfms_secure.protocol import PHASE_UPLOAD, Chunk, KeyPublication, Plan, SealedEnvelope
from fedfms_secure.server.coordinator import Coordinator
from fedfms_secure.server.store import StateStore

from federation_kit import provision_sites

SITES = ("a", "b", "c")


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("epochs")
    params = fit_params(bound=1.0, sites=len(SITES), rounds=4)
    provision_sites(root, SITES, federation="ep", params=params, he_dealer=False)
    return root


def coordinator(fed: Path, state: Path, rounds: int = 3) -> Coordinator:
    server = load_bundle(fed / "server", role="server")
    assert server.fingerprint is None  # no key exists when the bundles are made
    plan = Plan("ep", rounds, "fedmsa", "tiny", 0, 1, 4, 1e-3, "ckks")
    aggregator = make_aggregator("ckks", server.context(), None, params=server.params)
    return Coordinator(plan, SITES, aggregator, None, StateStore(state))


def new_key(fed: Path, sender: str, epoch: int, recipients=("a", "b", "c")):
    """A fresh context made at ``sender``, its codec and one envelope per other recipient."""
    bundle = load_bundle(fed / sender, role="client")
    context = serialize_site_context(new_secret_context(bundle.params))
    envelopes = seal_for_sites(
        context, federation=bundle.federation, epoch=epoch, params=bundle.params, sender=sender,
        sender_key=pki.private_key_from_pem(bundle.key_pem, source="tls.key"), sender_cert_pem=bundle.cert_pem,
        recipients={n: bundle.envelope_keys[n] for n in recipients},
    )
    from fedfms_secure.he.ckks import context_fingerprint, load_context

    ctx = load_context(context, source="new")
    codec = make_site_codec("ckks", ctx, context_fingerprint(ctx), params=bundle.params)
    return codec, envelopes


def items(envelopes):
    return [SealedEnvelope(name, payload) for name, payload in envelopes.items()]


def state_chunks(codec, round_, vec):
    payloads = codec.encrypt_vector(vec)
    step = codec.chunk_values
    return [Chunk(round_, i, len(payloads), min(step, vec.size - i * step), codec.fingerprint, p, vec.size)
            for i, p in enumerate(payloads)]


def run_round(coord, codec, round_, vec):
    for site in SITES:
        coord.commit_weight(site, round_, codec.fingerprint, codec.encrypt_scalar(10.0))
    for site in SITES:
        coord.receive_upload(site, state_chunks(codec, round_, vec / 3))


def global_chunks(coord, round_):
    return [coord.global_chunk(round_, i) for i in range(coord.global_state("a", round_))]


def test_no_commit_before_the_first_key_and_envelopes_wait_for_he_init(fed, tmp_path):
    coord = coordinator(fed, tmp_path / "s")
    assert coord.key.epoch == 0 and coord.status().key.epoch == 0
    assert coord.join("a", "") == 0  # a site without a key may join, and waits
    with pytest.raises(FederationError, match="waiting for keys he-init") as info:
        coord.commit_weight("a", 0, "ab" * 32, b"x")
    assert info.value.code == "failed_precondition"
    with pytest.raises(FederationError, match="waiting for keys he-init") as info:
        coord.envelope("b", 0)
    assert info.value.code == "not_found"
    with pytest.raises(FederationError, match="CKKS context mismatch"):
        coord.join("a", "cd" * 32)  # a context this federation never used


def test_first_key_is_relayed_unopened_and_then_rounds_run(fed, tmp_path):
    coord = coordinator(fed, tmp_path / "s")
    codec, envelopes = new_key(fed, "a", 1)
    ack = coord.publish_keys("a", KeyPublication(1, codec.fingerprint, 0, "", 2, 0), items(envelopes))
    assert (ack.key.epoch, ack.key.site, ack.key.round, ack.envelopes) == (1, "a", 0, 2)
    assert coord.status().key == ack.key and coord.fingerprint == codec.fingerprint
    # each site gets exactly its own sealed bytes, and opens them with its envelope key
    for name in ("b", "c"):
        got = coord.envelope(name, 0)
        assert got.payload == envelopes[name] and got.key == ack.key
        bundle = load_bundle(fed / name, role="client")
        opened = open_envelope(got.payload, recipient=name, recipient_key=load_envelope_key(fed / name),
                               federation="ep", sites=SITES, ca_pem=bundle.ca_pem, params=bundle.params, epoch=1,
                               fingerprint=codec.fingerprint)
        assert opened.header.sender == "a"
    with pytest.raises(FederationError, match="made key epoch 1 itself") as info:
        coord.envelope("a", 0)
    assert info.value.code == "not_found"
    # the envelopes sit in the server's database as opaque bytes: no key of the server opens them
    db = sqlite3.connect(tmp_path / "s" / "state.db")
    stored = dict(db.execute("SELECT site, envelope FROM envelopes").fetchall())
    db.close()
    assert sorted(stored) == ["b", "c"]
    with pytest.raises(CryptoError, match="does not decrypt"):
        bundle = load_bundle(fed / "b", role="client")
        open_envelope(stored["b"], recipient="b", recipient_key=pki.new_envelope_key(), federation="ep",
                      sites=SITES, ca_pem=bundle.ca_pem, params=bundle.params)
    vec = np.linspace(-0.3, 0.3, codec.chunk_values + 5)
    run_round(coord, codec, 0, vec)
    assert coord.status().round == 1
    np.testing.assert_allclose(codec.decrypt_vector([c.payload for c in global_chunks(coord, 1)], vec.size), vec,
                               atol=4 * codec.step)


def test_bad_publications_are_refused_and_leave_nothing(fed, tmp_path):
    coord = coordinator(fed, tmp_path / "s")
    codec, envelopes = new_key(fed, "a", 1)
    cases = [
        (KeyPublication(2, codec.fingerprint, 0, "", 2, 0), items(envelopes), "cannot start"),
        (KeyPublication(1, codec.fingerprint, 3, "", 2, 0), items(envelopes), "made for round 3"),
        (KeyPublication(1, "zz", 0, "", 2, 0), items(envelopes), "not a CKKS context fingerprint"),
        (KeyPublication(1, codec.fingerprint, 0, "", 2, 1), items(envelopes), "has 0 chunks"),
        (KeyPublication(1, codec.fingerprint, 0, "", 3, 0), items(envelopes), "announced 3 envelopes"),
        (KeyPublication(1, codec.fingerprint, 0, "", 1, 0), [SealedEnvelope("a", envelopes["b"])], "to itself"),
        (KeyPublication(1, codec.fingerprint, 0, "", 1, 0), [SealedEnvelope("zed", envelopes["b"])], "not a site"),
        (KeyPublication(1, codec.fingerprint, 0, "", 2, 0), [SealedEnvelope("b", envelopes["b"])] * 2, "two envelopes"),
        (KeyPublication(1, codec.fingerprint, 0, "", 1, 0), [SealedEnvelope("c", envelopes["b"])], "recipient"),
        (KeyPublication(1, codec.fingerprint, 0, "", 1, 0), [SealedEnvelope("b", b"{not json")], "not JSON"),
    ]
    for publication, stream, message in cases:
        with pytest.raises(FederationError, match=message):
            coord.publish_keys("a", publication, stream)
    # an envelope header that names another sender than the publishing site
    with pytest.raises(FederationError, match="sender/recipient"):
        coord.publish_keys("b", KeyPublication(1, codec.fingerprint, 0, "", 1, 0), [SealedEnvelope("c", envelopes["c"])])
    assert coord.key.epoch == 0
    db = sqlite3.connect(tmp_path / "s" / "state.db")
    assert db.execute("SELECT COUNT(*) FROM envelopes").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM key_epochs").fetchone()[0] == 0
    db.close()


def test_rotation_only_at_a_round_boundary_and_old_ciphertexts_refused(fed, tmp_path):
    coord = coordinator(fed, tmp_path / "s", rounds=3)
    old, envelopes = new_key(fed, "a", 1)
    coord.publish_keys("a", KeyPublication(1, old.fingerprint, 0, "", 2, 0), items(envelopes))
    vec = np.linspace(-0.2, 0.4, old.chunk_values + 9)
    run_round(coord, old, 0, vec)
    new, envelopes2 = new_key(fed, "b", 2)
    state = reencrypt_chunks(old, new, global_chunks(coord, 1))
    publication = KeyPublication(2, new.fingerprint, 1, old.fingerprint, 2, len(state))
    # round 1 has a commit: no rotation now
    coord.commit_weight("c", 1, old.fingerprint, old.encrypt_scalar(5.0))
    with pytest.raises(FederationError, match="round boundary") as info:
        coord.publish_keys("b", publication, [*items(envelopes2), *state])
    assert info.value.code == "failed_precondition" and coord.key.epoch == 1
    # a fresh coordinator at the same boundary state (before any commit) accepts it atomically
    coord2 = coordinator(fed, tmp_path / "s2", rounds=3)
    coord2.publish_keys("a", KeyPublication(1, old.fingerprint, 0, "", 2, 0), items(envelopes))
    run_round(coord2, old, 0, vec)
    before = global_chunks(coord2, 1)
    reference = old.decrypt_vector([c.payload for c in before], vec.size)
    state = reencrypt_chunks(old, new, before)
    with pytest.raises(FederationError, match="chunk 1 .* does not fit"):  # the state must come in order
        coord2.publish_keys("b", publication, [*items(envelopes2), state[1], state[0]])
    ack = coord2.publish_keys("b", publication, [*items(envelopes2), *state])
    assert (ack.key.epoch, ack.key.round, ack.key.site, ack.state_chunks) == (2, 1, "b", len(state))
    after = global_chunks(coord2, 1)
    assert {c.fingerprint for c in after} == {new.fingerprint}
    np.testing.assert_array_equal(new.decrypt_vector([c.payload for c in after], vec.size), reference)
    with pytest.raises(CryptoError):  # the old key cannot read the new state
        old.decrypt_vector([c.payload for c in after], vec.size)
    # a ciphertext under the old key is refused, naming both epochs and fingerprints
    with pytest.raises(FederationError) as info:
        coord2.commit_weight("c", 1, old.fingerprint, old.encrypt_scalar(5.0))
    message = str(info.value)
    assert info.value.code == "failed_precondition"
    assert "epoch 1" in message and "epoch 2" in message and old.fingerprint in message and new.fingerprint in message
    # the same bytes relabelled with the new fingerprint do not get in either: the key differs
    forged = bytearray(old.encrypt_scalar(5.0))
    forged[5:37] = bytes.fromhex(new.fingerprint)
    coord2.commit_weight("c", 1, new.fingerprint, bytes(forged))  # the server cannot tell (no key) ...
    for site in ("a", "b"):
        coord2.commit_weight(site, 1, new.fingerprint, new.encrypt_scalar(5.0))
    assert coord2.status().phase == PHASE_UPLOAD
    with pytest.raises(CryptoError, match="another key"):  # ... but every site can
        new.decrypt_scalar(coord2.weight_total("a", 1).payload)
    # the previous site's envelope is replaced by the new epoch's; the maker of epoch 2 has none
    assert coord2.envelope("a", 0).payload == envelopes2["a"]
    with pytest.raises(FederationError, match="current key epoch"):
        coord2.envelope("b", 1)
    # a restart resumes at epoch 2
    restarted = coordinator(fed, tmp_path / "s2", rounds=3)
    assert restarted.key == ack.key and restarted.fingerprint == new.fingerprint


def test_the_key_label_of_a_chunk_is_not_cryptographic(fed, tmp_path):
    """What the fingerprint on a chunk proves: nothing about the key. A ciphertext made under
    another key of the same parameters (e.g. the replaced epoch's), labelled with the current
    fingerprint, parses, adds and enters the sum: the server holds no key and cannot tell. Every
    site then refuses the round's sum when it decrypts it (the packed coefficients lie off their
    integer grid), so the forgery spoils a round visibly but never becomes a model. The label
    only catches honest mistakes (a site on a stale key); a member could do the same harm under
    the current key. The one party holding only an old key is a site that a rotation left out,
    i.e. one that ``keys revoke`` removed (``keys rotate-he --crl`` leaves the revoked sites out),
    and a revoked certificate is refused before any call reaches the coordinator
    (tests/keys/test_keys_revocation.py)."""
    coord = coordinator(fed, tmp_path / "s")
    codec, envelopes = new_key(fed, "a", 1)
    coord.publish_keys("a", KeyPublication(1, codec.fingerprint, 0, "", 2, 0), items(envelopes))
    stale, _ = new_key(fed, "b", 2)  # another context, same parameters: never published
    vec = np.linspace(-0.3, 0.3, codec.chunk_values + 5)
    for site in SITES:
        coord.commit_weight(site, 0, codec.fingerprint, codec.encrypt_scalar(10.0))
    coord.receive_upload("a", state_chunks(codec, 0, vec / 3))
    coord.receive_upload("b", state_chunks(codec, 0, vec / 3))
    # both labels rewritten: the chunk header's and the payload's own (bytes 5..37, see he/payload.py)
    relabel = bytes.fromhex(codec.fingerprint)
    forged = [Chunk(**{**c.__dict__, "fingerprint": codec.fingerprint,
                       "payload": c.payload[:5] + relabel + c.payload[37:]})
              for c in state_chunks(stale, 0, vec / 3)]
    coord.receive_upload("c", forged)  # accepted: the label matches, the ciphertext is well formed
    assert coord.status().round == 1
    # no site takes the spoiled sum for a model: decryption checks the packed coefficients' noise
    with pytest.raises(CryptoError, match="encrypted under another key"):
        codec.decrypt_vector([c.payload for c in global_chunks(coord, 1)], vec.size)
