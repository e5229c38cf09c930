"""The site's stub: plain-dataclass calls to the coordinator, gRPC errors mapped to ours.

It counts the bytes it sends and receives (serialized message sizes) for the round metrics.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, TypeVar

import grpc

from fedfms_secure.errors import FederationError, ServerUnreachable
from fedfms_secure.protocol import (
    Chunk,
    CommitAck,
    Envelope,
    Joined,
    KeyAck,
    KeyPublication,
    Receipt,
    Status,
    WeightTotal,
)
from fedfms_secure.transport import serde
from fedfms_secure.transport.channel import client_channel
from fedfms_secure.transport.codes import CODE_NAMES, REASON_CLASSES, REASON_METADATA_KEY, SITE_METADATA_KEY
from fedfms_secure.v1 import federation_pb2 as pb
from fedfms_secure.v1 import federation_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from fedfms_secure.keys.bundle import Bundle

T = TypeVar("T")
log = logging.getLogger("fedfms_secure.site")


class FederationClient:
    """One site's connection to the coordinator."""

    def __init__(
        self,
        address: str,
        *,
        ca_pem: bytes | None = None,
        cert_pem: bytes | None = None,
        key_pem: bytes | None = None,
        server_name: str | None = None,
        insecure: bool = False,
        site: str | None = None,
        call_timeout: float = 120.0,
        reconnect_timeout: float = 0.0,
    ) -> None:
        self.address = address
        self._server_name = server_name
        self._channel = client_channel(
            address, ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, server_name=server_name, insecure=insecure
        )
        self._stub = pb_grpc.FederationStub(self._channel)
        self._metadata = ((SITE_METADATA_KEY, site),) if insecure and site else None
        self._timeout = call_timeout
        # how long to keep retrying, with backoff, while the server is unreachable (0: fail at once)
        self._reconnect = reconnect_timeout
        self.bytes_up = 0
        self.bytes_down = 0

    @classmethod
    def from_bundle(cls, bundle: "Bundle", address: str, *, call_timeout: float = 120.0,
                    reconnect_timeout: float = 0.0, server_name: str | None = None) -> "FederationClient":
        """A mutual-TLS client with a site bundle's CA, certificate and key; the server certificate
        must name the bundle's server host (or ``server_name``, when given)."""
        return cls(address, ca_pem=bundle.ca_pem, cert_pem=bundle.cert_pem, key_pem=bundle.key_pem,
                   server_name=server_name or bundle.server_host, call_timeout=call_timeout,
                   reconnect_timeout=reconnect_timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "FederationClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls ----------------------------------------------------------------------------------
    def wait_ready(self, timeout: float, *, flag: str = "--connect-timeout") -> None:
        """Blocks until the server answers; says once that it waits (and for how long, set by ``flag``).

        ServerUnreachable after ``timeout`` seconds, or at once when the TLS handshake fails (the
        bundle cannot work with this server: waiting would not help)."""
        deadline = time.monotonic() + timeout
        ready = grpc.channel_ready_future(self._channel)
        said = False
        while True:
            try:
                ready.result(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
                return
            except grpc.FutureTimeoutError:
                pass
            self._refuse_handshake_failure()
            if time.monotonic() >= deadline:
                break
            if not said:
                log.warning(f"waiting for the server at {self.address} (gives up after {timeout:g} s, {flag})",
                            extra={"address": self.address})
                said = True
        raise ServerUnreachable(
            f"cannot reach the server at {self.address} after {timeout:g} s: is `fedfms-secure server` running "
            f"there, do --server and the server's --address match, and does a firewall let the port through? "
            f"(raise {flag} to wait longer)"
        )

    def _refuse_handshake_failure(self) -> None:
        """One status call, to learn why the channel is not ready; raises when TLS is the reason."""
        try:
            self._stub.GetStatus(pb.GetStatusRequest(), timeout=2.0, metadata=self._metadata)
        except grpc.RpcError as exc:
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if exc.code() == grpc.StatusCode.UNAVAILABLE and _handshake_failed(details):
                raise ServerUnreachable(_handshake_message(self.address, self._server_name)) from None

    def join(self, fingerprint: str, version: str) -> Joined:
        req = pb.JoinRequest(context_fingerprint=fingerprint, client_version=version)
        return serde.joined_from_proto(self._unary(self._stub.Join, req))

    def status(self) -> Status:
        return serde.status_from_proto(self._unary(self._stub.GetStatus, pb.GetStatusRequest()))

    def global_state(self, round_: int) -> list[Chunk]:
        def fetch() -> list[Chunk]:
            chunks = []
            for msg in self._stub.GetGlobalState(
                pb.GetGlobalStateRequest(round=round_), timeout=self._timeout, metadata=self._metadata
            ):
                self.bytes_down += msg.ByteSize()
                chunks.append(serde.chunk_from_proto(msg))
            return chunks

        return self._call(fetch)

    def commit_weight(self, round_: int, fingerprint: str, payload: bytes) -> CommitAck:
        req = pb.CommitWeightRequest(round=round_, context_fingerprint=fingerprint, encrypted_weight=payload)
        return serde.commit_ack_from_proto(self._unary(self._stub.CommitWeight, req))

    def weight_total(self, round_: int) -> WeightTotal:
        req = pb.GetWeightTotalRequest(round=round_)
        return serde.weight_total_from_proto(self._unary(self._stub.GetWeightTotal, req))

    def upload(self, chunks: Callable[[], Iterable[Chunk]]) -> Receipt:
        """Streams the chunks that ``chunks()`` yields; on a reconnect it is called again."""

        def call() -> pb.UploadReceipt:
            def messages() -> Iterator[pb.Chunk]:
                for chunk in chunks():
                    msg = serde.chunk_to_proto(chunk)
                    self.bytes_up += msg.ByteSize()
                    yield msg

            return self._stub.UploadUpdate(messages(), timeout=self._timeout, metadata=self._metadata)

        return serde.receipt_from_proto(self._call(call))

    def publish_keys(self, publication: KeyPublication, envelopes: Mapping[str, bytes],
                     state: Callable[[], Iterable[Chunk]] | None = None) -> KeyAck:
        """Publishes a new CKKS key epoch: the header, one sealed envelope per recipient site and,
        for a rotation, the re-encrypted global state that ``state()`` yields (called again on a
        reconnect)."""

        def call() -> pb.PublishKeysResponse:
            def messages() -> Iterator[pb.PublishKeysRequest]:
                for msg in (pb.PublishKeysRequest(header=serde.publication_to_proto(publication)),
                            *(pb.PublishKeysRequest(envelope=pb.SealedEnvelope(recipient=site, envelope=payload))
                              for site, payload in envelopes.items())):
                    self.bytes_up += msg.ByteSize()
                    yield msg
                for chunk in state() if state is not None else ():
                    msg = pb.PublishKeysRequest(state=serde.chunk_to_proto(chunk))
                    self.bytes_up += msg.ByteSize()
                    yield msg

            return self._stub.PublishKeys(messages(), timeout=self._timeout, metadata=self._metadata)

        return serde.key_ack_from_proto(self._call(call))

    def envelope(self, epoch: int = 0) -> Envelope:
        """This site's sealed envelope of key ``epoch`` (0: the current one); NOT_FOUND until it exists."""
        return serde.envelope_from_proto(self._unary(self._stub.GetEnvelope, pb.GetEnvelopeRequest(epoch=epoch)))

    def retire(self, round_: int, reason: str) -> int:
        """Tells the coordinator this site stops contributing from ``round_`` on; returns the active sites."""
        response = self._unary(self._stub.Retire, pb.RetireRequest(round=round_, reason=reason))
        return response.active_sites

    def report_metrics(self, round_: int, metrics: dict[str, float]) -> None:
        self._unary(self._stub.ReportMetrics, pb.ReportMetricsRequest(round=round_, metrics=metrics))

    # --- plumbing -------------------------------------------------------------------------------
    def _unary(self, method: Callable, request: object) -> object:
        def call() -> object:
            self.bytes_up += request.ByteSize()
            response = method(request, timeout=self._timeout, metadata=self._metadata)
            self.bytes_down += response.ByteSize()
            return response

        return self._call(call)

    def _call(self, fn: Callable[[], T]) -> T:
        """Runs one call; while the server is unreachable, retries with backoff up to the reconnect timeout."""
        deadline = time.monotonic() + self._reconnect
        delay = 0.5
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                error = _translate(exc, self.address)
            if not isinstance(error, ServerUnreachable) or time.monotonic() + delay > deadline:
                raise error
            log.warning("server unreachable; retrying", extra={"address": self.address, "in_seconds": delay})
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _translate(exc: grpc.RpcError, address: str) -> FederationError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and _handshake_failed(details or ""):
        return FederationError(_handshake_message(address, None), "unavailable")  # waiting would not help
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnreachable(
            f"the server at {address} is unavailable ({details}); check that it runs and that the site's "
            "bundle was exported from the same federation as the server's"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServerUnreachable(
            f"the server at {address} did not answer in time ({details}); for large models raise "
            "call_timeout in the client's --config file"
        )
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    reason = next((value for key, value in trailers or () if key == REASON_METADATA_KEY), "")
    error_class = REASON_CLASSES.get(reason, FederationError)
    return error_class(f"server refused: {details}", CODE_NAMES.get(code, "failed_precondition"))


# gRPC reports a failed TLS handshake only as UNAVAILABLE with these words in the details
_HANDSHAKE_WORDS = ("handshake", "certificate_verify_failed", "ssl_error", "tsi_", "peer certificate",
                    "certificate verify", "tlsv1 alert")


def _handshake_failed(details: str) -> bool:
    text = details.lower()
    return any(word in text for word in _HANDSHAKE_WORDS)


def _handshake_message(address: str, server_name: str | None) -> str:
    expected = f" (the site expects a server certificate for {server_name!r})" if server_name else ""
    return (
        f"the TLS handshake with the server at {address} failed{expected}. Likely causes: the site's bundle "
        "is from another federation than the server's (export both from the same `keys init` folder), "
        "--server names another server than this federation's, or a certificate has expired or was revoked "
        "(`fedfms-secure keys verify BUNDLE` shows which; renew with `keys rotate-tls`)"
    )


def poll(fn: Callable[[], T], done: Callable[[T], bool], *, timeout: float, interval: float = 0.2,
         what: str = "the server", waiting_on: Callable[[], str] | None = None) -> T:
    """Calls ``fn`` until ``done(result)``; FederationError after ``timeout`` seconds.

    ``waiting_on`` (called once, on time-out) names whoever the wait is for, for the message.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if done(result):
            return result
        if time.monotonic() > deadline:
            who = f" (still waiting on: {waiting_on()})" if waiting_on else ""
            raise FederationError(
                f"timed out after {timeout:.0f} s waiting for {what}{who}; check those sites' logs, or "
                "raise round_timeout in the client's --config file",
                "unavailable",
            )
        time.sleep(interval)
