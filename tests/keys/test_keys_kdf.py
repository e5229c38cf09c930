"""Passphrase-protected key files use scrypt (the cost of the CKKS contexts), not PBKDF2 with 2,048 rounds.

The attack replayed: a stolen ``tls.key`` / ``envelope.key`` / ``ca.key`` is brute-forced offline.
With PBKDF2 at 2,048 iterations each guess costs about a millisecond's work of SHA-256; the files
now need a scrypt derivation (n=2**15, r=8: 32 MiB of memory) per guess, as ``he/epoch-N.ctx`` does.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fedfms_secure.errors import KeyMaterialError
from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import load_bundle, load_envelope_key
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.pkcs8 import SCRYPT_N, SCRYPT_R, _int, _oid
from fedfms_secure.keys.provision import add_client, init_federation

PASS = b"correct horse"
SCRYPT_OID = _oid("1.3.6.1.4.1.11591.4.11")
PBKDF2_OID = _oid("1.2.840.113549.1.5.12")


def _der(pem: bytes) -> bytes:
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    return base64.b64decode(body)


def _kdf_of(pem: bytes) -> str:
    der = _der(pem)
    if SCRYPT_OID in der:
        return "scrypt"
    return "pbkdf2" if PBKDF2_OID in der else "other"


def test_every_key_file_written_with_a_passphrase_uses_scrypt(tmp_path: Path) -> None:
    prov = init_federation(tmp_path / "prov", federation="k", server_host="localhost", clients=["a", "b"],
                           he_dealer=False, passphrase=PASS)
    for rel in ("ca/ca.key", "server/tls.key", "clients/a/tls.key", "clients/a/envelope.key"):
        pem = (prov / rel).read_bytes()
        assert pki.is_encrypted_pem(pem) and _kdf_of(pem) == "scrypt", rel
        der = _der(pem)
        assert _int(SCRYPT_N) + _int(SCRYPT_R) in der  # the cost parameters, as the he/ contexts use them
    bundle = export_bundle("client", "a", prov, tmp_path / "a")
    assert load_bundle(bundle, role="client", passphrase=PASS).name == "a"
    with pytest.raises(KeyMaterialError, match=rf"wrong passphrase for {bundle / 'tls.key'}"):
        load_bundle(bundle, role="client", passphrase=b"wrong")


def test_key_files_of_the_old_pbkdf2_setting_still_load(tmp_path: Path) -> None:
    prov = init_federation(tmp_path / "prov", federation="k", server_host="localhost", clients=["a", "b"],
                           he_dealer=False, passphrase=PASS)
    # rewrite every key as the earlier code did (BestAvailableEncryption: PBKDF2, 2,048 iterations)
    for rel in ("ca/ca.key", "clients/a/tls.key", "clients/a/envelope.key"):
        key = serialization.load_pem_private_key((prov / rel).read_bytes(), password=PASS)
        old = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(PASS))
        assert _kdf_of(old) == "pbkdf2"
        pki.write_private(prov / rel, old)
    bundle = export_bundle("client", "a", prov, tmp_path / "a")
    assert load_bundle(bundle, role="client", passphrase=PASS).name == "a"
    assert pki.raw_public(load_envelope_key(bundle, passphrase=PASS)) == pki.envelope_key_of(
        pki.load_cert(bundle / "tls.crt"))
    add_client(prov, "c", passphrase=PASS)  # opens the old ca.key; the new keys are written with scrypt
    assert _kdf_of((prov / "clients" / "c" / "tls.key").read_bytes()) == "scrypt"
    # a wrong passphrase on an old file gives the same clear error as before
    with pytest.raises(KeyMaterialError, match=rf"wrong passphrase for {bundle / 'envelope.key'}"):
        load_envelope_key(bundle, passphrase=b"wrong")
    with pytest.raises(KeyMaterialError, match="wrong passphrase for .*ca.key"):
        add_client(prov, "d", passphrase=b"wrong")
