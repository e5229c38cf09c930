"""gRPC server interceptors: checks that run before every call of every service.

``RevocationInterceptor`` refuses a peer whose certificate is on the federation's revocation list
(``fedfms_secure.keys.revocation.RevocationList``) with ``PERMISSION_DENIED``, from the next call
on, also while the server runs. gRPC's TLS handshake does not consult the CRL, so a revoked site
completes the handshake and is refused at its first call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from fedfms_secure.errors import FederationError
from fedfms_secure.keys.revocation import RevocationList

log = logging.getLogger("fedfms_secure.server")


def wrap_handler(handler: Any, check: Callable[[grpc.ServicerContext], None]) -> Any:
    """``handler`` (any of the four gRPC method kinds) with ``check(context)`` run before its body."""
    if handler.unary_unary:
        inner = handler.unary_unary

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            yield from inner_us(request, context)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        def stream_unary(request_iterator: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            return inner_su(request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer)
    inner_ss = handler.stream_stream

    def stream_stream(request_iterator: Any, context: grpc.ServicerContext) -> Any:
        check(context)
        yield from inner_ss(request_iterator, context)

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer)


class RevocationInterceptor(grpc.ServerInterceptor):
    """Runs ``RevocationList.check_pem`` before every call of every service; aborts revoked peers."""

    def __init__(self, revocations: RevocationList) -> None:
        self.revocations = revocations

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return wrap_handler(handler, self._check)

    def _check(self, context: grpc.ServicerContext) -> None:
        certs = context.auth_context().get("x509_pem_cert") or []
        if not certs:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "no client certificate: connect with mutual TLS and the site's bundle")
        try:
            self.revocations.check_pem(certs[0])
        except FederationError as exc:
            log.warning("refused a revoked certificate", extra={"error": str(exc)})
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except ValueError:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "unreadable client certificate")
