"""Certificate revocation on the server: the CA-signed CRL of the server bundle, checked on every call.

``RevocationList(crl_path, ca_pem)`` reads ``crl.pem`` (written by ``fedfms-secure keys revoke``
and ``keys rotate-tls``, copied into the server bundle by ``--server-bundle`` or ``keys export
server``) and reloads it whenever the file changes, so a running server refuses a revoked
certificate from the next call on. The list is trusted by its CA signature only (it is not in
the manifest's checksums). A reloaded list that is unreadable, not signed by the federation's
CA, or older (a lower CRL number) than the one in use is ignored with an error in the log: the
server keeps refusing what it refused before. Deleting the file does not un-revoke anything
either.

``RevocationInterceptor`` wraps every method handler of the gRPC server so the check runs on each
call, with the peer certificate from ``context.auth_context()["x509_pem_cert"]``: a revoked one
is aborted with ``PERMISSION_DENIED`` and a message naming the site, the serial, the date and
reason of the revocation, and what to do.

gRPC's TLS handshake itself does not consult the CRL (grpcio has no CRL option for Python
servers), so a revoked site still completes the handshake and is refused at its first call.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from fedfms_secure.crypto import pki
from fedfms_secure.errors import FederationError, KeyMaterialError

log = logging.getLogger("fedfms_secure.server")


class RevocationList:
    """The revoked serials of the federation's CA, reloaded when ``crl_path`` changes; thread-safe."""

    def __init__(self, crl_path: Path, ca_pem: bytes) -> None:
        self.path = Path(crl_path)
        self._ca = pki.cert_from_pem(ca_pem, source="the bundle's ca.crt")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._number = -1
        self._entries: dict[int, pki.Revocation] = {}
        self._certs: dict[bytes, x509.Certificate] = {}
        if self.path.exists():
            # at start a broken list is an error the operator must fix, not something to ignore
            self._load(strict=True)

    @property
    def number(self) -> int:
        """The CRL number in use (-1: no list yet)."""
        return self._number

    def refresh(self) -> bool:
        """Reload the list if its file changed; True when a new list was loaded."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp is not None:
                log.error("the revocation list disappeared; still refusing what it revoked",
                          extra={"crl": str(self.path)})
                self._stamp = None
            return False
        except OSError:
            return False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return False
        with self._lock:
            if stamp == self._stamp:
                return False
            return self._load(strict=False, stamp=stamp)

    def _load(self, *, strict: bool, stamp: tuple[int, int, int] | None = None) -> bool:
        try:
            if stamp is None:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            crl = pki.crl_from_pem(self.path.read_bytes(), self._ca, source=str(self.path))
        except (KeyMaterialError, OSError) as exc:
            if strict:
                raise KeyMaterialError(str(exc)) from None
            log.error("ignoring an unusable revocation list; the previous one stays in force",
                      extra={"crl": str(self.path), "error": str(exc)})
            self._stamp = stamp
            return False
        self._stamp = stamp
        number = pki.crl_number(crl)
        if number < self._number:
            log.error("ignoring an older revocation list (lower CRL number); the newer one stays in force",
                      extra={"crl": str(self.path), "number": number, "in_force": self._number})
            return False
        entries = pki.revocations_of(crl)
        # a newer list never drops an entry: revocation is permanent
        self._entries = {**self._entries, **entries}
        self._number = number
        log.info("revocation list loaded", extra={"crl": str(self.path), "number": number, "revoked": len(entries)})
        return True

    def revoked(self, serial: int) -> pki.Revocation | None:
        """The revocation of ``serial``, or None."""
        return self._entries.get(serial)

    def removed_sites(self) -> dict[str, pki.Revocation]:
        """Sites taken out of the federation (``keys revoke``), by name."""
        return {r.site: r for r in self._entries.values() if r.removes_site}

    def check_pem(self, cert_pem: bytes) -> None:
        """FederationError ``permission_denied`` when the certificate in ``cert_pem`` is revoked."""
        self.refresh()
        cert = self._certs.get(cert_pem)
        if cert is None:
            cert = x509.load_pem_x509_certificate(cert_pem)
            if len(self._certs) > 1024:
                self._certs.clear()
            self._certs[cert_pem] = cert
        entry = self._entries.get(cert.serial_number)
        if entry is None:
            return
        site = pki.common_name(cert) or entry.site or "?"
        if entry.reason == "superseded" and not entry.removes_site:
            todo = ("this certificate was replaced by `keys rotate-tls`: the operator exports the site's new bundle "
                    f"(`fedfms-secure keys export client {site} --from DIR --out BUNDLE --update`); install it "
                    "and restart the site")
        else:
            todo = ("the site is no longer part of the federation; if that is a mistake, the operator adds it again "
                    "under a new name with `fedfms-secure keys add-client`")
        raise FederationError(
            f"certificate of site {site!r} (serial {cert.serial_number:x}) was revoked on "
            f"{entry.date:%Y-%m-%d %H:%M} UTC, reason: {entry.reason}; {todo}",
            "permission_denied",
        )


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
        check = self._check
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
