"""Fuzzing the gRPC face of the coordinator: well-formed protobuf messages with random field values.

A real server (``serve()`` in a thread, mutual TLS, real CKKS) receives at least ``CALLS`` messages
on every RPC of ``fedfms_secure.v1.Federation`` from four member sites and one intruder (a
certificate signed by the federation's CA for a name that is not a member), plus random upload
streams: random lengths, orders and headers, payloads that are valid, truncated, bit-flipped,
random, of the wrong kind or past the 4 MiB message limit. Field values are drawn so that the
federation really moves: valid commits and uploads close rounds, so both phases of a round and the
global-state stream of closed rounds are fuzzed too. The federation is provisioned without a
CKKS dealer: the keeper makes the key (he-init) before the fuzz, and ``PublishKeys`` streams are
random headers, envelopes and state chunks, now and then a genuine rotation at a round boundary
(after which the fuzzer encrypts under the new key). The RNG is seeded.

Checked: not one call ends in ``UNKNOWN`` or ``INTERNAL`` (only the deliberate codes below), every
error carries a message, the health service stays ``SERVING``, and afterwards a genuine site that
the fuzz never retired still joins and reads the status. ``Retire`` is fuzzed last, from the sites
it may retire.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedfms_secure.site.hekeys import init_key
from fedfms_secure.config import ServerConfig
from fedfms_secure.keys import pki
from fedfms_secure.he.ckks import new_secret_context, serialize_site_context
from fedfms_secure.he.codec import make_site_codec
from fedfms_secure.keys.envelope import seal_for_sites
from fedfms_secure.keys.hestore import site_key
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.he.rekey import reencrypt_chunks
from fedfms_secure.errors import CryptoError
from fedfms_secure.protocol import Chunk
from fedfms_secure.transport import serde
from fedfms_secure.he.packing import fit_params
from fedfms_secure.server.daemon import serve
from fedfms_secure.server.plan_sizes import plan_vector_length
from fedfms_secure.transport.client import FederationClient
from fedfms_secure.v1 import federation_pb2 as pb
from fedfms_secure.v1 import federation_pb2_grpc as pb_grpc

SEED = 20240808
CALLS = 1000  # per RPC
ROUNDS = 12
FUZZED = ("a", "b", "c")  # fuzzed on every RPC, Retire included
KEEPER = "d"  # fuzzed on every RPC but Retire: the genuine site of the sanity check
INTRUDER = "mallory"  # signed by the federation's CA, not a member
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
}
# RESOURCE_EXHAUSTED is deliberate only for a call that sent a message past the 4 MiB limit; for any
# other it means, e.g., an error message so long that its trailer overflows the client's metadata limit
BIG = 64 * 1024 * 1024  # the fuzzer's own send limit, so that the server is the one refusing
OVERSIZED = 4 * 1024 * 1024 + 100  # past the server's 4 MiB message limit
OVERSIZED_REFUSED = "RESOURCE_EXHAUSTED for an oversized message"


@pytest.fixture(scope="module", params=["slots", "packed"])
def federation(request, tmp_path_factory):
    """A running server; ``slots``: init_federation's default params; ``packed``: `keys init`'s default."""
    root = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    sites = [*FUZZED, KEEPER]
    kwargs = {} if request.param == "slots" else {"params": fit_params(bound=1.0, sites=len(sites), rounds=ROUNDS)}
    prov = init_federation(root / "prov", federation="fz", server_host="localhost", clients=sites, he_dealer=False,
                           **kwargs)
    export_bundle("server", None, prov, root / "server")
    for name in sites:
        export_bundle("client", name, prov, root / name)
    ca_cert = pki.load_cert(prov / "ca" / "ca.crt")
    ca_key = pki.load_private_key(prov / "ca" / "ca.key")
    key = pki.new_private_key()
    cert = pki.issue_certificate(ca_cert, ca_key, INTRUDER, key, role="client")
    intruder = (pki.pem_cert(cert), pki.pem_private_key(key))

    stop = threading.Event()
    config = ServerConfig(keys=root / "server", state=root / "state", address="127.0.0.1:0", rounds=ROUNDS)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve(config, stop)
        except BaseException as exc:  # pragma: no cover - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    address_file = root / "state" / "address.json"
    deadline = time.monotonic() + 60
    while not address_file.exists():
        assert not errors and time.monotonic() < deadline, f"server did not start: {errors}"
        time.sleep(0.05)
    address = json.loads(address_file.read_text())["address"]
    keeper = load_bundle(root / KEEPER, role="client")
    with FederationClient.from_bundle(keeper, address, call_timeout=30) as client:
        init_key(client, keeper)  # the keeper makes the CKKS key and seals it to the fuzzed sites
    yield root, address, intruder, request.param
    stop.set()
    thread.join(timeout=15)
    assert not errors, errors


def _channel(address: str, ca: bytes, cert: bytes, key: bytes) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [("grpc.ssl_target_name_override", "localhost"), ("grpc.max_send_message_length", BIG),
               ("grpc.max_receive_message_length", BIG)]
    return grpc.secure_channel(address, creds, options=options)


class Fuzzer:
    """Random but well-formed messages; records the status code and message of every call."""

    def __init__(self, root: Path, address: str, intruder: tuple[bytes, bytes]) -> None:
        self.rng = np.random.default_rng(SEED)
        bundle = self.bundle = load_bundle(root / KEEPER, role="client")
        key = site_key(bundle)
        self.epoch = 1
        self.codec = make_site_codec("ckks", key.context, key.fingerprint, params=bundle.params)
        self.fingerprint = self.codec.fingerprint
        self.channels = {name: _channel(address, bundle.ca_pem, *_pair(root / name)) for name in (*FUZZED, KEEPER)}
        self.channels[INTRUDER] = _channel(address, bundle.ca_pem, *intruder)
        self.stubs = {name: pb_grpc.FederationStub(ch) for name, ch in self.channels.items()}
        self.health = health_pb2_grpc.HealthStub(self.channels[KEEPER])
        self.outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.silent: list[tuple[str, grpc.StatusCode]] = []  # errors without a message
        self.round = 0  # the round the server is at, refreshed now and then
        self.oversized = False  # whether the next call sends a message past the limit
        self.poisoned = 0  # genuine rotations given up: a fuzzed upload spoiled the global state
        step = self.codec.chunk_values
        self.length = plan_vector_length("tiny", "fedmsa")  # the plan's vector: full chunks and a partial one
        assert self.length % step
        self._encrypt_samples()
        self._next_key()

    def _encrypt_samples(self) -> None:
        self.scalars = [self.codec.encrypt_scalar(float(n)) for n in (1, 7, 40, 300)]
        self.vectors = [
            self.codec.encrypt_vector(np.random.default_rng(i).uniform(-1e-3, 1e-3, self.length)) for i in range(3)
        ]
        # a vector of another length, for well-formed uploads of the wrong shape
        self.short = self.codec.encrypt_vector(np.full(5, 1e-4))

    def _next_key(self) -> None:
        """The keeper's next CKKS context and its envelopes, for genuine (and mutated) rotations."""
        b = self.bundle
        context = serialize_site_context(new_secret_context(b.params))
        self.next_envelopes = seal_for_sites(
            context, federation=b.federation, epoch=self.epoch + 1, params=b.params, sender=KEEPER,
            sender_key=pki.private_key_from_pem(b.key_pem, source="tls.key"), sender_cert_pem=b.cert_pem,
            recipients={n: b.envelope_keys[n] for n in FUZZED},
        )
        self.next_context = context
        from fedfms_secure.he.ckks import context_fingerprint, load_context

        ctx = load_context(context, source="next")
        self.next_codec = make_site_codec("ckks", ctx, context_fingerprint(ctx), params=b.params)

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()

    # --- the calls ------------------------------------------------------------------------------
    def call(self, rpc: str, fn: Callable[[], Any]) -> Any:
        oversized, self.oversized = self.oversized, False
        try:
            result = fn()
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if not details:
                self.silent.append((rpc, code))
            name = code.name
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                name = OVERSIZED_REFUSED if oversized else f"{code.name} without an oversized message: {details[:200]}"
            self.outcomes[rpc][code if code in ALLOWED else name] += 1
            return None
        self.outcomes[rpc][grpc.StatusCode.OK] += 1
        return result

    def site(self, *, retire: bool = False) -> str:
        if self.rng.random() < 0.05:
            return INTRUDER
        names = FUZZED if retire else (*FUZZED, KEEPER)
        return names[int(self.rng.integers(len(names)))]

    def join(self) -> None:
        req = pb.JoinRequest(context_fingerprint=self.fp(), client_version=self.text())
        self.call("Join", lambda: self.stubs[self.site()].Join(req, timeout=30))

    def get_global_state(self) -> None:
        req = pb.GetGlobalStateRequest(round=self.u32())
        self.call("GetGlobalState", lambda: list(self.stubs[self.site()].GetGlobalState(req, timeout=30)))

    def commit_weight(self) -> None:
        req = pb.CommitWeightRequest(round=self.u32(), context_fingerprint=self.fp(), encrypted_weight=self.payload(
            self.scalars, self.vectors[0]))
        self.call("CommitWeight", lambda: self.stubs[self.site()].CommitWeight(req, timeout=30))

    def get_weight_total(self) -> None:
        req = pb.GetWeightTotalRequest(round=self.u32())
        self.call("GetWeightTotal", lambda: self.stubs[self.site()].GetWeightTotal(req, timeout=30))

    def upload_update(self) -> None:
        messages = self.stream()
        self.call("UploadUpdate", lambda: self.stubs[self.site()].UploadUpdate(iter(messages), timeout=60))

    def report_metrics(self) -> None:
        metrics: dict[str, float] = {}
        for _ in range(int(self.rng.choice([0, 1, 3, 8, 70]))):
            names = ["dice", "epsilon", "site", "round", "time", "contributed", "bytes_up"]
            key = str(self.rng.choice(names)) if self.rng.random() < 0.3 else self.text()
            metrics[key] = float(self.rng.choice([np.nan, np.inf, -np.inf, 0.0, 1e308, -5e-324,
                                                  self.rng.normal()]))
        req = pb.ReportMetricsRequest(round=self.u32(), metrics=metrics)
        self.call("ReportMetrics", lambda: self.stubs[self.site()].ReportMetrics(req, timeout=30))

    def get_status(self) -> None:
        reply = self.call("GetStatus", lambda: self.stubs[self.site()].GetStatus(pb.GetStatusRequest(), timeout=30))
        if reply is not None:
            self.round = reply.round

    def get_envelope(self) -> None:
        req = pb.GetEnvelopeRequest(epoch=self.u32() if self.rng.random() < 0.5 else 0)
        self.call("GetEnvelope", lambda: self.stubs[self.site()].GetEnvelope(req, timeout=30))

    def publish_keys(self, *, genuine: bool = False) -> None:
        """A genuine rotation now and then (at a round boundary), else a random or mutated stream.

        ``genuine``: a genuine rotation whenever the federation is at a round boundary.
        """
        status = self.stubs[KEEPER].GetStatus(pb.GetStatusRequest(), timeout=30)
        boundary = status.phase == "commit" and not any(s.committed for s in status.sites) and not status.done
        messages = None
        if boundary and (genuine or self.rng.random() < 0.05):
            try:
                messages, site = self.rotation(status.round), KEEPER
            except CryptoError:
                # A bit-flipped upload can still parse as a ciphertext: the server, without the key,
                # cannot tell it from a genuine one and sums it in. The global state then no longer
                # decrypts, and the keeper refuses to re-encrypt it, as a real site does. From here
                # on, only mutated rotations are sent.
                assert status.round > 0
                self.poisoned += 1
        if messages is None:
            messages, site = self.mutate_keys(self.rotation(status.round, cheap=True)), self.site()
        reply = self.call("PublishKeys", lambda: self.stubs[site].PublishKeys(iter(messages), timeout=60))
        if reply is not None:  # only the next key can be accepted: from now on, encrypt under it
            assert reply.key.context_fingerprint == self.next_codec.fingerprint
            self.epoch, self.codec = reply.key.epoch, self.next_codec
            self.fingerprint = self.codec.fingerprint
            self._encrypt_samples()
            self._next_key()

    def rotation(self, round_: int, *, cheap: bool = False) -> list[pb.PublishKeysRequest]:
        """The messages of a rotation to the next key (``cheap``: the state chunks are left random)."""
        state: list[Chunk] = []
        if round_ > 0 and not cheap:
            chunks = list(self.stubs[KEEPER].GetGlobalState(pb.GetGlobalStateRequest(round=round_), timeout=30))
            state = reencrypt_chunks(self.codec, self.next_codec, [serde.chunk_from_proto(c) for c in chunks])
        elif round_ > 0:
            step = self.codec.chunk_values
            vector = self.vectors[int(self.rng.integers(len(self.vectors)))]
            state = [Chunk(round_, i, len(vector), min(step, self.length - i * step), self.next_codec.fingerprint, p,
                           self.length) for i, p in enumerate(vector)]
        header = pb.KeyEpochHeader(epoch=self.epoch + 1, context_fingerprint=self.next_codec.fingerprint, round=round_,
                                   previous_fingerprint=self.fingerprint, envelopes=len(self.next_envelopes),
                                   state_chunks=len(state))
        return ([pb.PublishKeysRequest(header=header)]
                + [pb.PublishKeysRequest(envelope=pb.SealedEnvelope(recipient=n, envelope=e))
                   for n, e in self.next_envelopes.items()]
                + [pb.PublishKeysRequest(state=serde.chunk_to_proto(c)) for c in state])

    def mutate_keys(self, messages: list[pb.PublishKeysRequest]) -> list[pb.PublishKeysRequest]:
        rng = self.rng
        messages = [pb.PublishKeysRequest.FromString(m.SerializeToString()) for m in messages]
        for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):
            what = int(rng.integers(8))
            if what == 0:
                return []
            if what == 1 and messages:  # the header elsewhere, or missing
                messages.insert(int(rng.integers(len(messages) + 1)), messages.pop(0))
            elif what == 2:  # random header fields
                h = messages[0].header if messages and messages[0].WhichOneof("body") == "header" else None
                if h is not None:
                    field = str(rng.choice(["epoch", "round", "envelopes", "state_chunks", "context_fingerprint",
                                            "previous_fingerprint"]))
                    if field in ("context_fingerprint", "previous_fingerprint"):
                        setattr(h, field, self.fp() if rng.random() < 0.5 else self.text())
                    else:
                        setattr(h, field, self.u32())
            elif what == 3:  # an envelope to someone else, or garbage
                m = pb.PublishKeysRequest(envelope=pb.SealedEnvelope(
                    recipient=str(rng.choice([*FUZZED, KEEPER, INTRUDER, self.text()])),
                    envelope=self.payload(list(self.next_envelopes.values()), self.scalars)))
                messages.insert(int(rng.integers(len(messages) + 1)), m)
            elif what == 4 and len(messages) > 1:
                del messages[int(rng.integers(1, len(messages)))]
            elif what == 5:  # upload chunks passed off as state, mutated
                messages += [pb.PublishKeysRequest(state=c) for c in self.mutate(self.stream())]
            elif what == 6 and messages:  # a message without a body
                messages.insert(int(rng.integers(len(messages) + 1)), pb.PublishKeysRequest())
            elif what == 7 and rng.random() < 0.05:  # past the message limit
                messages.append(pb.PublishKeysRequest(envelope=pb.SealedEnvelope(recipient="a",
                                                                                  envelope=rng.bytes(OVERSIZED))))
                self.oversized = True
        return messages

    def retire(self) -> None:
        req = pb.RetireRequest(round=self.u32(), reason=self.text())
        self.call("Retire", lambda: self.stubs[self.site(retire=True)].Retire(req, timeout=30))

    def healthy(self) -> bool:
        reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    # --- random values --------------------------------------------------------------------------
    def u32(self) -> int:
        """Mostly the rounds and indices that matter, sometimes anything a uint32 holds."""
        c = self.rng.random()
        if c < 0.6:
            return max(0, self.round + int(self.rng.integers(-1, 2)))
        if c < 0.85:
            return int(self.rng.integers(0, 64))
        return self.pick([2**31 - 1, 2**31, 2**32 - 1, int(self.rng.integers(0, 2**32))])

    def u64(self) -> int:
        return self.pick([0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, int(self.rng.integers(0, 2**63))])

    def pick(self, values: list[Any]) -> Any:
        return values[int(self.rng.integers(len(values)))]

    def text(self) -> str:
        c = self.rng.random()
        if c < 0.2:
            return ""
        if c < 0.5:
            return "".join(chr(int(x)) for x in self.rng.integers(32, 127, int(self.rng.integers(1, 40))))
        if c < 0.9:  # any code point but the surrogates (a proto string is UTF-8)
            points = self.rng.integers(1, 0x10FFFF, int(self.rng.integers(1, 40)))
            return "".join(chr(int(p)) for p in points if not 0xD800 <= p <= 0xDFFF)
        return "x" * int(self.rng.integers(1000, 20000))

    def fp(self) -> str:
        c = self.rng.random()
        if c < 0.7:
            return self.fingerprint
        if c < 0.8:
            return self.fingerprint[:-1] + ("0" if self.fingerprint[-1] != "0" else "1")
        if c < 0.85:
            return "plain"
        return self.text()

    def payload(self, valid: list[bytes], other: list[bytes]) -> bytes:
        """A valid payload of the expected kind, or one broken in one of many ways."""
        rng = self.rng
        good = valid[int(rng.integers(len(valid)))]
        c = rng.random()
        if c < 0.35:
            return good
        if c < 0.45:
            return good[: int(rng.integers(0, len(good)))]  # truncated
        if c < 0.55:  # a few bytes flipped
            data = bytearray(good)
            for i in rng.integers(0, len(data), int(rng.integers(1, 4))):
                data[int(i)] ^= int(rng.integers(1, 256))
            return bytes(data)
        if c < 0.62:  # a valid header, a random body
            return good[:80] + rng.bytes(int(rng.integers(0, 4000)))
        if c < 0.72:
            return rng.bytes(int(rng.integers(0, 3000)))
        if c < 0.78:
            return b""
        if c < 0.88:
            return other[int(rng.integers(len(other)))]  # the other kind (scalar for vector, ...)
        if c < 0.99:
            return good + rng.bytes(int(rng.integers(1, 64)))  # trailing bytes
        self.oversized = True
        return rng.bytes(OVERSIZED)  # refused by the transport's message limit

    def stream(self) -> list[pb.Chunk]:
        """A valid upload for the round, then zero or more mutations of it."""
        rng = self.rng
        vec = self.vectors[int(rng.integers(len(self.vectors)))]
        length, payloads = (self.length, vec) if rng.random() < 0.9 else (5, self.short)
        step = self.codec.chunk_values
        round_ = self.round if rng.random() < 0.8 else self.u32()
        chunks = [
            pb.Chunk(round=round_, index=i, total=len(payloads), num_values=min(step, length - i * step),
                     context_fingerprint=self.fingerprint, payload=p, vector_length=length)
            for i, p in enumerate(payloads)
        ]
        for _ in range(int(rng.choice([0, 0, 1, 1, 2, 3]))):
            chunks = self.mutate(chunks)
        if chunks and rng.random() < 0.01:  # one message past the 4 MiB limit
            # mostly the first: the server reads it before any check, while a stream it refuses at
            # its first chunk (a site that has uploaded, another round) never reads a later one
            index = 0 if rng.random() < 0.8 else int(rng.integers(len(chunks)))
            chunks[index].payload = rng.bytes(OVERSIZED)
            self.oversized = True
        return chunks

    def mutate(self, chunks: list[pb.Chunk]) -> list[pb.Chunk]:
        rng = self.rng
        chunks = [pb.Chunk.FromString(c.SerializeToString()) for c in chunks]
        what = int(rng.integers(9))
        if what == 0:
            return []  # the empty stream
        if what == 1:
            rng.shuffle(chunks)
        elif what == 2 and chunks:
            del chunks[int(rng.integers(len(chunks)))]
        elif what == 3 and chunks:
            chunks.insert(int(rng.integers(len(chunks) + 1)), chunks[int(rng.integers(len(chunks)))])
        elif what == 4 and chunks:  # one header field of one chunk
            c = chunks[int(rng.integers(len(chunks)))]
            field = str(rng.choice(["round", "index", "total", "num_values", "vector_length", "context_fingerprint"]))
            if field == "vector_length":
                c.vector_length = self.u64()
            elif field == "context_fingerprint":
                c.context_fingerprint = self.fp()
            else:
                setattr(c, field, self.u32() if rng.random() < 0.5 else int(rng.integers(0, 2**32)))
        elif what == 5 and chunks:  # every chunk claims another layout
            total, length = int(rng.integers(0, 2**32)), self.u64()
            for c in chunks:
                c.total, c.vector_length = total, length
        elif what == 6 and chunks:
            c = chunks[int(rng.integers(len(chunks)))]
            c.payload = self.payload(self.vectors[0], self.scalars)
        elif what == 7:  # random chunks, many of them
            chunks = [
                pb.Chunk(round=self.u32(), index=self.u32(), total=self.u32(), num_values=self.u32(),
                         context_fingerprint=self.fp(), payload=rng.bytes(int(rng.integers(0, 200))),
                         vector_length=self.u64())
                for _ in range(int(rng.integers(1, 50)))
            ]
        elif what == 8 and chunks:  # a truncated stream
            chunks = chunks[: int(rng.integers(0, len(chunks)))]
        return chunks


def _pair(folder: Path) -> tuple[bytes, bytes]:
    b = load_bundle(folder, role="client")
    return b.cert_pem, b.key_pem


def test_random_messages_never_end_in_unknown(federation):
    root, address, intruder, kind = federation
    fuzzer = Fuzzer(root, address, intruder)
    try:
        assert fuzzer.healthy()
        rpcs = {
            "Join": fuzzer.join,
            "GetGlobalState": fuzzer.get_global_state,
            "CommitWeight": fuzzer.commit_weight,
            "GetWeightTotal": fuzzer.get_weight_total,
            "UploadUpdate": fuzzer.upload_update,
            "ReportMetrics": fuzzer.report_metrics,
            "GetStatus": fuzzer.get_status,
            "GetEnvelope": fuzzer.get_envelope,
            "PublishKeys": fuzzer.publish_keys,
        }
        # one genuine rotation first (the federation starts at a round boundary), so that an accepted
        # PublishKeys does not hang on the shuffle reaching a boundary
        fuzzer.publish_keys(genuine=True)
        assert fuzzer.outcomes["PublishKeys"][grpc.StatusCode.OK] == 1, fuzzer.outcomes["PublishKeys"]
        schedule = [name for name in rpcs for _ in range(CALLS)]
        fuzzer.rng.shuffle(schedule)
        for i, name in enumerate(schedule):
            rpcs[name]()
            if i % 500 == 0:
                assert fuzzer.healthy(), f"health left SERVING after {i} calls"
        rounds_reached = fuzzer.round
        for _ in range(CALLS):  # last: it retires the sites it is called from
            fuzzer.retire()

        outcomes = fuzzer.outcomes
        assert set(outcomes) == {*rpcs, "Retire"}
        assert all(sum(counter.values()) >= CALLS for counter in outcomes.values()), outcomes
        bad = {rpc: {c: n for c, n in counter.items() if c not in ALLOWED and c != OVERSIZED_REFUSED}
               for rpc, counter in outcomes.items()}
        assert not any(bad.values()), f"undeliberate status codes: {bad}"
        assert not fuzzer.silent, f"errors without a message: {fuzzer.silent[:10]}"
        assert fuzzer.healthy()
        # the fuzz went deep: rounds closed (valid commits and uploads got through) and every RPC was
        # both answered and refused
        assert rounds_reached >= 1, outcomes
        for rpc, counter in outcomes.items():
            assert counter[grpc.StatusCode.OK] > 0 and sum(counter.values()) > counter[grpc.StatusCode.OK], (rpc, counter)
        for rpc in ("CommitWeight", "UploadUpdate"):  # oversized messages
            assert outcomes[rpc][OVERSIZED_REFUSED] > 0, (rpc, outcomes[rpc])
        assert outcomes["Join"][grpc.StatusCode.PERMISSION_DENIED] > 0  # the intruder
    finally:
        fuzzer.close()

    # a genuine site that was never retired still joins, and status still answers
    b = load_bundle(root / KEEPER, role="client")
    with FederationClient.from_bundle(b, address, call_timeout=30) as client:
        joined = client.join(fuzzer.fingerprint, "test")
        assert joined.key.epoch == fuzzer.epoch and joined.key.fingerprint == fuzzer.fingerprint
        assert joined.site == KEEPER and joined.plan.rounds == ROUNDS
        status = client.status()
    assert status.federation == "fz" and status.round >= rounds_reached
    by_name = {s.name: s for s in status.sites}
    assert not by_name[KEEPER].retired and by_name[KEEPER].joined
    assert all(by_name[name].retired for name in FUZZED)
    assert fuzzer.epoch >= 2, "no genuine key rotation got through"
