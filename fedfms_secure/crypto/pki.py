"""X.509 certificates for mutual TLS: a federation CA, a server certificate, one per site.

Certificates are made to satisfy gRPC's BoringSSL: the CA carries ``basicConstraints CA:TRUE``
and ``keyCertSign``; leaves carry ``CA:FALSE``, ``digitalSignature``, an extended key usage
(``serverAuth`` or ``clientAuth``) and subject alternative names (gRPC checks the server's SANs,
never its CN). A site's certificate has CN = SAN = site name, which the server reads from
``context.auth_context()["x509_common_name"]``.

ECDSA P-256 is the default and the only algorithm usable for gRPC: Ed25519 certificates are
made fine, but grpcio's BoringSSL aborts the mutual-TLS handshake with
``NO_COMMON_SIGNATURE_ALGORITHMS`` (pinned in ``tests/crypto/test_crypto_pki_grpc.py``), so the
key store refuses it (``GRPC_ALGORITHMS``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfms_secure.errors import ConfigError, KeyMaterialError

PrivateKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]
ALGORITHMS = ("ecdsa-p256", "ed25519")
GRPC_ALGORITHMS = ("ecdsa-p256",)
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_CLOCK_SKEW = dt.timedelta(minutes=5)


def new_private_key(algorithm: str = "ecdsa-p256") -> PrivateKey:
    """A fresh private key: ``"ecdsa-p256"`` (default) or ``"ed25519"``."""
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ConfigError(f"unknown key algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")


def make_ca(common_name: str, key: PrivateKey, *, days: int = 3650) -> x509.Certificate:
    """A self-signed CA certificate that may sign leaf certificates only (path length 0)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _base(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )
    return builder.sign(key, _digest_for(key))


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    common_name: str,
    key: PrivateKey,
    *,
    role: str,
    hosts: Sequence[str] = (),
    days: int = 365,
) -> x509.Certificate:
    """A leaf certificate signed by the CA.

    ``role="server"``: SANs are ``hosts`` (or ``common_name`` when empty), DNS names or IPs; a
    loopback host adds ``localhost``, ``127.0.0.1`` and ``::1``; EKU serverAuth.
    ``role="client"``: CN and SAN DNS are the site name; EKU clientAuth.
    """
    if role == "server":
        names = list(hosts) or [common_name]
        if _LOOPBACK & set(names):
            names += sorted(_LOOPBACK - set(names))
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    elif role == "client":
        names = [common_name]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    else:
        raise ConfigError(f"unknown certificate role {role!r}: use 'server' or 'client'")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _base(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in dict.fromkeys(names)]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    return builder.sign(ca_key, _digest_for(ca_key))


def pem_cert(cert: x509.Certificate) -> bytes:
    """PEM encoding of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_private_key(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (protect it with file mode 0600: see ``write_private``)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_cert(path: Path | str) -> x509.Certificate:
    """Read a PEM certificate; KeyMaterialError naming ``path`` if missing or invalid."""
    return cert_from_pem(_read(path, "certificate"), source=str(path))


def load_private_key(path: Path | str) -> PrivateKey:
    """Read a PEM private key; KeyMaterialError naming ``path`` if missing or invalid."""
    return private_key_from_pem(_read(path, "private key"), source=str(path))


def cert_from_pem(data: bytes, *, source: str) -> x509.Certificate:
    """Parse PEM certificate bytes; KeyMaterialError naming ``source``."""
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise KeyMaterialError(f"{source} is not a PEM certificate ({exc}); export the bundle again") from None


def private_key_from_pem(data: bytes, *, source: str) -> PrivateKey:
    """Parse an unencrypted PEM private key (ECDSA or Ed25519); KeyMaterialError naming ``source``."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyMaterialError(
            f"{source} is not an unencrypted PEM private key ({exc}); export the bundle again"
        ) from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise KeyMaterialError(
            f"{source} holds a {type(key).__name__}; fedfms-secure uses ECDSA P-256 or Ed25519 keys"
        )
    return key


def write_private(path: Path, data: bytes) -> None:
    """Write secret material readable by its owner only (mode 0600), atomically.

    The bytes go to a fresh temporary file (``mkstemp``: 0600, never a followed link) in the same
    folder, are flushed to disk and then renamed over ``path``. A crash leaves either the old file
    or the new one, never a truncated key; a symlink at ``path`` is replaced, not written through.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)  # a buffered write writes everything or raises
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate, *, source: str) -> None:
    """KeyMaterialError unless ``cert`` is signed by ``ca_cert`` and valid now."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise KeyMaterialError(
            f"{source} was not issued by this federation's CA (ca.crt); the bundle mixes files of two "
            "federations: export it again from one `fedfms-secure keys init` folder"
        ) from None
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise KeyMaterialError(
            f"{source} is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}; "
            "issue new certificates with `fedfms-secure keys init`"
        )


def key_matches_cert(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private half of ``cert``'s public key."""
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*raw) == cert.public_key().public_bytes(*raw)


def common_name(cert: x509.Certificate) -> str:
    """The certificate's subject CN ('' when absent)."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _base(
    subject: x509.Name, issuer: x509.Name, public_key: CertificatePublicKeyTypes, days: int
) -> x509.CertificateBuilder:
    if days < 1:
        raise ConfigError(f"certificate lifetime days={days} must be at least 1")
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _digest_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyMaterialError(
            f"{what} {path} does not exist; export the bundle again with `fedfms-secure keys export`"
        ) from None
    except OSError as exc:
        raise KeyMaterialError(f"cannot read {what} {path}: {exc.strerror}") from None
