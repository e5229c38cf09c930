"""SEAL-level operations the packed scheme needs beyond TenSEAL's CKKSVector (``tenseal.sealapi``).

TenSEAL's vectors encode real slot values only; the packed scheme encodes complex slots (so that
the plaintext's coefficients are the packed integers), encrypts with the secret key into a
*seeded* ciphertext (half the bytes) and decodes complex slots after decryption. Objects from
``tenseal._ts_cpp`` (SEALContext, Ciphertext, keys) and ``tenseal.sealapi`` interoperate.

SEAL serializes only to files through these bindings; ``_save`` writes into an anonymous
in-memory file (``memfd``) where Linux has one, else a private temporary file.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import tenseal as ts
from tenseal import sealapi

from fedfms_secure.he import _wire
from fedfms_secure.errors import CryptoError


class SealOps:
    """Encoder, evaluator and (with the secret key) encryptor/decryptor of one context."""

    def __init__(self, ctx: ts.Context) -> None:
        self.ctx = ctx
        self.seal = ctx.seal_context().data
        self.parms_id = self.seal.first_parms_id()
        self.scale = float(ctx.global_scale)
        self.slots = self.seal.key_context_data().parms().poly_modulus_degree() // 2
        self.encoder = sealapi.CKKSEncoder(self.seal)
        self.evaluator = sealapi.Evaluator(self.seal)
        if ctx.has_secret_key():
            secret = ctx.secret_key().data
            self.encryptor = sealapi.Encryptor(self.seal, secret)
            self.decryptor = sealapi.Decryptor(self.seal, secret)
        else:
            self.encryptor = self.decryptor = None

    def encode(self, slots: np.ndarray) -> Any:
        """A plaintext at the data level and the context's scale from N/2 complex slot values."""
        plain = sealapi.Plaintext()
        try:
            self.encoder.encode(slots.tolist(), self.parms_id, self.scale, plain)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise CryptoError(f"SEAL cannot encode this chunk ({exc}); its values exceed the modulus") from None
        return plain

    def encrypt_seeded(self, plain: Any) -> bytes:
        """Secret-key encryption, serialized with the seed in place of the second polynomial."""
        if self.encryptor is None:
            raise CryptoError("this context has no secret key: it cannot encrypt")
        return _save(self.encryptor.encrypt_symmetric(plain))

    def decrypt_slots(self, vector: ts.CKKSVector) -> np.ndarray:
        """The N/2 complex slot values (divided by the scale) of a chunk's one ciphertext."""
        if self.decryptor is None:
            raise CryptoError("this context has no secret key: it cannot decrypt")
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(vector.ciphertext()[0], plain)
        return np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128)

    def add_plain(self, vector: ts.CKKSVector, plain: Any) -> bytes:
        """The serialized SEAL ciphertext of ``vector`` plus ``plain`` (no key needed)."""
        ct = vector.ciphertext()[0]
        self.evaluator.add_plain_inplace(ct, plain)
        return _save(ct)

    def vector_body(self, ciphertext: bytes) -> bytes:
        """A TenSEAL CKKSVector message holding one SEAL ciphertext over every slot."""
        sizes = _wire.varint(self.slots)
        return (
            b"\x0a" + _wire.varint(len(sizes)) + sizes
            + b"\x12" + _wire.varint(len(ciphertext)) + ciphertext
            + b"\x19" + np.float64(self.scale).tobytes()
        )


def _save(obj: Any) -> bytes:
    """``obj.save(path)`` into memory, returned as bytes."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd("fedfms-ckks", getattr(os, "MFD_CLOEXEC", 0))
        try:
            obj.save(f"/proc/self/fd/{fd}")
            return os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="fedfms-ckks-") as folder:  # created 0700
        path = os.path.join(folder, "ct")
        obj.save(path)
        with open(path, "rb") as fh:
            return fh.read()
