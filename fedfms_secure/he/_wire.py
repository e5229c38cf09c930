"""A minimal reader for the protobuf wire format.

TenSEAL serializes contexts and vectors as protobuf messages. Reading their fields here lets us
check the structure of untrusted bytes (how many ciphertexts, how many values, which scale)
before TenSEAL's C++ code sees them, and lets us hash the public part of a context field by field.
"""

from __future__ import annotations

import struct

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode one base-128 varint at ``pos``; return ``(value, next_pos)``."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise ValueError("varint runs past the end of the buffer")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise ValueError("varint longer than 10 bytes")


def read_fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """Split a serialized message into ``(field_number, wire_type, value)`` triples.

    Length-delimited values are returned as bytes, fixed-width ones as unsigned ints.
    Raises ValueError on any structural problem (truncation, unknown wire type, field 0).
    """
    fields: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == VARINT:
            value, pos = read_varint(data, pos)
            fields.append((number, wire_type, value))
        elif wire_type in (FIXED64, FIXED32):
            width = 8 if wire_type == FIXED64 else 4
            if pos + width > len(data):
                raise ValueError("fixed-width field runs past the end of the buffer")
            fields.append((number, wire_type, int.from_bytes(data[pos : pos + width], "little")))
            pos += width
        elif wire_type == LENGTH_DELIMITED:
            length, pos = read_varint(data, pos)
            if pos + length > len(data):
                raise ValueError("length-delimited field runs past the end of the buffer")
            fields.append((number, wire_type, bytes(data[pos : pos + length])))
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    return fields


def packed_varints(data: bytes) -> list[int]:
    """Decode a packed ``repeated uint32/uint64`` field."""
    values, pos = [], 0
    while pos < len(data):
        value, pos = read_varint(data, pos)
        values.append(value)
    return values


def as_double(bits: int) -> float:
    """Reinterpret a FIXED64 field value as an IEEE double."""
    return struct.unpack("<d", bits.to_bytes(8, "little"))[0]


def varint(value: int) -> bytes:
    """Encode a non-negative int as a base-128 varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)
