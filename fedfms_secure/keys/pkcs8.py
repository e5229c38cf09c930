"""Passphrase protection of private key files at rest: PKCS#8 encrypted with scrypt.

Every passphrase-protected key file (``ca.key``, ``tls.key``, ``envelope.key``) is a standard
PKCS#8 ``EncryptedPrivateKeyInfo`` (PEM ``ENCRYPTED PRIVATE KEY``): PBES2 with the scrypt KDF
(RFC 7914; n=2**15, r=8, p=1, 16-byte random salt, the cost of the CKKS contexts in ``he/``) and
AES-256-CBC. ``cryptography``'s BestAvailableEncryption uses PBKDF2 with only 2,048 iterations and
offers no stronger setting for PKCS#8, hence this encoder. Any PKCS#8 file, including those written
with the older PBKDF2 setting, is read by ``cryptography.load_pem_private_key`` as before.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = ["SCRYPT_N", "SCRYPT_P", "SCRYPT_R", "encrypt_at_rest"]

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_PBES2 = "1.2.840.113549.1.5.13"
_SCRYPT = "1.3.6.1.4.1.11591.4.11"
_AES256_CBC = "2.16.840.1.101.3.4.1.42"


def encrypt_at_rest(key: Any, passphrase: bytes) -> bytes:
    """``key`` (any private key ``cryptography`` serializes as PKCS#8) as an encrypted PKCS#8 PEM."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    salt, iv = os.urandom(16), os.urandom(16)
    aes_key = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padder.update(der) + padder.finalize()) + encryptor.finalize()
    kdf = _seq(_oid(_SCRYPT), _seq(_octets(salt), _int(SCRYPT_N), _int(SCRYPT_R), _int(SCRYPT_P), _int(32)))
    scheme = _seq(_oid(_AES256_CBC), _octets(iv))
    info = _seq(_seq(_oid(_PBES2), _seq(kdf, scheme)), _octets(ciphertext))
    text = base64.b64encode(info).decode()
    lines = "\n".join(text[i:i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN ENCRYPTED PRIVATE KEY-----\n{lines}\n-----END ENCRYPTED PRIVATE KEY-----\n".encode()


# --- DER, just what EncryptedPrivateKeyInfo needs -------------------------------------------------
def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _seq(*parts: bytes) -> bytes:
    return _tlv(0x30, b"".join(parts))


def _octets(data: bytes) -> bytes:
    return _tlv(0x04, data)


def _int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytes([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, out)
