"""Server side: parse, add and re-serialize payloads without any key.

``make_aggregator("ckks", ctx, fingerprint, params=bundle.params)`` gives a ``PackedCkksAggregator`` when
the federation's params carry a packing (``packing.py``), else ``CkksAggregator``. ``CkksAggregator`` works
with the params-only context of the server bundle: it can deserialize and add ciphertexts (and
add a public plaintext vector, e.g. theta_0, to a ciphertext) but can neither encrypt nor decrypt.
``PlainAggregator`` is the ``--no-he`` baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import tenseal as ts

from fedfms_secure.he import packing as _packing
from fedfms_secure.he import payload as _payload
from fedfms_secure.he._native import SealOps
from fedfms_secure.he.ckks import CkksParams, is_fingerprint, params_of
from fedfms_secure.errors import ConfigError, ContextMismatchError, CryptoError, KeyMaterialError

#: values per plaintext chunk (the same as one CKKS ciphertext at N=8192)
PLAIN_CHUNK_VALUES = 4096


@runtime_checkable
class PayloadAggregator(Protocol):
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


class CkksAggregator:
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
            raise TypeError(f"expected a chunk from CkksAggregator.parse, got {type(obj).__name__}")
        return obj


class PackedCkksAggregator:
    """Adds packed CKKS payloads (version 2) under the params-only context; never decrypts.

    ``chunk_values`` = N * lanes parameters per ciphertext and ``size`` reports parameters, so a
    vector of L values travels as ceil(L / chunk_values) chunks. ``add`` refuses to mix kinds,
    counts or contexts, and to sum more fresh ciphertexts than the packing has headroom for.
    """

    def __init__(self, ctx: ts.Context, fingerprint: str | None, params: CkksParams) -> None:
        if fingerprint is not None and not is_fingerprint(fingerprint):
            raise KeyMaterialError(
                f"{fingerprint!r} is not a CKKS context fingerprint (64 hex digits); read it from the server "
                "bundle (Bundle.fingerprint)"
            )
        packing = _require_packing(params, ctx)
        self._ctx = ctx
        self._ops = SealOps(ctx)
        self.fingerprint = fingerprint
        self.params = params
        self.packing = packing
        self.chunk_values = params.poly_modulus_degree * packing.lanes
        self.layout = _packing.layout_tag(params.ring.to_dict(), packing)
        self._max_summands = {_payload.KIND_VECTOR: packing.summands, _payload.KIND_SCALAR: packing.sites}

    def parse(self, payload: bytes) -> _payload.PackedChunk:
        return _payload.parse_packed(
            payload, self._ctx, expected_fingerprint=self.fingerprint, layout=self.layout,
            max_count=self.chunk_values, max_summands=self._max_summands,
        )

    def add(self, a: object, b: object) -> _payload.PackedChunk:
        a, b = self._chunk(a), self._chunk(b)
        if a.fingerprint != b.fingerprint:
            raise ContextMismatchError(
                f"cannot add ciphertexts of two contexts ({a.fingerprint[:16]}... and {b.fingerprint[:16]}...); "
                "every site must use a bundle from the same `fedfms-secure keys init`"
            )
        if a.kind != b.kind:
            raise CryptoError("cannot add an encrypted scalar to a vector chunk")
        _same_size(a.count, b.count)
        summands = a.summands + b.summands
        if summands > self._max_summands[a.kind]:
            raise CryptoError(
                f"this sum would hold {summands} ciphertexts, past the packing's headroom of "
                f"{self._max_summands[a.kind]} ({self.packing.sites} sites x {self.packing.rounds} rounds): its lanes "
                "could overflow. Provision the federation for more sites or rounds (`keys init`)"
            )
        return _payload.PackedChunk(a.vector + b.vector, a.fingerprint, a.layout, a.kind, a.count, summands)

    def add_plain(self, obj: object, values: Sequence[float] | np.ndarray) -> _payload.PackedChunk:
        """Chunk plus public values (|v| <= bound, rounded to the nearest step; counts as one summand)."""
        chunk = self._chunk(obj)
        plain = _finite(values)
        _same_size(chunk.count, plain.size)
        if chunk.kind != _payload.KIND_VECTOR:
            raise CryptoError("a plaintext vector can only be added to a vector chunk")
        peak = float(np.max(np.abs(plain)))
        if peak > self.packing.bound:
            raise CryptoError(
                f"plaintext addend max |value| {peak:.6g} exceeds the packing bound {self.packing.bound:.6g}"
            )
        summands = chunk.summands + 1
        if summands > self._max_summands[chunk.kind]:
            raise CryptoError(f"adding a plaintext would sum {summands} terms, past the packing's headroom")
        nearest = _packing.PackingConfig(**{**self.packing.to_dict(), "rounding": "nearest"})
        levels = _packing.quantize(plain, nearest)
        coeffs = _packing.pack_lanes(levels, self.packing, self.params.poly_modulus_degree)
        ciphertext = self._ops.add_plain(chunk.vector, self._ops.encode(_packing.embed(coeffs)))
        vector = ts.ckks_vector_from(self._ctx, self._ops.vector_body(ciphertext))
        return _payload.PackedChunk(vector, chunk.fingerprint, chunk.layout, chunk.kind, chunk.count, summands)

    def dump(self, obj: object) -> bytes:
        chunk = self._chunk(obj)
        return _payload.pack_packed(
            chunk.vector.serialize(), chunk.fingerprint, chunk.layout, chunk.kind, chunk.count, chunk.summands
        )

    def size(self, obj: object) -> int:
        return self._chunk(obj).count

    @staticmethod
    def _chunk(obj: object) -> _payload.PackedChunk:
        if not isinstance(obj, _payload.PackedChunk):
            raise TypeError(f"expected a chunk from PackedCkksAggregator.parse, got {type(obj).__name__}")
        return obj


class PlainAggregator:
    """Adds float64 little-endian payloads (the ``--no-he`` baseline), exactly and in any order.

    Each value is held as an integer multiple of ``2**-PLAIN_FRACTION_BITS`` (about 2.2e-16), so
    a sum is exact and does not depend on the order in which the sites' uploads arrive: floating
    point addition is not associative, and a last-bit difference in round 1 grows into a visible
    Dice difference by round 4 under Adam. Rounding each value to that grid changes it by at most
    1.1e-16 (below a float64 ulp for values over 1) and the same way in every run. Values must lie
    within +-``PLAIN_LIMIT`` (every update here is clipped far below it).
    """

    chunk_values = PLAIN_CHUNK_VALUES

    def parse(self, payload: bytes) -> np.ndarray:
        return _to_fixed(plain_from_bytes(payload))

    def add(self, a: object, b: object) -> np.ndarray:
        a, b = self._array(a), self._array(b)
        _same_size(a.size, b.size)
        total = a + b
        if np.any(np.abs(total) > _PLAIN_LIMIT_FIXED):
            raise CryptoError(f"a plain sum left +-{PLAIN_LIMIT:g}: the updates are not clipped to the federation's bound")
        return total

    def add_plain(self, obj: object, values: Sequence[float] | np.ndarray) -> np.ndarray:
        return self.add(obj, _to_fixed(_finite(values)))

    def dump(self, obj: object) -> bytes:
        return (self._array(obj).astype(np.float64) * 2.0**-PLAIN_FRACTION_BITS).astype("<f8").tobytes()

    def size(self, obj: object) -> int:
        return int(self._array(obj).size)

    @staticmethod
    def _array(obj: object) -> np.ndarray:
        if not isinstance(obj, np.ndarray) or obj.ndim != 1 or obj.dtype != np.int64:
            raise TypeError(f"expected a 1-D int64 array from PlainAggregator.parse, got {type(obj).__name__}")
        return obj


PLAIN_FRACTION_BITS = 52
PLAIN_LIMIT = 2.0**9
_PLAIN_LIMIT_FIXED = 2**(9 + PLAIN_FRACTION_BITS)


def _to_fixed(values: np.ndarray) -> np.ndarray:
    """float64 -> int64 multiples of 2**-PLAIN_FRACTION_BITS (CryptoError beyond +-PLAIN_LIMIT)."""
    if values.size and float(np.max(np.abs(values))) > PLAIN_LIMIT:
        raise CryptoError(f"a plain value of magnitude {float(np.max(np.abs(values))):g} is beyond +-{PLAIN_LIMIT:g}: "
                          "clip the update to the federation's bound before sending it")
    return np.rint(values * 2.0**PLAIN_FRACTION_BITS).astype(np.int64)


def make_aggregator(
    scheme: str, ctx: ts.Context | None, fingerprint: str | None = None, params: CkksParams | None = None
) -> PayloadAggregator:
    """The server aggregator for ``scheme`` ("ckks" needs the params-only context; "plain" ignores it).

    ``params`` (the bundle's ``Bundle.params``): with a packing, a ``PackedCkksAggregator``; without
    one (or None), the one-value-per-slot ``CkksAggregator``.
    """
    if scheme == "ckks":
        if ctx is None:
            raise KeyMaterialError(
                "scheme 'ckks' needs the server's params-only CKKS context (ckks.ctx of the server bundle)"
            )
        if params is not None and params.packing is not None:
            return PackedCkksAggregator(ctx, fingerprint, params)
        return CkksAggregator(ctx, fingerprint)
    if scheme == "plain":
        return PlainAggregator()
    raise ConfigError(f"unknown update scheme {scheme!r}: use 'ckks' or 'plain' (--no-he)")


def _require_packing(params: CkksParams, ctx: ts.Context) -> _packing.PackingConfig:
    """The packing of ``params``, after checking that ``ctx`` has the same ring parameters."""
    if not isinstance(params, CkksParams) or params.packing is None:
        raise ConfigError("the packed CKKS scheme needs CkksParams with a packing (choose_params or Bundle.params)")
    actual = params_of(ctx)
    if actual != params.ring:
        raise KeyMaterialError(
            f"the CKKS context has parameters {actual.to_dict()}, the federation's params say "
            f"{params.ring.to_dict()}: take the context and the params from the same bundle"
        )
    return params.packing


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
