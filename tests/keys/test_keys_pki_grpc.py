"""Issued certificates work for real mutual TLS with grpcio on 127.0.0.1."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedfms_secure.keys import pki
from fedfms_secure.errors import ConfigError, KeyMaterialError

_METHOD = "/fedfms_secure.test.Echo/Who"


def _pki(algorithm: str, *, site: str = "site_a", host: str = "localhost") -> dict[str, bytes]:
    ca_key = pki.new_private_key(algorithm)
    ca = pki.make_ca("test-ca", ca_key, days=2)
    server_key, client_key = pki.new_private_key(algorithm), pki.new_private_key(algorithm)
    server = pki.issue_certificate(ca, ca_key, host, server_key, role="server", hosts=[host], days=1)
    client = pki.issue_certificate(ca, ca_key, site, client_key, role="client", days=1)
    return {
        "ca": pki.pem_cert(ca),
        "server_crt": pki.pem_cert(server),
        "server_key": pki.pem_private_key(server_key),
        "client_crt": pki.pem_cert(client),
        "client_key": pki.pem_private_key(client_key),
    }


def _who(request: bytes, context: grpc.ServicerContext) -> bytes:
    names = context.auth_context().get("x509_common_name", [b"?"])
    return b"hello " + names[0] + b" you sent " + request


@contextmanager
def _mtls_server(material: dict[str, bytes]) -> Iterator[int]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "fedfms_secure.test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(_who)}
    )
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(material["server_key"], material["server_crt"])],
        root_certificates=material["ca"],
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def _call(target: str, ca: bytes, crt: bytes, key: bytes) -> bytes:
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=crt)
    with grpc.secure_channel(target, creds) as channel:
        return channel.unary_unary(_METHOD)(b"ping", timeout=10)


@pytest.mark.parametrize("dial", ["localhost", "127.0.0.1"])
def test_mutual_tls_works_and_server_reads_client_cn(dial: str) -> None:
    m = _pki("ecdsa-p256")
    with _mtls_server(m) as port:
        reply = _call(f"{dial}:{port}", m["ca"], m["client_crt"], m["client_key"])
    assert reply == b"hello site_a you sent ping"


def test_ed25519_certificates_fail_grpc_handshake() -> None:
    """grpcio's BoringSSL answers NO_COMMON_SIGNATURE_ALGORITHMS: why ECDSA P-256 is the default.

    If this starts failing, grpcio learned Ed25519 and provisioning may allow it again.
    """
    m = _pki("ed25519")
    with _mtls_server(m) as port:
        with pytest.raises(grpc.RpcError) as info:
            _call(f"localhost:{port}", m["ca"], m["client_crt"], m["client_key"])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_cert_from_another_ca_is_refused() -> None:
    m, other = _pki("ecdsa-p256"), _pki("ecdsa-p256", site="intruder")
    with _mtls_server(m) as port:
        with pytest.raises(grpc.RpcError) as info:
            _call(f"localhost:{port}", m["ca"], other["client_crt"], other["client_key"])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # the legitimate site still gets in on the same server
        assert _call(f"localhost:{port}", m["ca"], m["client_crt"], m["client_key"]).startswith(b"hello site_a")


def test_client_refuses_server_of_another_ca() -> None:
    m, other = _pki("ecdsa-p256"), _pki("ecdsa-p256")
    with _mtls_server(m) as port:
        with pytest.raises(grpc.RpcError) as info:
            _call(f"localhost:{port}", other["ca"], other["client_crt"], other["client_key"])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_extensions() -> None:
    ca_key = pki.new_private_key()
    ca = pki.make_ca("ca", ca_key)
    server = pki.issue_certificate(ca, ca_key, "fl.example.org", pki.new_private_key(), role="server",
                                   hosts=["fl.example.org", "10.0.0.5", "127.0.0.1"])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1", "::1"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    client = pki.issue_certificate(ca, ca_key, "site-b", pki.new_private_key(), role="client")
    assert pki.common_name(client) == "site-b"
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert client.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    pki.verify_issued_by(client, ca, source="client.crt")
    with pytest.raises(KeyMaterialError, match="other.crt was not issued"):
        pki.verify_issued_by(client, pki.make_ca("ca2", pki.new_private_key()), source="other.crt")


def test_key_io_and_errors(tmp_path) -> None:
    key = pki.new_private_key("ed25519")
    path = tmp_path / "k.pem"
    path.write_bytes(b"")
    os.chmod(path, 0o644)
    pki.write_private(path, pki.pem_private_key(key))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pki.key_matches_cert(pki.load_private_key(path), pki.make_ca("x", key))
    with pytest.raises(KeyMaterialError, match="missing.crt does not exist"):
        pki.load_cert(tmp_path / "missing.crt")
    (tmp_path / "junk.crt").write_bytes(b"not a cert")
    with pytest.raises(KeyMaterialError, match="junk.crt is not a PEM certificate"):
        pki.load_cert(tmp_path / "junk.crt")
    with pytest.raises(ConfigError, match="rsa"):
        pki.new_private_key("rsa")
