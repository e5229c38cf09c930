"""gRPC server interceptors: checks that run before every call of every service.

``RevocationInterceptor`` refuses a peer whose certificate is on the federation's revocation list
(``fedfms_secure.keys.revocation.RevocationList``) with ``PERMISSION_DENIED``, from the next call
on, also while the server runs. gRPC's TLS handshake does not consult the CRL, so a revoked site
completes the handshake and is refused at its first call.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ContextManager

import grpc

from fedfms_secure.errors import FederationError
from fedfms_secure.keys.revocation import RevocationList

log = logging.getLogger("fedfms_secure.server")


def wrap_handler(handler: Any, guard: Callable[[grpc.ServicerContext], ContextManager[None]],
                 requests: Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]] | None = None) -> Any:
    """``handler`` (any of the four gRPC method kinds) run inside ``guard(context)``, which may
    refuse the call by aborting; ``requests`` wraps a client stream's request iterator."""
    wrap = requests or (lambda it, context: it)
    if handler.unary_unary:
        inner = handler.unary_unary

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            with guard(context):
                return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Any:
            with guard(context):
                yield from inner_us(request, context)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        def stream_unary(request_iterator: Any, context: grpc.ServicerContext) -> Any:
            with guard(context):
                return inner_su(wrap(request_iterator, context), context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer)
    inner_ss = handler.stream_stream

    def stream_stream(request_iterator: Any, context: grpc.ServicerContext) -> Any:
        with guard(context):
            yield from inner_ss(wrap(request_iterator, context), context)

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

    @contextlib.contextmanager

    def _check(self, context: grpc.ServicerContext) -> Iterator[None]:
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
        yield


class SiteLimitInterceptor(grpc.ServerInterceptor):
    """Keeps one site from holding the server's worker threads.

    Each site may run at most ``per_site`` calls at once (a further one is refused with
    ``RESOURCE_EXHAUSTED`` before it reads a message), and a client stream that sends nothing for
    ``idle_timeout`` seconds is cancelled, so a silent upload frees its thread and its slot.
    Calls without a site identity (health checks, reflection) are not counted.
    """

    def __init__(self, identify: Callable[[grpc.ServicerContext], str | None], *, per_site: int = 4,
                 idle_timeout: float = 60.0) -> None:
        self._identify = identify
        self.per_site = per_site
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith("/fedfms_secure."):
            return handler
        return wrap_handler(handler, self._slot, self._watched)

    @contextlib.contextmanager
    def _slot(self, context: grpc.ServicerContext) -> Iterator[None]:
        site = self._identify(context)
        if site is None:
            yield
            return
        with self._lock:
            running = self._calls.get(site, 0)
            if running < self.per_site:
                self._calls[site] = running + 1
        if running >= self.per_site:
            log.warning("refused a call over the per-site limit", extra={"site": site, "running": running})
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"site {site} already has {running} calls running (at most {self.per_site}): wait for "
                          "them to end before starting another")
        try:
            yield
        finally:
            with self._lock:
                self._calls[site] -= 1
                if not self._calls[site]:
                    del self._calls[site]

    def _watched(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """``requests``, with the call cancelled once no message has arrived for ``idle_timeout`` s."""
        last = [time.monotonic()]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(min(1.0, self.idle_timeout / 4)):
                if time.monotonic() - last[0] > self.idle_timeout:
                    log.warning("cancelled a stream that sent nothing", extra={"seconds": self.idle_timeout})
                    context.cancel()
                    return

        threading.Thread(target=watch, name="stream-idle-watch", daemon=True).start()
        try:
            for message in requests:
                last[0] = time.monotonic()
                yield message
        finally:
            done.set()
