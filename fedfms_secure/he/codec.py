"""Site side front door: turn a flat float vector into payloads and back.

``make_site_codec("ckks", ctx, fingerprint, params=bundle.params)`` gives a ``PackedCkksCodec`` when
the federation's params carry a packing (quantised integers packed into the coefficients, see
``packing.py``; 2.5-3.8 B per parameter up, twice that for sums), else a ``CkksCodec`` (CKKS under the federation's key,
one value per slot, one ciphertext per ``slots`` values); ``make_site_codec("plain", None, "plain")`` gives the
``--no-he`` baseline, ``PlainCodec``, whose payloads are float64 little-endian bytes.

Chunking is explicit: ``encrypt_vector`` returns one payload per ``chunk_values`` values, the last
one shorter. The server side (``PayloadAggregator``) lives in ``aggregator.py`` and is re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import tenseal as ts

from fedfms_secure.he import packing as _packing
from fedfms_secure.he import payload as _payload
from fedfms_secure.he._native import SealOps
from fedfms_secure.he.ckks import CkksParams, context_fingerprint, params_of
from fedfms_secure.he.aggregate import (
    PLAIN_CHUNK_VALUES,
    CkksAggregator,
    PackedCkksAggregator,
    PayloadAggregator,
    PlainAggregator,
    _require_packing,
    make_aggregator,
    plain_from_bytes,
)
from fedfms_secure.errors import ConfigError, CryptoError, KeyMaterialError

__all__ = [
    "CkksCodec",
    "CkksAggregator",
    "PackedCkksCodec",
    "PackedCkksAggregator",
    "PayloadAggregator",
    "PlainCodec",
    "PlainAggregator",
    "UpdateCodec",
    "make_site_codec",
    "make_aggregator",
]


@runtime_checkable
class UpdateCodec(Protocol):
    """Encrypts and decrypts flat vectors and scalars at a site."""

    scheme: str
    fingerprint: str
    chunk_values: int
    # the magnitude values are clipped to before encoding (inf: none) and the quantisation step
    # (0.0: none); the site clips its weighted update to ``bound`` and records both with it
    bound: float
    step: float

    def encrypt_vector(self, vec: np.ndarray) -> list[bytes]:
        """One payload per ``chunk_values`` values of a non-empty 1-D vector."""
        ...

    def decrypt_vector(self, payloads: Sequence[bytes], length: int) -> np.ndarray:
        """float64 vector of exactly ``length`` values from ``encrypt_vector``-shaped payloads."""
        ...

    def encrypt_scalar(self, x: float) -> bytes:
        """One payload holding one value."""
        ...

    def decrypt_scalar(self, payload: bytes) -> float:
        """Inverse of ``encrypt_scalar``."""
        ...

    def seed_rounding(self, *entropy: int) -> None:
        """Seed the stochastic rounding of the next encryptions (a no-op for codecs that do not round)."""
        ...


class CkksCodec:
    """CKKS codec of a site; ``ctx`` must hold the secret key, ``fingerprint`` is its fingerprint."""

    scheme = "ckks"

    def __init__(self, ctx: ts.Context, fingerprint: str) -> None:
        _check_site_context(ctx, fingerprint)
        self._ctx = ctx
        self.fingerprint = fingerprint
        self.params = params_of(ctx)
        self.chunk_values = self.params.slots
        self.bound = self.params.value_bound
        self.step = 0.0  # no quantisation: CKKS encodes the values themselves
        # A sum wraps once it passes about twice the capacity, so no correct decryption is larger;
        # a ciphertext that is corrupt or made under another key decrypts to noise ~ sqrt(N) * q / scale,
        # far beyond it in almost every slot.
        self._decrypt_limit = 2.0 * self.params.capacity

    def encrypt_vector(self, vec: np.ndarray) -> list[bytes]:
        values = _as_vector(vec, bound=self.bound)
        step = self.chunk_values
        return [self._encrypt(values[i : i + step]) for i in range(0, values.size, step)]

    def decrypt_vector(self, payloads: Sequence[bytes], length: int) -> np.ndarray:
        sizes = _check_layout(payloads, length, self.chunk_values)
        out = np.empty(length, dtype=np.float64)
        start = 0
        for i, (item, expected) in enumerate(zip(payloads, sizes)):
            chunk = self._parse(item)  # one ciphertext in memory at a time
            _check_size(i, chunk.size, expected, what="ciphertext")
            out[start : start + expected] = self._decrypt(chunk)
            start += expected
        return out

    def encrypt_scalar(self, x: float) -> bytes:
        return self._encrypt(_as_vector(np.array([x], dtype=np.float64), bound=self.bound))

    def decrypt_scalar(self, payload: bytes) -> float:
        chunk = self._parse(payload)
        if chunk.size != 1:
            raise CryptoError(f"expected an encrypted scalar (1 value), the ciphertext holds {chunk.size}")
        return float(self._decrypt(chunk)[0])

    def seed_rounding(self, *entropy: int) -> None:
        """Nothing to seed: this codec does not round."""

    def _decrypt(self, chunk: _payload.CkksChunk) -> np.ndarray:
        # a short chunk (the last of a vector, a scalar) is checked over all its slots: one noise
        # value stays below the limit about once in 50, thousands of them never do
        vector = chunk.vector if chunk.size == self.chunk_values else _payload.full_width(chunk, self._ctx)
        slots = np.asarray(vector.decrypt(), dtype=np.float64)
        values = slots[: chunk.size]
        peak = float(np.max(np.abs(slots)))
        if not np.isfinite(peak) or peak > self._decrypt_limit:
            raise CryptoError(
                f"decrypted values reach {peak:.3g}, beyond {self._decrypt_limit:.6g} where CKKS sums wrap: the "
                "ciphertext is corrupt or was encrypted under another key"
            )
        return values

    def _encrypt(self, values: np.ndarray) -> bytes:
        try:
            vector = ts.ckks_vector(self._ctx, values.tolist())
        except (ValueError, RuntimeError, TypeError) as exc:
            raise CryptoError(
                f"TenSEAL cannot encrypt this chunk ({exc}); max |value| is {float(np.max(np.abs(values))):.6g}, the "
                f"CKKS bound {self.bound:.6g}"
            ) from None
        return _payload.pack(vector, self.fingerprint)

    def _parse(self, item: bytes) -> _payload.CkksChunk:
        return _payload.parse(item, self._ctx, expected_fingerprint=self.fingerprint)


class PackedCkksCodec:
    """The compact CKKS codec of a site (``packing.py``): quantise, pack, encrypt with the secret key.

    ``chunk_values`` = N * lanes parameters per ciphertext. ``encrypt_vector`` refuses any value
    beyond ``bound`` (values there would overflow the lanes of a sum); ``decrypt_vector`` decodes a
    sum of up to sites * rounds chunks exactly and returns it in units of the update (a multiple of
    ``step``). ``rng`` drives stochastic rounding (default: seeded from the operating system).
    """

    scheme = "ckks"

    def __init__(
        self, ctx: ts.Context, fingerprint: str, params: CkksParams, *, rng: np.random.Generator | None = None
    ) -> None:
        _check_site_context(ctx, fingerprint)
        self.packing = _require_packing(params, ctx)
        self._ctx = ctx
        self._ops = SealOps(ctx)
        self._rng = rng if rng is not None else np.random.default_rng()
        self.fingerprint = fingerprint
        self.params = params
        self.n = params.poly_modulus_degree
        self.chunk_values = self.n * self.packing.lanes
        self.bound = self.packing.bound
        self.step = self.packing.step
        self.layout = _packing.layout_tag(params.ring.to_dict(), self.packing)
        q_bits = params.coeff_mod_bit_sizes[0]
        # the sum of `sites` scalars of fixed point 2**-8 must stay below the top of a coefficient
        self.scalar_bound = 2.0 ** (q_bits - 2 - params.scale_bits - _packing.SCALAR_FRAC_BITS) / self.packing.sites
        self._max_summands = {_payload.KIND_VECTOR: self.packing.summands, _payload.KIND_SCALAR: self.packing.sites}

    def seed_rounding(self, *entropy: int) -> None:
        """Draw the next stochastic roundings from a generator seeded with ``entropy``.

        A site seeds with (federation seed, site, round): a rerun on the same seed then sends the
        same quantised update, and a retried upload the same ciphertext contents. The rounding
        stays unbiased; its dither is no secret (the DP noise is what protects the update).
        """
        self._rng = np.random.default_rng([int(e) for e in entropy])

    def encrypt_vector(self, vec: np.ndarray) -> list[bytes]:
        values = _as_vector(vec, bound=self.bound, what="packing bound (PackingConfig.bound)")
        step = self.chunk_values
        return [self._encrypt_chunk(values[i : i + step]) for i in range(0, values.size, step)]

    def decrypt_vector(self, payloads: Sequence[bytes], length: int) -> np.ndarray:
        sizes = _check_layout(payloads, length, self.chunk_values)
        out = np.empty(length, dtype=np.float64)
        start = 0
        for i, (item, expected) in enumerate(zip(payloads, sizes)):
            chunk = self._parse(item)  # one ciphertext in memory at a time
            if chunk.kind != _payload.KIND_VECTOR:
                raise CryptoError(f"chunk {i} is an encrypted scalar, not a vector chunk")
            _check_size(i, chunk.count, expected, what="ciphertext")
            levels = _packing.unpack_lanes(self._decrypt(chunk), self.packing, chunk.count, chunk.summands)
            out[start : start + expected] = levels * self.step
            start += expected
        return out

    def encrypt_scalar(self, x: float) -> bytes:
        value = _as_vector(np.array([x], dtype=np.float64), bound=self.scalar_bound,
                           what="bound of an encrypted scalar")[0]
        coeffs = np.zeros(self.n, dtype=np.int64)
        coeffs[0] = int(round(value * 2**_packing.SCALAR_FRAC_BITS))
        return self._encrypt(coeffs, _payload.KIND_SCALAR, 1)

    def decrypt_scalar(self, payload: bytes) -> float:
        chunk = self._parse(payload)
        if chunk.kind != _payload.KIND_SCALAR:
            raise CryptoError(f"expected an encrypted scalar, got a vector chunk of {chunk.count} values")
        coeffs = self._decrypt(chunk)
        if np.any(coeffs[1:] != 0):
            raise CryptoError("an encrypted scalar decrypted to non-zero padding: it is corrupt or under another key")
        return float(coeffs[0]) / 2**_packing.SCALAR_FRAC_BITS

    def _encrypt_chunk(self, values: np.ndarray) -> bytes:
        levels = _packing.quantize(values, self.packing, self._rng)
        return self._encrypt(_packing.pack_lanes(levels, self.packing, self.n), _payload.KIND_VECTOR, values.size)

    def _encrypt(self, coeffs: np.ndarray, kind: int, count: int) -> bytes:
        ciphertext = self._ops.encrypt_seeded(self._ops.encode(_packing.embed(coeffs)))
        return _payload.pack_packed(self._ops.vector_body(ciphertext), self.fingerprint, self.layout, kind, count, 1)

    def _decrypt(self, chunk: _payload.PackedChunk) -> np.ndarray:
        """The packed integers of every coefficient, after checking each lies within the noise bound."""
        coeffs = _packing.unembed(self._ops.decrypt_slots(chunk.vector))
        rounded = np.rint(coeffs)
        # every coefficient is 2**t * integer + e with |e| <= noise_bound; other keys give uniform residues
        limit = _packing.noise_bound(chunk.summands, self.params.coeff_mod_bit_sizes[0]) / self.params.scale
        worst = float(np.max(np.abs(coeffs - rounded)))
        if not np.isfinite(worst) or worst > limit:
            raise CryptoError(
                f"decrypted coefficients lie up to {worst:.3f} from an integer, beyond the noise bound {limit:.3f} of "
                f"{chunk.summands} summed ciphertexts: the ciphertext is corrupt or was encrypted under another key"
            )
        return rounded.astype(np.int64)

    def _parse(self, item: bytes) -> _payload.PackedChunk:
        return _payload.parse_packed(
            item, self._ctx, expected_fingerprint=self.fingerprint, layout=self.layout,
            max_count=self.chunk_values, max_summands=self._max_summands,
        )


#: a plain scalar (a site's sample count) is sent as x * 2**-16: counts up to 2**25 stay within the
#: plain aggregator's +-PLAIN_LIMIT and exact in its 2**-52 grid
PLAIN_SCALAR_SHIFT = 16


class PlainCodec:
    """The ``--no-he`` baseline: payloads are float64 little-endian bytes, no encryption."""

    scheme = "plain"
    fingerprint = "plain"
    bound = math.inf  # plaintext float64: nothing to fit
    step = 0.0

    def __init__(self, chunk_values: int = PLAIN_CHUNK_VALUES) -> None:
        if chunk_values < 1:
            raise ConfigError(f"chunk_values={chunk_values} must be at least 1")
        self.chunk_values = chunk_values

    def encrypt_vector(self, vec: np.ndarray) -> list[bytes]:
        values = _as_vector(vec, bound=None)
        return [
            values[i : i + self.chunk_values].astype("<f8").tobytes()
            for i in range(0, values.size, self.chunk_values)
        ]

    def decrypt_vector(self, payloads: Sequence[bytes], length: int) -> np.ndarray:
        sizes = _check_layout(payloads, length, self.chunk_values)
        parts = [plain_from_bytes(item) for item in payloads]
        for i, (part, expected) in enumerate(zip(parts, sizes)):
            _check_size(i, part.size, expected, what="plain")
        return np.concatenate(parts)

    def encrypt_scalar(self, x: float) -> bytes:
        # a weight (a count of samples) may exceed the aggregator's +-PLAIN_LIMIT for update values:
        # it travels scaled by 2**-PLAIN_SCALAR_SHIFT, which is exact for whole numbers
        scaled = np.array([x], dtype=np.float64) * 2.0**-PLAIN_SCALAR_SHIFT
        return _as_vector(scaled, bound=None).astype("<f8").tobytes()

    def decrypt_scalar(self, payload: bytes) -> float:
        values = plain_from_bytes(payload)
        if values.size != 1:
            raise CryptoError(f"expected a scalar payload (8 bytes), got {values.size} values")
        return float(values[0]) * 2.0**PLAIN_SCALAR_SHIFT

    def seed_rounding(self, *entropy: int) -> None:
        """Nothing to seed: this codec does not round."""


def _check_site_context(ctx: ts.Context, fingerprint: str) -> None:
    """A site codec needs its context's keys, and the fingerprint of that very context."""
    if not ctx.has_secret_key() or not ctx.has_public_key():
        raise KeyMaterialError(
            "a site codec needs the CKKS context with its secret and public key; this one lacks them "
            "(is it the server's params-only ckks.ctx?). Use the client bundle's ckks.ctx"
        )
    actual = context_fingerprint(ctx)
    if fingerprint != actual:
        raise KeyMaterialError(
            f"fingerprint {fingerprint[:16]!r}... does not belong to this CKKS context ({actual[:16]}...): "
            "take both from the same client bundle (Bundle.context() and Bundle.fingerprint)"
        )


def make_site_codec(
    scheme: str, ctx: ts.Context | None, fingerprint: str, params: CkksParams | None = None
) -> UpdateCodec:
    """The site codec for ``scheme`` ("ckks" needs the site context; "plain" ignores ``ctx``).

    ``params`` (the bundle's ``Bundle.params``): with a packing, a ``PackedCkksCodec``; without
    one (or None), the one-value-per-slot ``CkksCodec``.
    """
    if scheme == "ckks":
        if ctx is None:
            raise KeyMaterialError(
                "scheme 'ckks' needs the site's CKKS context (ckks.ctx of the client bundle)"
            )
        if params is not None and params.packing is not None:
            return PackedCkksCodec(ctx, fingerprint, params)
        return CkksCodec(ctx, fingerprint)
    if scheme == "plain":
        return PlainCodec()
    raise ConfigError(f"unknown update scheme {scheme!r}: use 'ckks' or 'plain' (--no-he)")


def _as_vector(vec: np.ndarray, *, bound: float | None, what: str | None = None) -> np.ndarray:
    values = np.asarray(vec, dtype=np.float64)
    if values.ndim != 1:
        raise CryptoError(f"expected a flat 1-D vector, got shape {values.shape}; flatten it first")
    if values.size == 0:
        raise CryptoError("refusing to encode an empty vector: there is nothing to send")
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise CryptoError(
            f"vector holds a non-finite value ({values[bad]}) at index {bad}; check training for divergence"
        )
    if bound is not None:
        peak = float(np.max(np.abs(values)))
        if peak > bound and what is not None:
            at = int(np.argmax(np.abs(values)))
            raise CryptoError(
                f"max |value| {peak:.6g} (at index {at}) exceeds the {what} {bound:.6g}: beyond it the packed sums of "
                "the federation could overflow silently. Clip the weighted update to +-bound before encrypting "
                "(np.clip; post-processing keeps the DP guarantee), or provision the federation with a larger bound"
            )
        if peak > bound:
            raise CryptoError(
                f"max |value| {peak:.6g} exceeds the CKKS bound {bound:.6g} (CkksParams.value_bound: the "
                "capacity 2^(data_bits - scale_bits - 2) shared by up to MAX_SUMMANDS summands); beyond it sums "
                "wrap silently. Clip or rescale the update, or use a smaller scale_bits or more primes in "
                "coeff_mod_bit_sizes"
            )
    return values


def _check_layout(payloads: Sequence[bytes], length: int, chunk_values: int) -> list[int]:
    """The value count each payload must hold, after checking that the payload count fits ``length``."""
    if length < 1:
        raise CryptoError(f"vector length must be at least 1, got {length}")
    expected = -(-length // chunk_values)
    if len(payloads) != expected:
        raise CryptoError(
            f"{len(payloads)} payloads arrived for {length} values; {expected} chunks of {chunk_values} were expected"
        )
    return [min(chunk_values, length - start) for start in range(0, length, chunk_values)]


def _check_size(index: int, got: int, expected: int, *, what: str) -> None:
    if got != expected:
        raise CryptoError(f"{what} chunk {index} holds {got} values, expected {expected}")
