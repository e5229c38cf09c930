"""Sealed envelopes: a site's CKKS secret context, encrypted to one other site and signed.

The CKKS secret key of a federation is generated at one site (``fedfms-secure keys he-init``) and
must reach every other site through the server, which must never be able to read it. Each copy
is sealed for one recipient::

    ephemeral X25519 key e;  shared = X25519(e, recipient's envelope key)
    key = HKDF-SHA256(shared, salt = e.pub || recipient.pub, info = DOMAIN)
    ciphertext = AES-256-GCM(key, nonce, serialized secret context, associated data = header)
    signature  = the sender's TLS private key (ECDSA P-256 / SHA-256) over everything above

The header (canonical JSON: federation, epoch, context fingerprint, params fingerprint, sender,
recipient, created) is authenticated twice: as the AEAD's associated data and under the
signature. The recipient's X25519 public key comes from its bundle manifest (``envelope_keys``).

**Why the signature.** Anyone who knows a site's public envelope key can seal *something* to it,
the server included. Without the signature a malicious server could generate a CKKS context of
its own, seal it to every site as "the federation's key" and then decrypt every update the sites
encrypt under it. So a recipient accepts only an envelope signed by a *site* of the federation:
the signing certificate travels in the envelope, must be issued by the federation CA of the
recipient's bundle (``ca.crt``), be valid now, carry the ``clientAuth`` usage of a site
certificate (the server's certificate is ``serverAuth``), name the header's sender as its common
name, and that sender must be one of the federation's sites. A CA that turns malicious can still
issue a fake site certificate: the CA is trusted (README, "Trust model").

``open_envelope`` checks, in order: the envelope's structure; the sender certificate and the
signature (so that every later check reads signed data); that it is addressed to this site, for
this federation, the expected epoch and fingerprint, and the manifest's parameters; the AEAD
(which fails for another recipient's key and for any modified byte); and that the opened context
holds the secret key, has the manifest's parameters and exactly the header's context fingerprint. A sender
that the CA's revocation list removed (``revoked_sites``, from the site bundle's ``crl.pem``) is
refused first: its certificate may still be valid, and a malicious server could otherwise relay a
key that a revoked site made. Each failure raises ``CryptoError`` (the envelope
is damaged or forged) or ``KeyMaterialError`` (it does not belong to this site or federation),
naming what failed and what to do.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import params_fingerprint  # the manifest's ckks.params_fingerprint
from fedfms_secure.he.ckks import CkksParams, context_fingerprint, is_fingerprint, load_context, params_of
from fedfms_secure.errors import CryptoError, KeyMaterialError

__all__ = [
    "EnvelopeHeader",
    "OpenedEnvelope",
    "open_envelope",
    "params_fingerprint",
    "peek_header",
    "seal_context",
    "seal_for_sites",
]

VERSION = 1
_DOMAIN = b"fedfms-secure/he-envelope/v1"
_SIGN_DOMAIN = b"fedfms-secure/he-envelope-signature/v1\x00"
_FIELDS = ("version", "header", "ephemeral", "nonce", "ciphertext", "sender_cert", "signature")
_REDO = "ask the sending site to publish the key again (`fedfms-secure keys rotate-he`, or `keys he-init` before epoch 1)"


@dataclass(frozen=True)
class EnvelopeHeader:
    """What an envelope says about itself; authenticated by the AEAD and by the sender's signature."""

    federation: str
    epoch: int
    context_fingerprint: str
    params_fingerprint: str
    sender: str
    recipient: str
    created: str

    def canonical(self) -> bytes:
        """The header as canonical JSON (sorted keys, no spaces): the AEAD's associated data."""
        return _canonical(asdict(self))

    @classmethod
    def from_dict(cls, data: Any, *, source: str) -> EnvelopeHeader:
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or sorted(data) != sorted(names):
            raise CryptoError(f"{source}: the header is not an object with exactly {', '.join(names)}; {_REDO}")
        for name in names:
            expected = int if name == "epoch" else str
            if not isinstance(data[name], expected) or isinstance(data[name], bool):
                kind = "an integer" if expected is int else "a string"
                raise CryptoError(f"{source}: header field {name} {_short(data[name])} is not {kind}; {_REDO}")
        if data["epoch"] < 1:
            raise CryptoError(f"{source}: header epoch {data['epoch']} is not a key epoch (1, 2, ...); {_REDO}")
        for name in ("context_fingerprint", "params_fingerprint"):
            if not is_fingerprint(data[name]):
                raise CryptoError(f"{source}: header {name} {_short(data[name])} is not 64 hex digits; {_REDO}")
        return cls(**data)


@dataclass(frozen=True)
class OpenedEnvelope:
    """A verified envelope: its header and the serialized secret context (kept out of ``repr``)."""

    header: EnvelopeHeader
    context_bytes: bytes = field(repr=False)


def seal_context(
    context_bytes: bytes,
    *,
    header: EnvelopeHeader,
    recipient_public: bytes | X25519PublicKey,
    sender_key: pki.PrivateKey,
    sender_cert_pem: bytes,
) -> bytes:
    """One envelope: ``context_bytes`` (a serialized secret context) sealed to ``recipient_public``
    (raw 32 bytes or a key object) and signed with ``sender_key`` (the sender's TLS key)."""
    recipient = _x25519_public(recipient_public, what=f"envelope key of site {header.recipient!r}")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = _raw(ephemeral.public_key())
    key = _derive(ephemeral.exchange(recipient), ephemeral_raw, _raw(recipient))
    nonce = os.urandom(12)
    ciphertext = AESGCM(key).encrypt(nonce, bytes(context_bytes), header.canonical())
    doc: dict[str, Any] = {
        "version": VERSION,
        "header": asdict(header),
        "ephemeral": _b64(ephemeral_raw),
        "nonce": _b64(nonce),
        "ciphertext": _b64(ciphertext),
        "sender_cert": sender_cert_pem.decode("ascii"),
    }
    doc["signature"] = _b64(_sign(sender_key, _signed_bytes(doc)))
    return _canonical(doc)


def seal_for_sites(
    context_bytes: bytes,
    *,
    federation: str,
    epoch: int,
    params: CkksParams,
    sender: str,
    sender_key: pki.PrivateKey,
    sender_cert_pem: bytes,
    recipients: Mapping[str, bytes | X25519PublicKey],
) -> dict[str, bytes]:
    """One envelope per recipient site (``{site: envelope}``) for the secret context ``context_bytes``.

    The context must hold the secret key and have ``params``' ring; its fingerprint goes in every
    header. The sender itself is never a recipient: it keeps the context directly.
    """
    ctx = load_context(context_bytes, source="the CKKS context to seal")
    if not ctx.has_secret_key():
        raise KeyMaterialError("the CKKS context to seal has no secret key: seal the site context, not a params-only one")
    if params_of(ctx) != params.ring:
        raise KeyMaterialError(
            f"the CKKS context to seal has parameters {params_of(ctx).to_dict()}, the manifest says "
            f"{params.ring.to_dict()}: generate it from the bundle's parameters"
        )
    fingerprint = context_fingerprint(ctx)
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    out = {}
    for site, public in recipients.items():
        if site == sender:
            continue
        header = EnvelopeHeader(federation, epoch, fingerprint, params_fingerprint(params), sender, site, created)
        out[site] = seal_context(context_bytes, header=header, recipient_public=public, sender_key=sender_key,
                                 sender_cert_pem=sender_cert_pem)
    return out


def peek_header(envelope: bytes, *, source: str = "envelope") -> EnvelopeHeader:
    """The header, parsed but NOT verified (for logs and routing); ``open_envelope`` verifies it."""
    return EnvelopeHeader.from_dict(_parse(envelope, source)["header"], source=source)


def open_envelope(
    envelope: bytes,
    *,
    recipient: str,
    recipient_key: X25519PrivateKey,
    federation: str,
    sites: Sequence[str],
    ca_pem: bytes,
    params: CkksParams,
    epoch: int | None = None,
    fingerprint: str | None = None,
    source: str = "envelope",
    revoked_sites: Collection[str] = (),
) -> OpenedEnvelope:
    """Verify and open an envelope sealed to site ``recipient`` (see the module doc for every check).

    ``sites`` are the federation's sites (the manifest's clients), ``ca_pem`` its CA, ``params``
    its CKKS parameters; ``epoch`` and ``fingerprint``, when given, are what the server announced,
    and the header must say the same. ``revoked_sites``: sites the CA's revocation list removed
    (``keys revoke``); a site's manifest may still list them, but their envelopes are refused.
    """
    doc = _parse(envelope, source)
    header = EnvelopeHeader.from_dict(doc["header"], source=source)
    where = f"{source} (epoch {header.epoch}, from {_short(header.sender)} to {_short(header.recipient)})"
    if header.sender in revoked_sites:
        raise KeyMaterialError(
            f"{where}: sender {_short(header.sender)} was revoked by the federation CA (crl.pem): a revoked site may "
            "not publish the CKKS key. Do not use this envelope; report it to the operator and run "
            "`fedfms-secure keys rotate-he` at a site in good standing"
        )
    _check_sender(doc, header, where, sites=sites, ca_pem=ca_pem)  # first: the checks below read signed data
    if header.recipient != recipient:
        raise KeyMaterialError(
            f"{where} is sealed to site {_short(header.recipient)}, not to this site {recipient!r}: the server handed out "
            "another site's envelope; report it to the operator"
        )
    if header.federation != federation:
        raise KeyMaterialError(
            f"{where} belongs to federation {_short(header.federation)}, this bundle to {federation!r}: check --server "
            "and --keys name the same federation"
        )
    if epoch is not None and header.epoch != epoch:
        raise KeyMaterialError(
            f"{where} is for key epoch {header.epoch}, the server announced epoch {epoch}: an old envelope was "
            f"replayed; {_REDO}"
        )
    if fingerprint is not None and header.context_fingerprint != fingerprint:
        raise KeyMaterialError(
            f"{where} holds context {header.context_fingerprint[:16]}..., the server announced {fingerprint[:16]}... "
            f"for this epoch: the sending site and the server disagree; {_REDO}"
        )
    if header.params_fingerprint != params_fingerprint(params):
        raise KeyMaterialError(
            f"{where} was sealed for CKKS parameters {header.params_fingerprint[:16]}..., this bundle's manifest "
            f"has {params_fingerprint(params)[:16]}...: the sites were provisioned differently; export every bundle "
            "from one provisioning folder"
        )
    ephemeral = _x25519_public(_unb64(doc["ephemeral"], "ephemeral", source), what=f"{source}: the ephemeral key")
    nonce = _unb64(doc["nonce"], "nonce", source)
    if len(nonce) != 12:
        raise CryptoError(f"{where}: the nonce has {len(nonce)} bytes, not 12; {_REDO}")
    try:
        key = _derive(recipient_key.exchange(ephemeral), _raw(ephemeral), _raw(recipient_key.public_key()))
        context_bytes = AESGCM(key).decrypt(nonce, _unb64(doc["ciphertext"], "ciphertext", source), header.canonical())
    except (InvalidTag, ValueError):
        raise CryptoError(
            f"{where} does not decrypt with this site's envelope key (envelope.key): it was sealed to another key "
            f"(an old bundle?) or its ciphertext or header was modified; {_REDO}"
        ) from None
    ctx = load_context(context_bytes, source=f"the context in {where}")
    if not ctx.has_secret_key():
        raise CryptoError(f"{where} holds a CKKS context without the secret key: it is useless to a site; {_REDO}")
    if params_of(ctx) != params.ring:
        raise CryptoError(
            f"{where} holds a CKKS context with parameters {params_of(ctx).to_dict()}, the manifest says "
            f"{params.ring.to_dict()}; {_REDO}"
        )
    actual = context_fingerprint(ctx)
    if actual != header.context_fingerprint:
        raise CryptoError(
            f"{where}: the opened context has fingerprint {actual[:16]}..., its header says "
            f"{header.context_fingerprint[:16]}...; {_REDO}"
        )
    return OpenedEnvelope(header, bytes(context_bytes))


# --- internals ------------------------------------------------------------------------------------
def _check_sender(doc: dict[str, Any], header: EnvelopeHeader, where: str, *, sites: Sequence[str],
                  ca_pem: bytes) -> None:
    """The sender is a site certified by the federation CA, and it signed this very envelope."""
    if header.sender not in sites:
        raise KeyMaterialError(
            f"{where}: sender {_short(header.sender)} is not a site of this federation ({', '.join(sites)}); only a site "
            "may publish the CKKS key. Do not use this envelope; report it to the operator"
        )
    if not isinstance(doc["sender_cert"], str):
        raise CryptoError(f"{where}: sender_cert is not a PEM string; {_REDO}")
    try:
        cert = x509.load_pem_x509_certificate(doc["sender_cert"].encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise CryptoError(f"{where}: sender_cert is not a PEM certificate ({exc}); {_REDO}") from None
    ca = pki.cert_from_pem(ca_pem, source="the bundle's ca.crt")
    if not pki.issued_by(cert, ca):
        raise KeyMaterialError(
            f"{where}: the sender's certificate was not issued by this federation's CA (ca.crt): the envelope is "
            "forged or comes from another federation. Do not use it; report it to the operator"
        )
    if not pki.valid_now(cert):
        raise KeyMaterialError(
            f"{where}: the sender's certificate is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}; the sending site needs a new certificate (`keys rotate-tls`), "
            "then publishes the key again"
        )
    cn = pki.common_name(cert)
    if cn != header.sender:
        raise KeyMaterialError(
            f"{where}: the header names sender {_short(header.sender)}, but the signing certificate belongs to {cn!r}: "
            "the envelope is forged. Do not use it; report it to the operator"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = []
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise KeyMaterialError(
            f"{where}: the signing certificate of {cn!r} is not a site certificate (no clientAuth usage; the "
            "server's certificate never is): only a site may publish the CKKS key. Do not use this envelope"
        )
    signature = _unb64(doc["signature"], "signature", where)
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, _signed_bytes(doc), ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, _signed_bytes(doc))
        else:
            raise KeyMaterialError(f"{where}: the sender's certificate holds a {type(public).__name__} key, "
                                   "which fedfms-secure does not use")
    except InvalidSignature:
        raise CryptoError(
            f"{where}: the signature of {_short(header.sender)} does not verify: the envelope was modified after it was "
            f"sealed (header, keys, ciphertext or certificate); {_REDO}"
        ) from None


def _sign(key: pki.PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    raise KeyMaterialError(f"cannot sign an envelope with a {type(key).__name__}: use the site's TLS key (tls.key)")


def _signed_bytes(doc: dict[str, Any]) -> bytes:
    return _SIGN_DOMAIN + _canonical({k: v for k, v in doc.items() if k != "signature"})


def _derive(shared: bytes, ephemeral_raw: bytes, recipient_raw: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral_raw + recipient_raw, info=_DOMAIN).derive(shared)


def _parse(envelope: bytes, source: str) -> dict[str, Any]:
    if not isinstance(envelope, (bytes, bytearray)) or not envelope:
        raise CryptoError(f"{source} is empty: the server holds no envelope data for this site; {_REDO}")
    try:
        doc = json.loads(bytes(envelope).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CryptoError(f"{source} is not a sealed envelope (not JSON: {exc}); {_REDO}") from None
    if not isinstance(doc, dict) or sorted(doc) != sorted(_FIELDS):
        raise CryptoError(f"{source} is not a sealed envelope (expected the fields {', '.join(_FIELDS)}); {_REDO}")
    if doc["version"] != VERSION:
        raise CryptoError(f"{source} has envelope version {_short(doc['version'])}; this build reads version {VERSION}: "
                          "upgrade fedfms-secure at both sites")
    return doc


def _x25519_public(value: bytes | X25519PublicKey, *, what: str) -> X25519PublicKey:
    if isinstance(value, X25519PublicKey):
        return value
    try:
        return X25519PublicKey.from_public_bytes(bytes(value))
    except (ValueError, TypeError):
        raise KeyMaterialError(
            f"{what} is not a raw 32-byte X25519 public key; export the bundles again from the provisioning folder"
        ) from None


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _short(value: Any, limit: int = 64) -> str:
    """``repr(value)``, cut to ``limit`` characters (a header is untrusted input)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, name: str, source: str) -> bytes:
    if not isinstance(value, str):
        raise CryptoError(f"{source}: {name} is not a base64 string; {_REDO}")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise CryptoError(f"{source}: {name} is not valid base64; {_REDO}") from None
