"""Sealed envelopes: a CKKS secret context sealed to one site, signed by another (real X25519,
AES-GCM, ECDSA and TenSEAL; every tampering is rejected with a named reason)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from fedfms_secure.keys import envelope as env
from fedfms_secure.keys import pki
from fedfms_secure.he.ckks import (
    context_fingerprint,
    load_context,
    new_secret_context,
    serialize_params_only,
    serialize_site_context,
)
from fedfms_secure.he.codec import make_site_codec
from fedfms_secure.he.packing import fit_params
from fedfms_secure.errors import CryptoError, KeyMaterialError

SITES = ("site-a", "site-b", "site-c")
FED = "fed"


@dataclass
class Party:
    name: str
    key: pki.PrivateKey
    cert_pem: bytes
    box: X25519PrivateKey


@dataclass
class World:
    ca_pem: bytes
    ca: x509.Certificate
    ca_key: pki.PrivateKey
    parties: dict[str, Party]
    server: Party
    params: object
    context_bytes: bytes
    fingerprint: str

    def recipients(self) -> dict[str, bytes]:
        return {name: env._raw(p.box.public_key()) for name, p in self.parties.items()}


@pytest.fixture(scope="module")
def world() -> World:
    ca_key = pki.new_private_key()
    ca = pki.make_ca("fedfms-secure fed CA", ca_key)
    parties = {}
    for name in SITES:
        key = pki.new_private_key()
        cert = pki.issue_certificate(ca, ca_key, name, key, role="client")
        parties[name] = Party(name, key, pki.pem_cert(cert), X25519PrivateKey.generate())
    server_key = pki.new_private_key()
    server_cert = pki.issue_certificate(ca, ca_key, "localhost", server_key, role="server", hosts=["localhost"])
    server = Party("localhost", server_key, pki.pem_cert(server_cert), X25519PrivateKey.generate())
    params = fit_params(bound=1.0, sites=len(SITES), rounds=4)
    ctx = new_secret_context(params)
    return World(pki.pem_cert(ca), ca, ca_key, parties, server, params, serialize_site_context(ctx),
                 context_fingerprint(ctx))


@pytest.fixture(scope="module")
def sealed(world: World) -> dict[str, bytes]:
    a = world.parties["site-a"]
    return env.seal_for_sites(
        world.context_bytes, federation=FED, epoch=1, params=world.params, sender="site-a", sender_key=a.key,
        sender_cert_pem=a.cert_pem, recipients=world.recipients(),
    )


def _open(world: World, envelope: bytes, recipient: str = "site-b", **kw) -> env.OpenedEnvelope:
    args = dict(recipient=recipient, recipient_key=world.parties[recipient].box, federation=FED, sites=SITES,
                ca_pem=world.ca_pem, params=world.params)
    args.update(kw)
    return env.open_envelope(envelope, **args)


def _doc(envelope: bytes) -> dict:
    return json.loads(envelope)


def _dump(doc: dict) -> bytes:
    return env._canonical(doc)


def _resign(doc: dict, party: Party) -> bytes:
    doc = {k: v for k, v in doc.items() if k != "signature"}
    doc["sender_cert"] = party.cert_pem.decode()
    doc["signature"] = env._b64(env._sign(party.key, env._signed_bytes(doc)))
    return _dump(doc)


def test_each_site_opens_its_own_envelope_and_gets_the_same_working_key(world: World, sealed: dict[str, bytes]) -> None:
    assert sorted(sealed) == ["site-b", "site-c"]  # the sender keeps its context directly
    opened = {name: _open(world, sealed[name], name, epoch=1, fingerprint=world.fingerprint) for name in sealed}
    for name, item in opened.items():
        assert item.header.recipient == name and item.header.sender == "site-a" and item.header.epoch == 1
        assert item.header.context_fingerprint == world.fingerprint
        assert item.header.params_fingerprint == env.params_fingerprint(world.params)
        assert "context_bytes" not in repr(item)
    # what site-a encrypts, site-b and site-c decrypt
    sender = make_site_codec("ckks", load_context(world.context_bytes, source="a"), world.fingerprint, world.params)
    update = np.linspace(-0.5, 0.5, 1000)
    payloads = sender.encrypt_vector(update)
    for item in opened.values():
        ctx = load_context(item.context_bytes, source="opened")
        codec = make_site_codec("ckks", ctx, world.fingerprint, world.params)
        np.testing.assert_allclose(codec.decrypt_vector(payloads, update.size), update, atol=2 * sender.step)


def test_envelope_is_fresh_each_time(world: World, sealed: dict[str, bytes]) -> None:
    """A new ephemeral key and nonce per envelope: sealing the same context twice looks unrelated."""
    again = env.seal_for_sites(world.context_bytes, federation=FED, epoch=1, params=world.params, sender="site-a",
                               sender_key=world.parties["site-a"].key, sender_cert_pem=world.parties["site-a"].cert_pem,
                               recipients={"site-b": world.recipients()["site-b"]})
    first, second = _doc(sealed["site-b"]), _doc(again["site-b"])
    for part in ("ephemeral", "nonce", "ciphertext"):
        assert first[part] != second[part]


def test_server_cannot_open_an_envelope(world: World, sealed: dict[str, bytes]) -> None:
    """The server has no envelope key of any site; any key it could make fails the AEAD."""
    doc = _doc(sealed["site-b"])
    ciphertext = base64.b64decode(doc["ciphertext"])
    assert world.context_bytes not in ciphertext and len(ciphertext) == len(world.context_bytes) + 16
    with pytest.raises(CryptoError, match="does not decrypt with this site's envelope key"):
        _open(world, sealed["site-b"], recipient_key=world.server.box)
    # nor is any part of the serialized secret context readable in the relayed bytes
    for start in range(0, len(world.context_bytes) - 64, 4096):
        assert world.context_bytes[start : start + 64] not in sealed["site-b"]


def test_wrong_recipient_is_refused(world: World, sealed: dict[str, bytes]) -> None:
    with pytest.raises(KeyMaterialError, match="sealed to site 'site-b', not to this site 'site-c'"):
        _open(world, sealed["site-b"], recipient="site-c")
    # the right name but another site's key: the AEAD fails
    with pytest.raises(CryptoError, match="does not decrypt"):
        _open(world, sealed["site-b"], recipient_key=world.parties["site-c"].box)


@pytest.mark.parametrize(
    "field_name, value",
    [("federation", "other"), ("epoch", 2), ("context_fingerprint", "0" * 64), ("params_fingerprint", "1" * 64),
     ("sender", "site-c"), ("recipient", "site-c"), ("created", "2000-01-01T00:00:00+00:00")],
)
def test_any_tampered_header_field_is_rejected(world: World, sealed: dict[str, bytes], field_name: str,
                                               value: object) -> None:
    doc = _doc(sealed["site-b"])
    doc["header"][field_name] = value
    with pytest.raises((CryptoError, KeyMaterialError)) as info:
        _open(world, _dump(doc), recipient="site-b")
    # a header that names another sender fails on the certificate, every other field on the signature
    assert ("belongs to 'site-a'" if field_name == "sender" else "signature of 'site-a' does not verify") in str(info.value)


def test_header_changed_and_resigned_by_the_sender_fails_the_aead(world: World, sealed: dict[str, bytes]) -> None:
    """The header is also the AEAD's associated data: a validly signed but different header fails."""
    doc = _doc(sealed["site-b"])
    doc["header"]["created"] = "2000-01-01T00:00:00+00:00"
    with pytest.raises(CryptoError, match="does not decrypt"):
        _open(world, _resign(doc, world.parties["site-a"]))


@pytest.mark.parametrize("part", ["ciphertext", "nonce", "ephemeral"])
def test_tampered_ciphertext_nonce_or_key_is_rejected(world: World, sealed: dict[str, bytes], part: str) -> None:
    doc = _doc(sealed["site-b"])
    raw = bytearray(base64.b64decode(doc[part]))
    raw[len(raw) // 2] ^= 0x01
    doc[part] = env._b64(bytes(raw))
    with pytest.raises(CryptoError, match="signature of 'site-a' does not verify"):
        _open(world, _dump(doc))
    # even re-signed by the sender, the AEAD refuses a modified byte
    with pytest.raises(CryptoError, match="does not decrypt"):
        _open(world, _resign(doc, world.parties["site-a"]))


def test_tampered_signature_is_rejected(world: World, sealed: dict[str, bytes]) -> None:
    doc = _doc(sealed["site-b"])
    signature = bytearray(base64.b64decode(doc["signature"]))
    signature[-1] ^= 0x01
    doc["signature"] = env._b64(bytes(signature))
    with pytest.raises(CryptoError, match="does not verify"):
        _open(world, _dump(doc))
    doc["signature"] = "not base64!"
    with pytest.raises(CryptoError, match="signature is not valid base64"):
        _open(world, _dump(doc))


def test_sender_certified_by_another_ca_is_rejected(world: World) -> None:
    """A party with its own CA (e.g. the server) cannot pass as site-a."""
    rogue_ca_key = pki.new_private_key()
    rogue_ca = pki.make_ca("fedfms-secure fed CA", rogue_ca_key)
    key = pki.new_private_key()
    cert = pki.issue_certificate(rogue_ca, rogue_ca_key, "site-a", key, role="client")
    forged = env.seal_for_sites(world.context_bytes, federation=FED, epoch=1, params=world.params, sender="site-a",
                                sender_key=key, sender_cert_pem=pki.pem_cert(cert),
                                recipients={"site-b": world.recipients()["site-b"]})
    with pytest.raises(KeyMaterialError, match="not issued by this federation's CA"):
        _open(world, forged["site-b"])


def test_the_server_cannot_sign_envelopes(world: World) -> None:
    """The server's own certificate (serverAuth) is refused, under its name or a site's."""
    ctx = new_secret_context(world.params)  # a key the server would like the sites to use
    own = serialize_site_context(ctx)
    as_server = env.seal_for_sites(own, federation=FED, epoch=1, params=world.params, sender="localhost",
                                   sender_key=world.server.key, sender_cert_pem=world.server.cert_pem,
                                   recipients={"site-b": world.recipients()["site-b"]})
    with pytest.raises(KeyMaterialError, match="sender 'localhost' is not a site of this federation"):
        _open(world, as_server["site-b"])
    # a server-role certificate that carries a site's name (a CA mistake) is still no site certificate
    key = pki.new_private_key()
    cert = pki.issue_certificate(world.ca, world.ca_key, "site-a", key, role="server", hosts=["localhost"])
    disguised = env.seal_for_sites(own, federation=FED, epoch=1, params=world.params, sender="site-a",
                                   sender_key=key, sender_cert_pem=pki.pem_cert(cert),
                                   recipients={"site-b": world.recipients()["site-b"]})
    with pytest.raises(KeyMaterialError, match="not a site certificate"):
        _open(world, disguised["site-b"])


def test_sender_outside_the_federation_is_rejected(world: World, sealed: dict[str, bytes]) -> None:
    with pytest.raises(KeyMaterialError, match="sender 'site-a' is not a site of this federation"):
        _open(world, sealed["site-b"], sites=("site-b", "site-c"))


def test_expired_sender_certificate_is_rejected(world: World) -> None:
    key = pki.new_private_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-a")]))
        .issuer_name(world.ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(world.ca_key, hashes.SHA256())
    )
    old = env.seal_for_sites(world.context_bytes, federation=FED, epoch=1, params=world.params, sender="site-a",
                             sender_key=key, sender_cert_pem=pki.pem_cert(cert),
                             recipients={"site-b": world.recipients()["site-b"]})
    with pytest.raises(KeyMaterialError, match="certificate is valid only from"):
        _open(world, old["site-b"])


def test_announced_epoch_fingerprint_federation_and_params_must_match(world: World, sealed: dict[str, bytes]) -> None:
    with pytest.raises(KeyMaterialError, match="for key epoch 1, the server announced epoch 2"):
        _open(world, sealed["site-b"], epoch=2)
    with pytest.raises(KeyMaterialError, match="the server announced 0000000000000000"):
        _open(world, sealed["site-b"], fingerprint="0" * 64)
    with pytest.raises(KeyMaterialError, match="belongs to federation 'fed'"):
        _open(world, sealed["site-b"], federation="other")
    other = fit_params(bound=2.0, sites=len(SITES), rounds=4)
    with pytest.raises(KeyMaterialError, match="sealed for CKKS parameters"):
        _open(world, sealed["site-b"], params=other)


def test_header_fingerprint_must_be_the_sealed_contexts(world: World) -> None:
    """A sender that lies about the fingerprint in its header is caught after opening."""
    a = world.parties["site-a"]
    header = env.EnvelopeHeader(FED, 1, "ab" * 32, env.params_fingerprint(world.params), "site-a", "site-b", "now")
    lying = env.seal_context(world.context_bytes, header=header, recipient_public=world.recipients()["site-b"],
                             sender_key=a.key, sender_cert_pem=a.cert_pem)
    with pytest.raises(CryptoError, match="opened context has fingerprint"):
        _open(world, lying)
    # and a params-only context is useless to a site
    keyless = serialize_params_only(load_context(world.context_bytes, source="a"))
    header = env.EnvelopeHeader(FED, 1, world.fingerprint, env.params_fingerprint(world.params), "site-a", "site-b", "now")
    empty = env.seal_context(keyless, header=header, recipient_public=world.recipients()["site-b"],
                             sender_key=a.key, sender_cert_pem=a.cert_pem)
    with pytest.raises(CryptoError, match="without the secret key"):
        _open(world, empty)
    with pytest.raises(KeyMaterialError, match="no secret key"):
        env.seal_for_sites(keyless, federation=FED, epoch=1, params=world.params, sender="site-a", sender_key=a.key,
                           sender_cert_pem=a.cert_pem, recipients=world.recipients())


@pytest.mark.parametrize(
    "data, message",
    [(b"", "is empty"), (b"\xff\xfe", "not JSON"), (b"[1]", "expected the fields"),
     (b'{"version": 1}', "expected the fields")],
)
def test_malformed_envelopes_are_named(world: World, data: bytes, message: str) -> None:
    with pytest.raises(CryptoError, match=message):
        _open(world, data)


def test_unknown_version_and_bad_header_types(world: World, sealed: dict[str, bytes]) -> None:
    doc = _doc(sealed["site-b"])
    doc["version"] = 9
    with pytest.raises(CryptoError, match="envelope version 9"):
        _open(world, _dump(doc))
    doc = _doc(sealed["site-b"])
    doc["header"]["epoch"] = "1"
    with pytest.raises(CryptoError, match="header field epoch '1' is not an integer"):
        _open(world, _dump(doc))
    doc["header"]["epoch"] = 0
    with pytest.raises(CryptoError, match="not a key epoch"):
        _open(world, _dump(doc))
    assert env.peek_header(sealed["site-b"]).recipient == "site-b"


def test_bad_recipient_key_is_named(world: World) -> None:
    a = world.parties["site-a"]
    with pytest.raises(KeyMaterialError, match="envelope key of site 'site-b' is not a raw 32-byte X25519"):
        env.seal_for_sites(world.context_bytes, federation=FED, epoch=1, params=world.params, sender="site-a",
                           sender_key=a.key, sender_cert_pem=a.cert_pem, recipients={"site-b": b"short"})
