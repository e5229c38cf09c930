"""X.509 certificates for mutual TLS: a federation CA, a server certificate, one per site.

Certificates are made to satisfy gRPC's BoringSSL: the CA carries ``basicConstraints CA:TRUE``
and ``keyCertSign``; leaves carry ``CA:FALSE``, ``digitalSignature``, an extended key usage
(``serverAuth`` or ``clientAuth``) and subject alternative names (gRPC checks the server's SANs,
never its CN). A site's certificate has CN = SAN = site name, which the server reads from
``context.auth_context()["x509_common_name"]``.

Algorithms, as measured with grpcio 1.85 on loopback (pinned in
``tests/keys/test_keys_pki_grpc.py`` and ``tests/keys/test_keys_algorithms.py``):

* leaf keys (server and sites, ``LEAF_ALGORITHMS``): ECDSA P-256 only. With an Ed25519 leaf key,
  on either end, grpcio's BoringSSL aborts the mutual-TLS handshake with
  ``NO_COMMON_SIGNATURE_ALGORITHMS``;
* the CA (``CA_ALGORITHMS``): ECDSA P-256 or Ed25519. An Ed25519 CA signing P-256 leaf
  certificates handshakes fine (BoringSSL verifies Ed25519 signatures in the chain).

Private keys are PKCS#8 PEM, encrypted with a passphrase when one is given
(scrypt n=2**15 and AES-256, see ``pkcs8``), and written with mode 0600 (``write_private``).

Each site's certificate also carries the raw X25519 public key of its sealed-envelope key in a
non-critical private extension (``ENVELOPE_KEY_OID``, an OCTET STRING of 32 bytes), so that the
CA vouches for it: ``envelope_key_of(cert)`` reads it back.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfms_secure.atomic import write_atomic
from fedfms_secure.keys.pkcs8 import encrypt_at_rest
from fedfms_secure.errors import ConfigError, KeyMaterialError

PrivateKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]
ALGORITHMS = ("ecdsa-p256", "ed25519")
# what gRPC's TLS accepts (see the module docstring)
LEAF_ALGORITHMS = ("ecdsa-p256",)
CA_ALGORITHMS = ("ecdsa-p256", "ed25519")
GRPC_ALGORITHMS = LEAF_ALGORITHMS
# private extension (a UUID-derived OID, RFC 4122 / X.667 arc 2.25) holding a site's X25519 envelope key
ENVELOPE_KEY_OID = x509.ObjectIdentifier("2.25.114529357609516103633507238423439277161")
# private CRL entry extension (UTF8String): the site this revocation removes from the federation
REMOVED_SITE_OID = x509.ObjectIdentifier("2.25.24361020598740758596362988551352933868")
REVOCATION_REASONS = {
    "key-compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
}
_REASON_NAMES = {flag: name for name, flag in REVOCATION_REASONS.items()}
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_CLOCK_SKEW = dt.timedelta(minutes=5)
_EXPORT_AGAIN = "export the bundle again with `fedfms-secure keys export`"


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
    envelope_key: bytes | None = None,
) -> x509.Certificate:
    """A leaf certificate signed by the CA.

    ``role="server"``: SANs are ``hosts`` (or ``common_name`` when empty), DNS names or IPs; a
    loopback host adds ``localhost``, ``127.0.0.1`` and ``::1``; EKU serverAuth.
    ``role="client"``: CN and SAN DNS are the site name; EKU clientAuth; ``envelope_key`` (the
    site's raw 32-byte X25519 public key) goes into the ``ENVELOPE_KEY_OID`` extension.
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
    if envelope_key is not None:
        if len(envelope_key) != 32:
            raise KeyMaterialError(f"an X25519 public key has 32 bytes, not {len(envelope_key)}")
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ENVELOPE_KEY_OID, b"\x04\x20" + envelope_key), critical=False
        )
    return builder.sign(ca_key, _digest_for(ca_key))


def envelope_key_of(cert: x509.Certificate) -> bytes | None:
    """The raw X25519 envelope public key the CA certified for a site (None when absent)."""
    try:
        value = cert.extensions.get_extension_for_oid(ENVELOPE_KEY_OID).value
    except x509.ExtensionNotFound:
        return None
    raw = getattr(value, "value", b"")
    if len(raw) != 34 or raw[:2] != b"\x04\x20":
        raise KeyMaterialError(
            f"certificate of {common_name(cert)!r} has a malformed envelope-key extension; issue it again"
        )
    return raw[2:]


def cert_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, as lowercase hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def cert_algorithm(cert: x509.Certificate) -> str:
    """``"ecdsa-p256"``, ``"ed25519"`` or the key type's name for anything else."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ecdsa-p256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return type(key).__name__


def pem_cert(cert: x509.Certificate) -> bytes:
    """PEM encoding of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_private_key(key: PrivateKey | x25519.X25519PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted with ``passphrase`` when given (scrypt and AES-256, see ``pkcs8``).

    Protect it with file mode 0600 either way: see ``write_private``.
    """
    if passphrase:
        return encrypt_at_rest(key, passphrase)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def is_encrypted_pem(data: bytes) -> bool:
    """Whether PEM bytes hold a passphrase-encrypted PKCS#8 private key."""
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data


def read_passphrase(path: Path | str | None) -> bytes | None:
    """The passphrase in ``path`` (its first line, without the line end); None when ``path`` is None.

    KeyMaterialError naming the file when it is missing, unreadable or empty.
    """
    if path is None:
        return None
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyMaterialError(
            f"passphrase file {path} does not exist: give --passphrase-file the file that holds the passphrase "
            "the keys were encrypted with"
        ) from None
    except OSError as exc:
        raise KeyMaterialError(f"cannot read passphrase file {path} ({exc.strerror}); check its path and mode") from None
    line = text.splitlines()[0] if text.splitlines() else b""
    if not line:
        raise KeyMaterialError(f"passphrase file {path} is empty: write the passphrase on its first line")
    return line


def new_envelope_key() -> x25519.X25519PrivateKey:
    """A fresh X25519 key pair for sealed envelopes."""
    return x25519.X25519PrivateKey.generate()


def raw_public(key: x25519.X25519PrivateKey | x25519.X25519PublicKey) -> bytes:
    """The raw 32-byte public key of an X25519 key."""
    public = key.public_key() if isinstance(key, x25519.X25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_cert(path: Path | str, *, remedy: str = _EXPORT_AGAIN) -> x509.Certificate:
    """Read a PEM certificate; KeyMaterialError naming ``path`` if missing or invalid, ending with
    ``remedy`` (what to do; a file of the provisioning folder is restored, not exported)."""
    return cert_from_pem(_read(path, "certificate", remedy), source=str(path), remedy=remedy)


def load_private_key(path: Path | str, passphrase: bytes | None = None, *, remedy: str = _EXPORT_AGAIN) -> PrivateKey:
    """Read a PEM private key; KeyMaterialError naming ``path`` if missing, invalid or locked."""
    return private_key_from_pem(_read(path, "private key", remedy), source=str(path), passphrase=passphrase,
                                remedy=remedy)


def cert_from_pem(data: bytes, *, source: str, remedy: str = _EXPORT_AGAIN) -> x509.Certificate:
    """Parse PEM certificate bytes; KeyMaterialError naming ``source``."""
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise KeyMaterialError(f"{source} is not a PEM certificate ({exc}); {remedy}") from None


def private_key_from_pem(data: bytes, *, source: str, passphrase: bytes | None = None,
                         remedy: str = _EXPORT_AGAIN) -> PrivateKey:
    """Parse a PEM private key (ECDSA or Ed25519), decrypting it with ``passphrase`` when it is
    encrypted; KeyMaterialError naming ``source`` (and saying what to do) otherwise."""
    key = _load_key(data, source, passphrase, remedy)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise KeyMaterialError(
            f"{source} holds a {type(key).__name__}; fedfms-secure uses ECDSA P-256 or Ed25519 keys"
        )
    return key


def envelope_key_from_pem(data: bytes, *, source: str, passphrase: bytes | None = None,
                          remedy: str = _EXPORT_AGAIN) -> x25519.X25519PrivateKey:
    """Parse a PEM X25519 private key (a site's ``envelope.key``); KeyMaterialError naming ``source``."""
    key = _load_key(data, source, passphrase, remedy)
    if not isinstance(key, x25519.X25519PrivateKey):
        raise KeyMaterialError(f"{source} holds a {type(key).__name__}, not the X25519 key of sealed envelopes; "
                               f"{remedy}")
    return key


def _load_key(data: bytes, source: str, passphrase: bytes | None, remedy: str = _EXPORT_AGAIN) -> object:
    encrypted = is_encrypted_pem(data)
    if encrypted and not passphrase:
        raise KeyMaterialError(
            f"{source} is encrypted with a passphrase: give the file that holds it with --passphrase-file "
            "(config key passphrase_file)"
        )
    try:
        return serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except ValueError as exc:
        if encrypted:
            raise KeyMaterialError(
                f"wrong passphrase for {source}: the passphrase file does not hold the passphrase this key was "
                "encrypted with; give the right one with --passphrase-file"
            ) from None
        raise KeyMaterialError(f"{source} is not a PEM private key ({exc}); {remedy}") from None
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise KeyMaterialError(f"{source} is not a usable PEM private key ({exc}); {remedy}") from None


def write_private(path: Path, data: bytes) -> None:
    """Write secret material readable by its owner only (mode 0600), atomically (``write_atomic``)."""
    write_atomic(path, data, mode=0o600)


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``cert`` carries a valid signature of ``ca_cert`` (and names it as issuer)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def valid_now(cert: x509.Certificate) -> bool:
    """Whether now lies within ``cert``'s validity period."""
    now = dt.datetime.now(dt.timezone.utc)
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate, *, source: str) -> None:
    """KeyMaterialError unless ``cert`` is signed by ``ca_cert`` and valid now."""
    if not issued_by(cert, ca_cert):
        raise KeyMaterialError(
            f"{source} was not issued by this federation's CA (ca.crt); the bundle mixes files of two "
            "federations: export it again from one `fedfms-secure keys init` folder"
        )
    if not valid_now(cert):
        raise KeyMaterialError(
            f"{source} is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}; "
            "issue a new certificate with `fedfms-secure keys rotate-tls` and export the bundle again"
        )


def key_matches_cert(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private half of ``cert``'s public key."""
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*raw) == cert.public_key().public_bytes(*raw)


def common_name(cert: x509.Certificate) -> str:
    """The certificate's subject CN ('' when absent)."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


@dataclass(frozen=True)
class Revocation:
    """One revoked certificate: its serial, when, why, whose, and whether its site leaves.

    ``removes_site``: True for ``keys revoke`` (the site is out of the federation: the server
    counts it as retired), False for a certificate replaced by ``keys rotate-tls`` (the site goes
    on with its new certificate).
    """

    serial: int
    date: dt.datetime
    reason: str
    site: str
    removes_site: bool

    def to_dict(self) -> dict[str, object]:
        return {"serial": format(self.serial, "x"), "date": self.date.isoformat(timespec="seconds"),
                "reason": self.reason, "site": self.site, "removes_site": self.removes_site}

    @classmethod
    def from_dict(cls, d: dict[str, object], *, source: str) -> "Revocation":
        try:
            reason = str(d["reason"])
            if reason not in REVOCATION_REASONS:
                raise ValueError(f"unknown reason {reason!r}")
            return cls(int(str(d["serial"]), 16), dt.datetime.fromisoformat(str(d["date"])), reason, str(d["site"]),
                       bool(d["removes_site"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyMaterialError(f"{source}: a revocation record {d!r} is malformed ({exc}); restore the file "
                                   "from a backup") from None


def make_crl(
    ca_cert: x509.Certificate, ca_key: PrivateKey, revocations: Sequence[Revocation], *, number: int, days: int = 365
) -> x509.CertificateRevocationList:
    """An X.509 CRL signed by the CA listing every revocation; ``number`` is its CRL number (it
    only ever grows: a server refuses to go back to an older list)."""
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    for r in revocations:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(r.serial)
            .revocation_date(r.date)
            .add_extension(x509.CRLReason(REVOCATION_REASONS[r.reason]), critical=False)
        )
        if r.removes_site:
            name = r.site.encode()
            entry = entry.add_extension(
                x509.UnrecognizedExtension(REMOVED_SITE_OID, b"\x0c" + bytes([len(name)]) + name), critical=False
            )
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca_key, _digest_for(ca_key))


def pem_crl(crl: x509.CertificateRevocationList) -> bytes:
    """PEM encoding of a CRL."""
    return crl.public_bytes(serialization.Encoding.PEM)


def crl_from_pem(data: bytes, ca_cert: x509.Certificate, *, source: str) -> x509.CertificateRevocationList:
    """Parse a PEM CRL and check that the federation's CA signed it; KeyMaterialError naming ``source``."""
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise KeyMaterialError(
            f"{source} is not a PEM certificate revocation list ({exc}); copy ca/crl.pem from the provisioning "
            "folder again (`fedfms-secure keys revoke` writes it)"
        ) from None
    try:
        valid = crl.issuer == ca_cert.subject and crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise KeyMaterialError(
            f"{source} is not signed by this federation's CA (ca.crt): it was altered or belongs to another "
            "federation; copy ca/crl.pem from the provisioning folder again"
        )
    return crl


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL number (0 when the list has none)."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def revocations_of(crl: x509.CertificateRevocationList) -> dict[int, Revocation]:
    """The CRL's entries by serial (``site`` is known only for entries that remove a site)."""
    out = {}
    for entry in crl:
        reason, site = "unspecified", ""
        for ext in entry.extensions:
            if isinstance(ext.value, x509.CRLReason):
                reason = _REASON_NAMES.get(ext.value.reason, ext.value.reason.name)
            elif ext.oid == REMOVED_SITE_OID:
                raw = getattr(ext.value, "value", b"")
                site = raw[2:].decode("utf-8", "replace") if raw[:1] == b"\x0c" else ""
        out[entry.serial_number] = Revocation(entry.serial_number, entry.revocation_date_utc, reason, site, bool(site))
    return out


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


def _read(path: Path | str, what: str, remedy: str = _EXPORT_AGAIN) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyMaterialError(f"{what} {path} does not exist; {remedy}") from None
    except OSError as exc:
        raise KeyMaterialError(f"cannot read {what} {path}: {exc.strerror}") from None
