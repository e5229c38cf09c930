"""The coordinator's round state machine, with real CKKS ciphertexts and no network."""

from __future__ import annotations

import numpy as np
import pytest

from fedfms_secure.he.ckks import CkksParams, context_fingerprint, load_context, new_secret_context, serialize_params_only
from fedfms_secure.he.codec import make_site_codec, make_aggregator
from fedfms_secure.errors import FederationError
from fedfms_secure.protocol import PHASE_COMMIT, PHASE_DONE, PHASE_UPLOAD, Chunk, Plan
from fedfms_secure.server.coordinator import Coordinator
from fedfms_secure.server.store import StateStore

SITES = ("a", "b")


@pytest.fixture(scope="module")
def keys():
    ctx = new_secret_context(CkksParams())
    fp = context_fingerprint(ctx)
    server_ctx = load_context(serialize_params_only(ctx), source="test")
    return make_site_codec("ckks", ctx, fp), server_ctx, fp


@pytest.fixture(scope="module")
def plain_keys():
    return make_site_codec("plain", None, "plain"), None, "plain"


def make_coordinator(tmp_path, keys, rounds=2):
    codec, server_ctx, fp = keys
    plan = Plan("t", rounds, "fedmsa", "tiny", 0, 1, 4, 1e-3, codec.scheme)
    return Coordinator(plan, SITES, make_aggregator(codec.scheme, server_ctx, fp if server_ctx else None), fp,
                       StateStore(tmp_path))


def chunks(codec, round_, vec):
    payloads = codec.encrypt_vector(vec)
    step = codec.chunk_values
    return [
        Chunk(round_, i, len(payloads), min(step, vec.size - i * step), codec.fingerprint, p, vec.size)
        for i, p in enumerate(payloads)
    ]


def run_round(coord, codec, round_, deltas, counts):
    for site, n in zip(SITES, counts):
        coord.commit_weight(site, round_, codec.fingerprint, codec.encrypt_scalar(n))
    big_n = codec.decrypt_scalar(coord.weight_total("a", round_).payload)
    assert big_n == pytest.approx(sum(counts), abs=1e-3)
    for site, n, delta in zip(SITES, counts, deltas):
        coord.receive_upload(site, chunks(codec, round_, delta * (n / round(big_n))))


def global_vector(coord, codec, round_):
    chunks = [coord.global_chunk(round_, i) for i in range(coord.global_state("a", round_))]
    assert [c.num_values for c in chunks] == [
        min(codec.chunk_values, chunks[0].vector_length - i * codec.chunk_values) for i in range(len(chunks))
    ]
    return codec.decrypt_vector([c.payload for c in chunks], chunks[0].vector_length)


@pytest.mark.parametrize("scheme", ["ckks", "plain"])
def test_two_rounds_sum_to_the_weighted_mean(tmp_path, keys, plain_keys, scheme):
    keys = keys if scheme == "ckks" else plain_keys
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys)
    rng = np.random.default_rng(0)
    size = codec.chunk_values + 17  # two chunks, the last one partial
    expected = np.zeros(size)
    for r, counts in enumerate([(10, 30), (25, 5)]):
        assert coord.status().phase == PHASE_COMMIT
        deltas = [rng.normal(0, 0.01, size) for _ in SITES]
        run_round(coord, codec, r, deltas, counts)
        expected += sum(n / sum(counts) * d for n, d in zip(counts, deltas))
        np.testing.assert_allclose(global_vector(coord, codec, r + 1), expected, atol=1e-6)
    assert coord.status().phase == PHASE_DONE
    assert [rec["round"] for rec in StateStore(tmp_path).read_records("rounds.jsonl")] == [0, 1]


def test_weight_total_waits_for_every_commit(tmp_path, keys):
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys)
    coord.commit_weight("a", 0, codec.fingerprint, codec.encrypt_scalar(3))
    assert not coord.weight_total("a", 0).ready
    coord.commit_weight("b", 0, codec.fingerprint, codec.encrypt_scalar(4))
    assert coord.weight_total("a", 0).ready
    assert coord.status().phase == PHASE_UPLOAD


def test_rejections_name_the_problem(tmp_path, keys):
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys)
    with pytest.raises(FederationError, match="not a site") as exc:
        coord.join("mallory", codec.fingerprint)
    assert exc.value.code == "permission_denied"
    with pytest.raises(FederationError, match="context mismatch") as exc:
        coord.commit_weight("a", 0, "0" * 16, codec.encrypt_scalar(1))
    assert exc.value.code == "invalid_argument"
    with pytest.raises(FederationError, match="round 1"):
        coord.commit_weight("a", 1, codec.fingerprint, codec.encrypt_scalar(1))
    with pytest.raises(FederationError, match="not a valid ciphertext") as exc:
        coord.commit_weight("a", 0, codec.fingerprint, b"garbage")
    assert exc.value.code == "invalid_argument"
    # uploading before the commit phase is over is refused
    with pytest.raises(FederationError, match="commit phase"):
        coord.receive_upload("a", chunks(codec, 0, np.zeros(3)))
    with pytest.raises(FederationError, match="empty upload"):
        coord.receive_upload("a", [])


def test_bad_streams_are_rejected_and_leave_nothing_behind(tmp_path, keys):
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys)
    for site in SITES:
        coord.commit_weight(site, 0, codec.fingerprint, codec.encrypt_scalar(1))
    good = chunks(codec, 0, np.zeros(codec.chunk_values * 2))
    with pytest.raises(FederationError, match="expected"):
        coord.receive_upload("a", [good[1], good[0]])
    with pytest.raises(FederationError, match="ended after 1 of 2"):
        coord.receive_upload("a", good[:1])
    truncated = [good[0], Chunk(**{**good[1].__dict__, "payload": good[1].payload[:1000]})]
    with pytest.raises(FederationError, match="not a valid ciphertext"):
        coord.receive_upload("a", truncated)
    assert not coord.status().sites[0].uploaded
    assert not (tmp_path / "uploads" / "round_0" / "a").exists()
    # the same upload twice gets the same receipt; a different one is refused
    first = coord.receive_upload("a", good)
    assert coord.receive_upload("a", good) == first
    other = chunks(codec, 0, np.ones(codec.chunk_values * 2) * 0.1)
    with pytest.raises(FederationError, match="different update"):
        coord.receive_upload("a", other)


def test_chunk_layout_must_match_the_vector_length(tmp_path, keys):
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys)
    for site in SITES:
        coord.commit_weight(site, 0, codec.fingerprint, codec.encrypt_scalar(1))
    good = chunks(codec, 0, np.zeros(10))
    lying_length = [Chunk(**{**good[0].__dict__, "vector_length": 100, "num_values": 10})]
    with pytest.raises(FederationError, match="100-value vector holds 100 values, not 10"):
        coord.receive_upload("a", lying_length)
    too_many = [Chunk(**{**good[0].__dict__, "total": 2})]
    with pytest.raises(FederationError, match="travels in 1 chunks"):
        coord.receive_upload("a", too_many)
    coord.receive_upload("a", good)
    other_length = chunks(codec, 0, np.zeros(11))
    with pytest.raises(FederationError, match="federation's vector has 10"):
        coord.receive_upload("b", other_length)
    assert coord.status().round == 0  # nothing half-folded closed the round


def test_a_malformed_commit_is_refused_and_the_round_goes_on(tmp_path, keys):
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys)
    two_values = codec.encrypt_vector(np.array([1.0, 2.0]))[0]
    with pytest.raises(FederationError, match="holds one value") as exc:
        coord.commit_weight("a", 0, codec.fingerprint, two_values)
    assert exc.value.code == "invalid_argument"
    coord.commit_weight("a", 0, codec.fingerprint, codec.encrypt_scalar(3))
    coord.commit_weight("a", 0, codec.fingerprint, codec.encrypt_scalar(4))  # a re-commit replaces it
    ack = coord.commit_weight("b", 0, codec.fingerprint, codec.encrypt_scalar(5))
    assert (ack.committed, ack.expected) == (2, 2)
    assert codec.decrypt_scalar(coord.weight_total("b", 0).payload) == pytest.approx(9, abs=1e-3)
    # once E(N) is formed, a retried commit gets the same ack and changes nothing
    assert coord.commit_weight("a", 0, codec.fingerprint, codec.encrypt_scalar(100)).committed == 2
    assert codec.decrypt_scalar(coord.weight_total("b", 0).payload) == pytest.approx(9, abs=1e-3)


def test_only_what_the_server_knows_is_reported(tmp_path, keys):
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys, rounds=1)
    run_round(coord, codec, 0, [np.zeros(4), np.zeros(4)], (1, 1))
    with pytest.raises(FederationError, match="'round' not accepted"):
        coord.report_metrics("a", 0, {"round": 7.0, "bytes_up": 1.0})
    with pytest.raises(FederationError, match="'dice' not accepted"):
        coord.report_metrics("a", 0, {"dice": 0.5})
    coord.report_metrics("a", 0, {"bytes_up": 1.0, "contributed": 1.0})
    records = StateStore(tmp_path).read_records("metrics.jsonl")
    assert [(r["site"], r["round"], r["bytes_up"]) for r in records] == [("a", 0, 1.0)]
    assert "dice" not in records[0]
    with pytest.raises(FederationError, match="has not closed"):
        make_coordinator(tmp_path / "other", keys).report_metrics("a", 0, {"bytes_up": 1.0})


def test_a_restarted_coordinator_resumes_at_the_stored_round(tmp_path, keys):
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys, rounds=3)
    delta = np.full(5, 0.25)
    run_round(coord, codec, 0, [delta, delta], (2, 2))
    restarted = make_coordinator(tmp_path, keys, rounds=3)
    assert (restarted.status().round, restarted.status().phase) == (1, PHASE_COMMIT)
    run_round(restarted, codec, 1, [delta, delta], (1, 3))
    np.testing.assert_allclose(global_vector(restarted, codec, 2), 2 * delta, atol=1e-6)
    with pytest.raises(FederationError, match="federation's vector has 5"):
        for site in SITES:
            restarted.commit_weight(site, 2, codec.fingerprint, codec.encrypt_scalar(1))
        restarted.receive_upload("a", chunks(codec, 2, np.zeros(6)))


def test_a_second_stream_from_the_same_site_waits_for_the_first(tmp_path, keys):
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys)
    for site in SITES:
        coord.commit_weight(site, 0, codec.fingerprint, codec.encrypt_scalar(1))
    first = chunks(codec, 0, np.ones(codec.chunk_values + 1))
    second = chunks(codec, 0, np.full(codec.chunk_values + 1, 5.0))
    refusals = []

    def slow_stream():
        yield first[0]
        try:  # the same site retries while its first stream is still open
            coord.receive_upload("a", second)
        except FederationError as exc:
            refusals.append(str(exc))
        yield first[1]

    coord.receive_upload("a", slow_stream())
    assert refusals and "still in progress" in refusals[0]
    coord.receive_upload("b", chunks(codec, 0, np.zeros(codec.chunk_values + 1)))
    np.testing.assert_allclose(global_vector(coord, codec, 1), np.ones(codec.chunk_values + 1), atol=1e-6)


def test_a_damaged_blob_is_discarded_on_restart_and_never_used(tmp_path, keys):
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys)
    for site in SITES:
        coord.commit_weight(site, 0, codec.fingerprint, codec.encrypt_scalar(1))
    coord.receive_upload("a", chunks(codec, 0, np.full(6, 0.5)))
    store = StateStore(tmp_path)
    path = store.pack_path(store.uploads(0)["a"].pack)
    path.write_bytes(path.read_bytes()[:1000])  # half-written
    leftover = path.with_name(".crash.tmp")
    leftover.write_bytes(b"partial")

    restarted = make_coordinator(tmp_path, keys)
    assert not leftover.exists()
    status = restarted.status()
    assert status.phase == PHASE_UPLOAD and [s.uploaded for s in status.sites] == [False, False]
    # the site sends its update again, and the sum holds only what was really received
    restarted.receive_upload("a", chunks(codec, 0, np.full(6, 0.5)))
    restarted.receive_upload("b", chunks(codec, 0, np.full(6, 0.25)))
    np.testing.assert_allclose(global_vector(restarted, codec, 1), np.full(6, 0.75), atol=1e-6)


def test_a_crash_between_two_writes_does_not_stall_the_round(tmp_path, keys):
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys)
    for site in SITES:
        coord.commit_weight(site, 0, codec.fingerprint, codec.encrypt_scalar(1))
    StateStore(tmp_path).set_state(phase=PHASE_COMMIT)  # as if it died before recording the phase
    restarted = make_coordinator(tmp_path, keys)
    assert restarted.weight_total("a", 0).ready  # every commit is in: the round goes on

    restarted.receive_upload("a", chunks(codec, 0, np.full(3, 0.5)))
    store = restarted._store

    def dies(*args, **kwargs):
        raise OSError("disk gone")

    store.put_global, keep = dies, store.put_global
    with pytest.raises(OSError):
        restarted.receive_upload("b", chunks(codec, 0, np.full(3, 0.25)))
    store.put_global = keep
    again = make_coordinator(tmp_path, keys)  # b's upload was stored before the crash
    assert again.status().round == 1
    np.testing.assert_allclose(global_vector(again, codec, 1), np.full(3, 0.75), atol=1e-6)


def test_uploads_past_the_round_quota_are_refused_and_leave_nothing(tmp_path, keys):
    codec, server_ctx, fp = keys
    vec = np.full(codec.chunk_values + 3, 0.1)
    one_upload = sum(len(c.payload) for c in chunks(codec, 0, vec))
    plan = Plan("t", 2, "fedmsa", "tiny", 0, 1, 4, 1e-3, codec.scheme)
    coord = Coordinator(plan, SITES, make_aggregator(codec.scheme, server_ctx, fp), fp, StateStore(tmp_path),
                        round_quota_bytes=one_upload * 7 // 4, vector_length=vec.size)  # room for b's first chunk only
    for site in SITES:
        coord.commit_weight(site, 0, codec.fingerprint, codec.encrypt_scalar(1))
    coord.receive_upload("a", chunks(codec, 0, vec))
    blobs = {p.name for p in (tmp_path / "blobs").glob("*/*")}
    with pytest.raises(FederationError, match="disk quota") as exc:
        coord.receive_upload("b", chunks(codec, 0, vec))
    assert exc.value.code == "resource_exhausted"
    assert {p.name for p in (tmp_path / "blobs").glob("*/*")} == blobs  # b's first chunk was deleted at once
    assert [s.uploaded for s in coord.status().sites] == [True, False]


def test_the_plans_vector_length_holds_from_the_first_upload(tmp_path, keys):
    codec, server_ctx, fp = keys
    plan = Plan("t", 2, "fedmsa", "tiny", 0, 1, 4, 1e-3, codec.scheme)
    coord = Coordinator(plan, SITES, make_aggregator(codec.scheme, server_ctx, fp), fp, StateStore(tmp_path),
                        vector_length=7)
    for site in SITES:
        coord.commit_weight(site, 0, codec.fingerprint, codec.encrypt_scalar(1))
    with pytest.raises(FederationError, match="the federation's vector has 7") as exc:
        coord.receive_upload("a", chunks(codec, 0, np.full(5, 0.1)))
    assert exc.value.code == "invalid_argument"
    for site in SITES:
        coord.receive_upload(site, chunks(codec, 0, np.full(7, 0.1)))
    assert coord.status().round == 1
