"""Re-encrypt the global state under a new CKKS key (``keys rotate-he``).

A site that holds the current key decrypts each chunk of the global state and encrypts the same
content under the new context. For the packed scheme this is exact: the decrypted coefficients are
the packed integer sums themselves, they are encrypted again as they are, and the chunk keeps its
count of summands, so the carry headroom of later rounds is accounted as before. For the
one-value-per-slot scheme the values are decrypted and encrypted again, within CKKS precision.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedfms_secure.he import packing as _packing
from fedfms_secure.he import payload as _payload
from fedfms_secure.he.codec import CkksCodec, PackedCkksCodec, UpdateCodec
from fedfms_secure.errors import CryptoError, KeyMaterialError
from fedfms_secure.protocol import Chunk


def reencrypt_chunks(old: UpdateCodec, new: UpdateCodec, chunks: Sequence[Chunk]) -> list[Chunk]:
    """``chunks`` (made under ``old``'s key) with the same content under ``new``'s key and fingerprint."""
    if type(old) is not type(new) or old.chunk_values != new.chunk_values:
        raise KeyMaterialError(
            f"cannot re-encrypt from a {type(old).__name__} to a {type(new).__name__} with other parameters: "
            "the new context must have the manifest's parameters"
        )
    out = []
    for chunk in chunks:
        if chunk.fingerprint != old.fingerprint:
            raise CryptoError(
                f"global-state chunk {chunk.index} was made under context {chunk.fingerprint[:16]}..., not under "
                f"this site's current key {old.fingerprint[:16]}...: fetch the current key first"
            )
        out.append(Chunk(chunk.round, chunk.index, chunk.total, chunk.num_values, new.fingerprint,
                         _reencrypt(old, new, chunk.payload, chunk.num_values), chunk.vector_length))
    return out


def _reencrypt(old: UpdateCodec, new: UpdateCodec, payload: bytes, count: int) -> bytes:
    if isinstance(old, PackedCkksCodec) and isinstance(new, PackedCkksCodec):
        parsed = old._parse(payload)  # noqa: SLF001 - same package: the codec's checked decryption
        if parsed.kind != _payload.KIND_VECTOR:
            raise CryptoError("a global-state chunk must be a vector chunk, not an encrypted scalar")
        coeffs = old._decrypt(parsed)  # the packed integer sums, checked against the noise bound
        ops = new._ops  # noqa: SLF001
        ciphertext = ops.encrypt_seeded(ops.encode(_packing.embed(coeffs)))
        return _payload.pack_packed(ops.vector_body(ciphertext), new.fingerprint, new.layout, parsed.kind,
                                    parsed.count, parsed.summands)
    if isinstance(old, CkksCodec) and isinstance(new, CkksCodec):
        (again,) = new.encrypt_vector(old.decrypt_vector([payload], count))
        return again
    raise KeyMaterialError(f"{type(old).__name__} has no CKKS key to rotate (is the federation running --no-he?)")
