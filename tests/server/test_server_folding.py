"""Uploads folded into the round's sum as they arrive, and rounds closed by a thread of their own:
real CKKS ciphertexts, real SQLite and pack files, no network."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedfms_secure.errors import FederationError
from fedfms_secure.he.ckks import CkksParams, context_fingerprint, load_context, new_secret_context, serialize_params_only
from fedfms_secure.he.codec import make_site_codec
from fedfms_secure.protocol import PHASE_UPLOAD
from fedfms_secure.server.coordinator import Coordinator
from fedfms_secure.server.store import StateStore

from test_server_coordinator import SITES, chunks, global_vector, make_coordinator

VALUES = 3  # chunks per update


@pytest.fixture(scope="module")
def keys():
    ctx = new_secret_context(CkksParams())
    fp = context_fingerprint(ctx)
    return make_site_codec("ckks", ctx, fp), load_context(serialize_params_only(ctx), source="test"), fp


def _commit(coord, codec, round_):
    for site in SITES:
        coord.commit_weight(site, round_, codec.fingerprint, codec.encrypt_scalar(1))


def _wait_round(coord, round_):
    deadline = time.monotonic() + 30
    while coord.status().round < round_:
        assert time.monotonic() < deadline, f"round {round_ - 1} did not close"
        time.sleep(0.01)


def test_a_stream_that_breaks_half_way_leaves_no_trace_in_the_sum_while_another_goes_on(tmp_path, keys):
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys)
    _commit(coord, codec, 0)
    length = VALUES * codec.chunk_values
    good_a = chunks(codec, 0, np.full(length, 0.5))
    good_b = chunks(codec, 0, np.full(length, 0.25))
    b_half = threading.Event()
    a_broke = threading.Event()
    errors = []

    def b_stream():  # b folds its first two chunks, waits while a breaks, then ends
        yield from good_b[:2]
        b_half.set()
        assert a_broke.wait(30)
        yield good_b[2]

    def run_b():
        try:
            coord.receive_upload("b", b_stream())
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run_b)
    thread.start()
    assert b_half.wait(30)
    big = chunks(codec, 0, np.full(length, 100.0))

    def a_breaks():  # two chunks of a wrong update fold, then the stream fails
        yield from big[:2]
        raise ConnectionError("the site went away")

    with pytest.raises(ConnectionError):
        coord.receive_upload("a", a_breaks())
    a_broke.set()
    thread.join(30)
    assert not errors
    assert [s.uploaded for s in coord.status().sites] == [False, True]
    assert not any(p.name.startswith("upload") and p.suffix == ".tmp" for p in (tmp_path / "packs").iterdir())
    coord.receive_upload("a", good_a)
    np.testing.assert_allclose(global_vector(coord, codec, 1), np.full(length, 0.75), atol=1e-6)


def test_the_last_upload_returns_before_its_round_closes_in_the_background(tmp_path, keys):
    codec, server_ctx, fp = keys
    base = make_coordinator(tmp_path, keys, rounds=3)
    coord = Coordinator(base.plan, SITES, base._aggregator, fp, StateStore(tmp_path), background_close=True)
    for round_, value in ((0, 0.5), (1, 0.25)):
        _commit(coord, codec, round_)
        for site in SITES:
            coord.receive_upload(site, chunks(codec, round_, np.full(VALUES * codec.chunk_values, value / 2)))
        _wait_round(coord, round_ + 1)
    # the state that opens round 2 is theta_0's delta plus both rounds' sums, in one pack
    np.testing.assert_allclose(global_vector(coord, codec, 2), np.full(VALUES * codec.chunk_values, 0.75), atol=1e-6)
    deadline = time.monotonic() + 10  # the closed rounds' uploads are collected, just after the round opens
    while list((tmp_path / "packs").glob("upload-*")):
        assert time.monotonic() < deadline, "the closed rounds' upload packs stayed on disk"
        time.sleep(0.01)
    assert len(list((tmp_path / "packs").glob("global-*"))) == 2  # the newest two states
    assert coord.contributed_rounds("a") == [0, 1]
    coord.stop_closer(timeout=10)


def test_a_restart_in_round_one_resumes_from_the_stored_state_and_the_accepted_uploads(tmp_path, keys):
    codec = keys[0]
    coord = make_coordinator(tmp_path, keys, rounds=3)
    length = 2 * codec.chunk_values
    _commit(coord, codec, 0)
    for site in SITES:
        coord.receive_upload(site, chunks(codec, 0, np.full(length, 0.25)))
    _commit(coord, codec, 1)
    coord.receive_upload("a", chunks(codec, 1, np.full(length, 0.125)))
    # as if killed here: a fresh coordinator on the same folder, with a half-written pack left over
    (tmp_path / "packs" / "upload-leftover.pack.tmp").write_bytes(b"partial")
    restarted = make_coordinator(tmp_path, keys, rounds=3)
    status = restarted.status()
    assert (status.round, status.phase) == (1, PHASE_UPLOAD)
    assert [s.uploaded for s in status.sites] == [True, False]
    assert not (tmp_path / "packs" / "upload-leftover.pack.tmp").exists()
    with pytest.raises(FederationError, match="different update"):
        restarted.receive_upload("a", chunks(codec, 1, np.full(length, 0.5)))
    restarted.receive_upload("b", chunks(codec, 1, np.full(length, 0.125)))
    np.testing.assert_allclose(global_vector(restarted, codec, 2), np.full(length, 0.75), atol=1e-6)
