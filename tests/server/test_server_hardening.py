"""Attacks by an authenticated site, replayed against a real server on 127.0.0.1 (mutual TLS, CKKS):
each must do no harm to the other sites or to the server's disk."""

from __future__ import annotations

import json
import math
import threading
import time

import grpc
import numpy as np
import pytest

from fedfms_secure.errors import FederationError
from fedfms_secure.he.codec import make_site_codec
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.protocol import Chunk
from fedfms_secure.server.daemon import ServerLimits
from fedfms_secure.server.plan_sizes import plan_vector_length
from fedfms_secure.transport import serde
from fedfms_secure.v1 import federation_pb2 as pb

from federation_kit import provision_sites, running_server, site_client, site_stub

LENGTH = plan_vector_length("tiny", "fedmsa")  # the plan the test server runs (ServerConfig's defaults)


@pytest.fixture()
def federation(tmp_path):
    provision_sites(tmp_path, ["a", "b"], federation="t", he_dealer=True)
    limits = ServerLimits(workers=8, per_site_calls=4, idle_timeout=2.0)
    with running_server(tmp_path / "server", tmp_path / "state", limits, rounds=2) as address:
        yield tmp_path, address


def _codec(root, site):
    b = load_bundle(root / site, role="client")
    return make_site_codec("ckks", b.context(), b.fingerprint, params=b.params)


def _chunks(codec, round_, vec):
    payloads = codec.encrypt_vector(vec)
    step = codec.chunk_values
    return [Chunk(round_, i, len(payloads), min(step, vec.size - i * step), codec.fingerprint, p, vec.size)
            for i, p in enumerate(payloads)]


def _commit_all(root, address, codecs):
    for site, codec in codecs.items():
        with site_client(address, root / site, timeout=10) as client:
            client.commit_weight(0, codec.fingerprint, codec.encrypt_scalar(1.0))


def _blobs(root) -> set[str]:
    """Every file that holds ciphertexts: blobs, and packs (staged uploads, global states)."""
    state = root / "state"
    return {p.name for p in [*(state / "blobs").glob("*/*"), *(state / "packs").glob("*")]}


def _wait_for_round(client, round_: int) -> None:
    """The server closes a round apart from the call that brought its last upload: wait, as a site does."""
    deadline = time.monotonic() + 20
    while client.status().round < round_:
        assert time.monotonic() < deadline, f"round {round_ - 1} did not close"
        time.sleep(0.05)


@pytest.mark.parametrize("rpc, most_held", [("UploadUpdate", 1), ("PublishKeys", 4)])
def test_silent_streams_of_one_site_stall_no_one(federation, rpc, most_held):
    """16 client streams that send nothing: before, each held one of the server's worker threads
    until its deadline. Now the coordinator holds one upload per site (a second is refused before
    it is read), the interceptor at most 4 calls per site, and a silent stream is cancelled."""
    root, address = federation
    channel, stub = site_stub(address, root / "a")
    release = threading.Event()

    def silent():
        release.wait(30)
        return
        yield  # a generator that sends nothing

    calls = [getattr(stub, rpc).future(silent(), timeout=30) for _ in range(16)]
    try:
        time.sleep(0.5)
        with site_client(address, root / "b", timeout=5) as other:
            for _ in range(3):  # another site's calls answer at once, again and again
                started = time.monotonic()
                assert other.status().federation == "t"
                assert time.monotonic() - started < 1.0
        refused = [c.exception().code() for c in calls if c.done()]
        assert len(refused) >= 16 - most_held  # refused before they read anything
        assert set(refused) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
        # the held streams send nothing: they are cancelled after the idle timeout, freeing their slots
        deadline = time.monotonic() + 10
        while not all(c.done() for c in calls):
            assert time.monotonic() < deadline, "a silent stream was never cancelled"
            time.sleep(0.1)
        with site_client(address, root / "a", timeout=5) as same:
            assert same.status().round == 0
    finally:
        release.set()
        channel.close()


def test_a_refused_or_aborted_upload_leaves_no_staged_chunk(federation):
    root, address = federation
    codecs = {s: _codec(root, s) for s in ("a", "b")}
    _commit_all(root, address, codecs)
    before = _blobs(root)
    good = _chunks(codecs["a"], 0, np.zeros(LENGTH))
    bad = [*good[:3], Chunk(**{**good[3].__dict__, "payload": good[3].payload[:-100]})]
    with site_client(address, root / "a", timeout=20) as client:
        with pytest.raises(FederationError, match="not a valid ciphertext") as info:
            client.upload(lambda: bad)
        assert info.value.code == "invalid_argument"
        assert _blobs(root) == before  # the three valid chunks it staged are gone
    # a stream that stops half-way (the site cancels it) leaves nothing either
    channel, stub = site_stub(address, root / "a")
    sent = threading.Event()

    def half():
        for chunk in good[:4]:
            yield serde.chunk_to_proto(chunk)
        sent.set()
        time.sleep(30)

    call = stub.UploadUpdate.future(half(), timeout=30)
    assert sent.wait(10)
    time.sleep(0.5)
    call.cancel()
    deadline = time.monotonic() + 5
    while _blobs(root) != before:
        assert time.monotonic() < deadline, "the staged chunks of a cancelled upload stayed on disk"
        time.sleep(0.1)
    channel.close()
    with site_client(address, root / "a", timeout=20) as client:  # the genuine upload still goes through
        assert client.upload(lambda: good).chunks == len(good)


def test_a_short_first_upload_does_not_fix_the_vector_length(federation):
    root, address = federation
    codecs = {s: _codec(root, s) for s in ("a", "b")}
    _commit_all(root, address, codecs)
    with site_client(address, root / "a", timeout=20) as client:
        with pytest.raises(FederationError, match=f"the federation's vector has {LENGTH}") as info:
            client.upload(lambda: _chunks(codecs["a"], 0, np.full(5, 1e-3)))
        assert info.value.code == "invalid_argument"
    for site in ("a", "b"):  # every genuine upload is still accepted, and the round closes
        with site_client(address, root / site, timeout=20) as client:
            client.upload(lambda site=site: _chunks(codecs[site], 0, np.full(LENGTH, 1e-3)))
    with site_client(address, root / "b", timeout=20) as client:
        _wait_for_round(client, 1)
        assert client.status().round == 1
        assert client.global_state(1)[0].vector_length == LENGTH


def test_metrics_reports_carry_only_what_the_server_knows(federation):
    """A site's scores never reach the server's files: a Dice (or epsilon, loss, ...) is refused
    with INVALID_ARGUMENT and nothing is written; contributed and bytes are accepted once."""
    root, address = federation
    codecs = {s: _codec(root, s) for s in ("a", "b")}
    _commit_all(root, address, codecs)
    for site in ("a", "b"):
        with site_client(address, root / site, timeout=20) as client:
            client.upload(lambda site=site: _chunks(codecs[site], 0, np.zeros(LENGTH)))
    metrics_file = root / "state" / "metrics.jsonl"
    known = {"contributed": 1.0, "bytes_up": 1234.0, "bytes_down": 5678.0}
    with site_client(address, root / "a", timeout=10) as client:
        _wait_for_round(client, 1)
        for leaky in ({"dice": 0.5}, {**known, "dice": 0.5}, {**known, "epsilon": 3.0}, {"dice_local": 0.4},
                      {"hd95": 3.0, "iou": 0.2, "loss": 1.0}, {f"m{i}": 1.0 for i in range(65)}, {"x" * 1000: 1.0},
                      {"bad\nname": 1.0}, {"round": 7.0}):
            with pytest.raises(FederationError, match="not accepted: a site reports to the server only "
                                                      "contributed, bytes_up, bytes_down") as info:
                client.report_metrics(0, leaky)
            assert info.value.code == "invalid_argument"
        for bad in ({"contributed": 0.5}, {"bytes_up": -1.0}, {"bytes_down": math.nan}, {"bytes_up": math.inf}):
            with pytest.raises(FederationError, match="out of range") as info:
                client.report_metrics(0, bad)
            assert info.value.code == "invalid_argument"
        assert not metrics_file.exists()  # nothing refused was written
        client.report_metrics(0, known)
        for _ in range(50):  # a flood of repeats is acknowledged and not written
            client.report_metrics(0, {**known, "bytes_up": 1.0})
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert len(records) == 1
    assert set(records[0]) == {"site", "round", "time", *known} and records[0]["bytes_up"] == 1234.0
    assert metrics_file.stat().st_size < 200