"""The CKKS payload: one ciphertext chunk on the wire, and its validation.

Wire format of one payload (``CkksCodec`` writes it, ``CkksAggregator`` reads and writes it)::

    b"FFCK"              4 bytes  magic
    version              1 byte   (1)
    fingerprint         32 bytes  SHA-256 context fingerprint (``ckks.context_fingerprint``)
    TenSEAL CKKSVector   rest     protobuf: sizes=[n], ciphertexts=[one SEAL ciphertext], scale

The packed scheme (``packing.py``) uses version 2, whose header says more::

    b"FFCK"  2  fingerprint(32)
    layout               8 bytes  ``packing.layout_tag``: ring parameters + packing configuration
    kind                 1 byte   1: a chunk of a vector, 2: a scalar
    count                4 bytes  little-endian: parameters in this chunk (1..N * lanes)
    summands             4 bytes  little-endian: fresh ciphertexts summed into this one (1 if fresh)
    TenSEAL CKKSVector   rest     sizes=[N/2], one SEAL ciphertext (seeded when fresh), scale

The fingerprint tag lets a receiver refuse, with ContextMismatchError, a ciphertext made under
another federation's key: CKKS itself cannot tell (a foreign ciphertext adds fine and decrypts to
noise). It is a label, not a MAC; integrity in transit is mutual TLS's job.

Untrusted bytes are checked structurally before TenSEAL parses them: TenSEAL trusts the declared
value count (a forged ``sizes=[10**9]`` loads and adds) and accepts a ciphertext from a shorter
modulus chain whose primes match (e.g. ``(60, 60)`` under ``(60, 40, 60)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tenseal as ts

from fedfms_secure.he import _wire
from fedfms_secure.errors import ContextMismatchError, CryptoError

MAGIC = b"FFCK"
VERSION = 1
HEADER_LEN = len(MAGIC) + 1 + 32
VERSION_PACKED = 2
PACKED_HEADER_LEN = HEADER_LEN + 8 + 1 + 4 + 4
KIND_VECTOR, KIND_SCALAR = 1, 2
_KIND_NAMES = {KIND_VECTOR: "vector chunk", KIND_SCALAR: "scalar"}
_SEAL_MAGIC = 0xA15E
_SEAL_HEADER_LEN = 16


@dataclass(frozen=True)
class CkksChunk:
    """A parsed, validated ciphertext chunk and the context fingerprint it was made under."""

    vector: ts.CKKSVector
    fingerprint: str

    @property
    def size(self) -> int:
        """Number of encoded values."""
        return int(self.vector.size())


@dataclass(frozen=True)
class PackedChunk:
    """A parsed, validated packed chunk (payload version 2)."""

    vector: ts.CKKSVector
    fingerprint: str
    layout: bytes
    kind: int
    count: int
    summands: int

    @property
    def size(self) -> int:
        """Number of parameters (or 1 for a scalar)."""
        return self.count


def pack_packed(body: bytes, fingerprint: str, layout: bytes, kind: int, count: int, summands: int) -> bytes:
    """A version-2 payload around a serialized CKKSVector ``body``."""
    return (
        MAGIC + bytes([VERSION_PACKED]) + bytes.fromhex(fingerprint) + layout + bytes([kind])
        + count.to_bytes(4, "little") + summands.to_bytes(4, "little") + body
    )


def parse_packed(
    payload: bytes,
    ctx: ts.Context,
    *,
    expected_fingerprint: str | None,
    layout: bytes,
    max_count: int,
    max_summands: dict[int, int],
) -> PackedChunk:
    """Validate and deserialize one version-2 payload under ``ctx``.

    CryptoError for anything malformed, truncated, of an unknown kind, with an impossible count or
    more summands than ``max_summands[kind]``; ContextMismatchError for another context or packing.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CryptoError(f"a CKKS payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    fingerprint = _check_header(payload, VERSION_PACKED)
    if len(payload) <= PACKED_HEADER_LEN:
        raise CryptoError(
            f"packed CKKS payload of {len(payload)} bytes is truncated (its header alone is {PACKED_HEADER_LEN})"
        )
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise ContextMismatchError(
            f"ciphertext was made under CKKS context {fingerprint[:16]}..., this party uses "
            f"{expected_fingerprint[:16]}...: the sender's bundle belongs to another federation or an "
            "older key; re-export bundles from one `fedfms-secure keys init` folder"
        )
    got_layout = payload[HEADER_LEN : HEADER_LEN + 8]
    if got_layout != layout:
        raise ContextMismatchError(
            f"ciphertext was packed with layout {got_layout.hex()}, this party uses {layout.hex()}: the sender's "
            "packing (bound, sites, rounds, bits) differs; every party must use the params of one federation.json"
        )
    kind = payload[HEADER_LEN + 8]
    count = int.from_bytes(payload[HEADER_LEN + 9 : HEADER_LEN + 13], "little")
    summands = int.from_bytes(payload[HEADER_LEN + 13 : PACKED_HEADER_LEN], "little")
    if kind not in _KIND_NAMES:
        raise CryptoError(f"packed CKKS payload has unknown kind {kind} (1: vector chunk, 2: scalar)")
    limit = 1 if kind == KIND_SCALAR else max_count
    if not 1 <= count <= limit:
        raise CryptoError(f"packed CKKS {_KIND_NAMES[kind]} declares {count} values; it holds 1..{limit}")
    if not 1 <= summands <= max_summands[kind]:
        raise CryptoError(
            f"packed CKKS {_KIND_NAMES[kind]} declares {summands} summed ciphertexts; the packing has headroom "
            f"for 1..{max_summands[kind]}"
        )
    vector = _load_vector(payload[PACKED_HEADER_LEN:], ctx, full_width_required=True)
    return PackedChunk(vector, fingerprint, layout, kind, count, summands)


def pack(vector: ts.CKKSVector, fingerprint: str) -> bytes:
    """Serialize one chunk with the envelope header."""
    return MAGIC + bytes([VERSION]) + bytes.fromhex(fingerprint) + vector.serialize()


def parse(payload: bytes, ctx: ts.Context, *, expected_fingerprint: str | None) -> CkksChunk:
    """Validate and deserialize one payload under ``ctx``.

    CryptoError for anything malformed or truncated; ContextMismatchError when the payload was
    made under another context (other fingerprint, other parameters or scale).
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CryptoError(f"a CKKS payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    fingerprint = _check_header(payload, VERSION)
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise ContextMismatchError(
            f"ciphertext was made under CKKS context {fingerprint[:16]}..., this party uses "
            f"{expected_fingerprint[:16]}...: the sender's bundle belongs to another federation or an "
            "older key; re-export bundles from one `fedfms-secure keys init` folder"
        )
    vector = _load_vector(payload[HEADER_LEN:], ctx, full_width_required=False)
    return CkksChunk(vector=vector, fingerprint=fingerprint)


def _load_vector(body: bytes, ctx: ts.Context, *, full_width_required: bool) -> ts.CKKSVector:
    """Checks a serialized TenSEAL vector's structure and scale against ``ctx``, then loads it."""
    slots = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree() // 2
    size, ciphertext, scale = _check_vector_proto(body, slots)
    if full_width_required and size != slots:
        raise CryptoError(f"packed CKKS payload declares {size} slots, it must use all {slots}")
    if scale != ctx.global_scale:
        raise ContextMismatchError(
            f"ciphertext has scale 2^{_log2(scale)}, this context uses 2^{_log2(ctx.global_scale)}: "
            "it was made under other CKKS parameters"
        )
    _check_seal_header(ciphertext)
    try:
        vector = ts.ckks_vector_from(ctx, body)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CryptoError(f"TenSEAL cannot load the ciphertext ({exc}): the payload is corrupt") from None
    _check_loaded(vector, ctx, size)
    return vector


def full_width(chunk: CkksChunk, ctx: ts.Context) -> ts.CKKSVector:
    """The chunk's ciphertext re-declared to hold every slot, so that decryption shows them all.

    A chunk of ``n`` values still encrypts ``slots`` of them (the rest replicate or are zero);
    decrypting all of them tells a real ciphertext from noise far more reliably than ``n`` values.
    """
    slots = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree() // 2
    sizes = _wire.varint(slots)
    body = bytearray(b"\x0a" + _wire.varint(len(sizes)) + sizes)  # field 1 (sizes), packed
    for number, _, value in _wire.read_fields(chunk.vector.serialize()):
        if number == 2:  # the ciphertext
            body += b"\x12" + _wire.varint(len(value)) + value  # type: ignore[arg-type]
        elif number == 3:  # the scale
            body += b"\x19" + value.to_bytes(8, "little")  # type: ignore[union-attr]
    return ts.ckks_vector_from(ctx, bytes(body))


def _check_header(payload: bytes, version: int) -> str:
    if len(payload) <= HEADER_LEN:
        raise CryptoError(
            f"CKKS payload of {len(payload)} bytes is truncated (the header alone is {HEADER_LEN})"
        )
    if payload[:4] != MAGIC:
        raise CryptoError(
            f"payload does not start with {MAGIC!r} (got {payload[:4]!r}): not a fedfms-secure CKKS ciphertext "
            "(is the sender running with --no-he, or another version?)"
        )
    if payload[4] != version:
        if {payload[4], version} == {VERSION, VERSION_PACKED}:
            sender, receiver = ("packed", "unpacked") if payload[4] == VERSION_PACKED else ("unpacked", "packed")
            raise ContextMismatchError(
                f"the sender uses the {sender} CKKS format (version {payload[4]}), this party the {receiver} one "
                f"(version {version}): give every codec and aggregator the federation's params "
                "(make_site_codec(..., params=bundle.params), make_aggregator(..., params=bundle.params))"
            )
        raise CryptoError(
            f"CKKS payload format version {payload[4]} is not supported (this party reads {version})"
        )
    return payload[5:HEADER_LEN].hex()


def _check_vector_proto(body: bytes, slots: int) -> tuple[int, bytes, float]:
    try:
        fields = _wire.read_fields(body)
        sizes: list[int] = []
        ciphertexts: list[bytes] = []
        scales: list[float] = []
        for number, wire_type, value in fields:
            if number == 1 and wire_type == _wire.LENGTH_DELIMITED:
                sizes.extend(_wire.packed_varints(value))  # type: ignore[arg-type]
            elif number == 1 and wire_type == _wire.VARINT:
                sizes.append(value)  # type: ignore[arg-type]
            elif number == 2 and wire_type == _wire.LENGTH_DELIMITED:
                ciphertexts.append(value)  # type: ignore[arg-type]
            elif number == 3 and wire_type == _wire.FIXED64:
                scales.append(_wire.as_double(value))  # type: ignore[arg-type]
            else:
                raise ValueError(f"unexpected field {number} (wire type {wire_type})")
    except ValueError as exc:
        raise CryptoError(f"CKKS payload is malformed or truncated ({exc})") from None
    if len(ciphertexts) != 1 or len(sizes) != 1 or len(scales) != 1:
        raise CryptoError(
            f"CKKS payload must hold exactly one ciphertext, one size and one scale; it holds "
            f"{len(ciphertexts)}, {len(sizes)} and {len(scales)}"
        )
    if not 1 <= sizes[0] <= slots:
        raise CryptoError(f"CKKS payload declares {sizes[0]} values; a chunk holds 1..{slots}")
    return sizes[0], ciphertexts[0], scales[0]


def _check_seal_header(ciphertext: bytes) -> None:
    if len(ciphertext) < _SEAL_HEADER_LEN:
        raise CryptoError("SEAL ciphertext is truncated (shorter than its 16-byte header)")
    magic = int.from_bytes(ciphertext[0:2], "little")
    header_len, compr_mode = ciphertext[2], ciphertext[5]
    declared = int.from_bytes(ciphertext[8:16], "little")
    if magic != _SEAL_MAGIC or header_len != _SEAL_HEADER_LEN or compr_mode > 2:
        raise CryptoError("SEAL ciphertext header is invalid: the payload is corrupt or not a CKKS ciphertext")
    if declared != len(ciphertext):
        raise CryptoError(
            f"SEAL ciphertext declares {declared} bytes but {len(ciphertext)} arrived: the payload is truncated"
        )


def _check_loaded(vector: ts.CKKSVector, ctx: ts.Context, size: int) -> None:
    parts = vector.ciphertext()
    if vector.size() != size or len(parts) != 1:
        raise CryptoError("CKKS payload loaded with an inconsistent layout")
    ct = parts[0]
    if list(ct.parms_id()) != list(ctx.seal_context().data.first_parms_id()):
        raise ContextMismatchError(
            "ciphertext lives at another modulus level than this context's fresh ciphertexts: "
            "it was made under other CKKS parameters (coeff_mod_bit_sizes)"
        )
    if ct.size() != 2 or not ct.is_ntt_form() or ct.is_transparent() or ct.scale != ctx.global_scale:
        raise CryptoError("ciphertext is not a fresh CKKS ciphertext (size, NTT form, scale or transparency)")


def _log2(x: float) -> str:
    return f"{math.log2(x):g}" if x > 0 else repr(x)
