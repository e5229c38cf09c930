"""Server side: parse, add and re-serialize payloads without any key.

``CkksSummer`` works with the params-only context of the server bundle: it can deserialize and
add ciphertexts (and add a public plaintext vector, e.g. theta_0, to a ciphertext) but can
neither encrypt nor decrypt. ``PlainSummer`` is the ``--no-he`` baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import tenseal as ts

from fedfms_secure.crypto import payload as _payload
from fedfms_secure.crypto.ckks import is_fingerprint, params_of
from fedfms_secure.errors import ConfigError, ContextMismatchError, CryptoError, KeyMaterialError

#: values per plaintext chunk (the same as one CKKS ciphertext at N=8192)
PLAIN_CHUNK_VALUES = 4096


@runtime_checkable
class PayloadSummer(Protocol):
    """Adds payloads of one scheme; never needs a secret key."""

    #: values per full chunk: a vector of L values travels as ceil(L / chunk_values) chunks
    chunk_values: int

    def parse(self, payload: bytes) -> object:
        """Validate and deserialize; CryptoError on malformed, truncated or foreign data."""
        ...

    def add(self, a: object, b: object) -> object:
        """Sum of two parsed chunks of equal size (a new object; inputs are untouched)."""
        ...

    def dump(self, obj: object) -> bytes:
        """Serialize a parsed or summed chunk back to a payload."""
        ...

    def size(self, obj: object) -> int:
        """Number of values encoded in a parsed chunk."""
        ...

    def add_plain(self, obj: object, values: Sequence[float] | np.ndarray) -> object:
        """Chunk plus a public plaintext vector of the same size."""
        ...


class CkksSummer:
    """Adds CKKS payloads under a params-only (or any) context of the federation.

    ``fingerprint`` (from the server bundle manifest) makes ``parse`` refuse payloads tagged with
    another context; without it, ``add`` still refuses to mix two different tags.
    """

    def __init__(self, params_only_ctx: ts.Context, fingerprint: str | None = None) -> None:
        if fingerprint is not None and not is_fingerprint(fingerprint):
            raise KeyMaterialError(
                f"{fingerprint!r} is not a CKKS context fingerprint (64 hex digits); read it from the server "
                "bundle (Bundle.fingerprint)"
            )
        self._ctx = params_only_ctx
        self.fingerprint = fingerprint
        params = params_of(params_only_ctx)
        self.bound = params.value_bound
        self.chunk_values = params.slots

    def parse(self, payload: bytes) -> _payload.CkksChunk:
        return _payload.parse(payload, self._ctx, expected_fingerprint=self.fingerprint)

    def add(self, a: object, b: object) -> _payload.CkksChunk:
        a, b = self._chunk(a), self._chunk(b)
        if a.fingerprint != b.fingerprint:
            raise ContextMismatchError(
                f"cannot add ciphertexts of two contexts ({a.fingerprint[:16]}... and {b.fingerprint[:16]}...); "
                "every site must use a bundle from the same `fedfms-secure keys init`"
            )
        _same_size(a.size, b.size)
        return _payload.CkksChunk(vector=a.vector + b.vector, fingerprint=a.fingerprint)

    def add_plain(self, obj: object, values: Sequence[float] | np.ndarray) -> _payload.CkksChunk:
        chunk = self._chunk(obj)
        plain = _finite(values)
        _same_size(chunk.size, plain.size)
        peak = float(np.max(np.abs(plain))) if plain.size else 0.0
        if peak > self.bound:
            raise CryptoError(f"plaintext addend max |value| {peak:.6g} exceeds the CKKS bound {self.bound:.6g}")
        try:
            vector = chunk.vector + plain.tolist()
        except (ValueError, RuntimeError, TypeError) as exc:
            raise CryptoError(f"TenSEAL cannot add the plaintext vector to the ciphertext ({exc})") from None
        return _payload.CkksChunk(vector=vector, fingerprint=chunk.fingerprint)

    def dump(self, obj: object) -> bytes:
        chunk = self._chunk(obj)
        return _payload.pack(chunk.vector, chunk.fingerprint)

    def size(self, obj: object) -> int:
        return self._chunk(obj).size

    @staticmethod
    def _chunk(obj: object) -> _payload.CkksChunk:
        if not isinstance(obj, _payload.CkksChunk):
            raise TypeError(f"expected a chunk from CkksSummer.parse, got {type(obj).__name__}")
        return obj


class PlainSummer:
    """Adds float64 little-endian payloads (the ``--no-he`` baseline)."""

    chunk_values = PLAIN_CHUNK_VALUES

    def parse(self, payload: bytes) -> np.ndarray:
        return plain_from_bytes(payload)

    def add(self, a: object, b: object) -> np.ndarray:
        a, b = self._array(a), self._array(b)
        _same_size(a.size, b.size)
        return a + b

    def add_plain(self, obj: object, values: Sequence[float] | np.ndarray) -> np.ndarray:
        return self.add(obj, _finite(values))

    def dump(self, obj: object) -> bytes:
        return self._array(obj).astype("<f8").tobytes()

    def size(self, obj: object) -> int:
        return int(self._array(obj).size)

    @staticmethod
    def _array(obj: object) -> np.ndarray:
        if not isinstance(obj, np.ndarray) or obj.ndim != 1:
            raise TypeError(f"expected a 1-D array from PlainSummer.parse, got {type(obj).__name__}")
        return obj


def make_summer(scheme: str, ctx: ts.Context | None, fingerprint: str | None = None) -> PayloadSummer:
    """The server summer for ``scheme`` ("ckks" needs the params-only context; "plain" ignores it)."""
    if scheme == "ckks":
        if ctx is None:
            raise KeyMaterialError(
                "scheme 'ckks' needs the server's params-only CKKS context (ckks.ctx of the server bundle)"
            )
        return CkksSummer(ctx, fingerprint)
    if scheme == "plain":
        return PlainSummer()
    raise ConfigError(f"unknown update scheme {scheme!r}: use 'ckks' or 'plain' (--no-he)")


def plain_from_bytes(payload: bytes) -> np.ndarray:
    """Decode and validate a plain payload (non-empty, whole float64 values, all finite)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CryptoError(f"a plain payload must be bytes, got {type(payload).__name__}")
    if len(payload) == 0 or len(payload) % 8:
        raise CryptoError(
            f"plain payload of {len(payload)} bytes is not a whole number of float64 values: truncated or not "
            "a --no-he payload"
        )
    values = np.frombuffer(bytes(payload), dtype="<f8").astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise CryptoError("plain payload holds non-finite values")
    return values


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or not np.all(np.isfinite(arr)):
        raise CryptoError("a plaintext addend must be a flat vector of finite values")
    return arr


def _same_size(a: int, b: int) -> None:
    if a != b:
        raise CryptoError(f"cannot add chunks of {a} and {b} values: chunk boundaries differ between senders")
