"""The gRPC face of the coordinator: thin methods that identify the site, call one coordinator
method and map its errors to gRPC status codes (never ``UNKNOWN``)."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator

import grpc

from fedfms_secure.errors import CryptoError, FederationError
from fedfms_secure.protocol import Chunk, SealedEnvelope
from fedfms_secure.server.coordinator import Coordinator
from fedfms_secure.transport import serde
from fedfms_secure.transport.codes import REASON_METADATA_KEY, SITE_METADATA_KEY, STATUS_CODES
from fedfms_secure.v1 import federation_pb2 as pb
from fedfms_secure.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("fedfms_secure.server")

def site_identity(context: grpc.ServicerContext, insecure: bool) -> str:
    """The calling site's name: its certificate's common name (or a header on an insecure server)."""
    if insecure:
        for key, value in context.invocation_metadata():
            if key == SITE_METADATA_KEY:
                return value
        raise FederationError(f"insecure server: send the site name in the {SITE_METADATA_KEY!r} header",
                              "permission_denied")
    names = context.auth_context().get("x509_common_name") or []
    if len(names) != 1:
        raise FederationError("no client certificate common name: connect with mutual TLS", "permission_denied")
    return names[0].decode()


def peer_site(context: grpc.ServicerContext, insecure: bool) -> str | None:
    """The calling site's name as ``site_identity`` finds it, or None where it finds none."""
    try:
        return site_identity(context, insecure)
    except FederationError:
        return None


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    """Every failure leaves with a deliberate status and a message (never gRPC's UNKNOWN)."""
    if isinstance(exc, FederationError):
        if exc.reason:
            context.set_trailing_metadata(((REASON_METADATA_KEY, exc.reason),))
        context.abort(STATUS_CODES.get(exc.code, grpc.StatusCode.FAILED_PRECONDITION), str(exc))
    if isinstance(exc, CryptoError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unusable ciphertext: {exc}")
    log.error("internal error in %s", method, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__}); see the server log")


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: "FederationServicer", request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, site_identity(context, self.insecure), request, context)
        except grpc.RpcError:
            raise
        except Exception as exc:
            _abort(context, exc, method.__name__)

    return wrapper


def _stream_rpc(method: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    @functools.wraps(method)
    def wrapper(self: "FederationServicer", request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, site_identity(context, self.insecure), request, context)
        except grpc.RpcError:
            raise
        except Exception as exc:
            _abort(context, exc, method.__name__)

    return wrapper


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, coordinator: Coordinator, insecure: bool = False) -> None:
        self.coordinator = coordinator
        self.insecure = insecure

    @_rpc
    def Join(self, site: str, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        round_ = self.coordinator.join(site, request.context_fingerprint)
        return pb.JoinResponse(site=site, plan=serde.plan_to_proto(self.coordinator.plan), round=round_,
                               key=serde.key_to_proto(self.coordinator.key),
                               contributed_rounds=self.coordinator.contributed_rounds(site))

    @_stream_rpc
    def GetGlobalState(self, site: str, request: pb.GetGlobalStateRequest, context: grpc.ServicerContext):
        for chunk in self.coordinator.global_chunks(site, request.round):
            yield serde.chunk_to_proto(chunk)

    @_rpc
    def CommitWeight(self, site: str, request: pb.CommitWeightRequest, context: grpc.ServicerContext):
        ack = self.coordinator.commit_weight(site, request.round, request.context_fingerprint, request.encrypted_weight)
        return serde.commit_ack_to_proto(ack)

    @_rpc
    def GetWeightTotal(self, site: str, request: pb.GetWeightTotalRequest, context: grpc.ServicerContext):
        total = self.coordinator.weight_total(site, request.round)
        return serde.weight_total_to_proto(total, self.coordinator.fingerprint)

    @_rpc
    def UploadUpdate(self, site: str, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext):
        receipt = self.coordinator.receive_upload(site, (serde.chunk_from_proto(c) for c in request_iterator))
        return serde.receipt_to_proto(receipt)

    @_rpc
    def ReportMetrics(self, site: str, request: pb.ReportMetricsRequest, context: grpc.ServicerContext):
        self.coordinator.report_metrics(site, request.round, dict(request.metrics))
        return pb.ReportMetricsResponse()

    @_rpc
    def Retire(self, site: str, request: pb.RetireRequest, context: grpc.ServicerContext):
        active = self.coordinator.retire(site, request.round, request.reason)
        return pb.RetireResponse(active_sites=active)

    @_rpc
    def GetStatus(self, site: str, request: pb.GetStatusRequest, context: grpc.ServicerContext):
        return serde.status_to_proto(self.coordinator.status(site))

    @_rpc
    def PublishKeys(self, site: str, request_iterator: Iterator[pb.PublishKeysRequest], context: grpc.ServicerContext):
        messages = iter(request_iterator)
        first = next(messages, None)
        if first is None or first.WhichOneof("body") != "header":
            raise FederationError("a PublishKeys stream starts with its KeyEpochHeader", "invalid_argument")
        ack = self.coordinator.publish_keys(site, serde.publication_from_proto(first.header), _key_items(messages))
        return serde.key_ack_to_proto(ack)

    @_rpc
    def GetEnvelope(self, site: str, request: pb.GetEnvelopeRequest, context: grpc.ServicerContext):
        return serde.envelope_to_proto(self.coordinator.envelope(site, request.epoch))


def _key_items(messages: Iterator[pb.PublishKeysRequest]) -> Iterator[SealedEnvelope | Chunk]:
    for msg in messages:
        kind = msg.WhichOneof("body")
        if kind == "envelope":
            yield SealedEnvelope(msg.envelope.recipient, msg.envelope.envelope)
        elif kind == "state":
            yield serde.chunk_from_proto(msg.state)
        else:
            raise FederationError("after its header, a PublishKeys stream holds envelopes and state chunks only",
                                  "invalid_argument")
