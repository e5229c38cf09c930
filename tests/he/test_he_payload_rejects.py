"""Malformed, truncated, forged and foreign payloads are refused with CryptoError."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tenseal as ts

from fedfms_secure.he import _wire, payload
from fedfms_secure.he.ckks import (
    CkksParams,
    context_fingerprint,
    load_context,
    new_secret_context,
    serialize_params_only,
)
from fedfms_secure.he.codec import CkksCodec
from fedfms_secure.he.aggregate import CkksAggregator, PlainAggregator
from fedfms_secure.errors import ContextMismatchError, CryptoError


@pytest.fixture(scope="module")
def setup() -> tuple[CkksCodec, CkksAggregator, bytes]:
    ctx = new_secret_context(CkksParams())
    fp = context_fingerprint(ctx)
    codec = CkksCodec(ctx, fp)
    aggregator = CkksAggregator(load_context(serialize_params_only(ctx), source="server.ctx"), fp)
    return codec, aggregator, codec.encrypt_vector(np.linspace(-1, 1, 10))[0]


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _forge(good: bytes, *, sizes: list[int] | None = None, copies: int = 1, scale: float | None = None) -> bytes:
    """Re-assemble a payload from ``good`` with chosen declared sizes, ciphertext count and scale."""
    fields = _wire.read_fields(good[payload.HEADER_LEN :])
    ct = next(v for n, _, v in fields if n == 2)
    old_sizes = _wire.packed_varints(next(v for n, _, v in fields if n == 1))
    old_scale = _wire.as_double(next(v for n, _, v in fields if n == 3))
    packed = b"".join(_varint(s) for s in (sizes or old_sizes))
    body = b"\x0a" + _varint(len(packed)) + packed
    body += (b"\x12" + _varint(len(ct)) + ct) * copies
    body += b"\x19" + struct.pack("<d", old_scale if scale is None else scale)
    return good[: payload.HEADER_LEN] + body


def test_forge_helper_reproduces_a_valid_payload(setup) -> None:
    codec, aggregator, good = setup
    assert aggregator.size(aggregator.parse(_forge(good))) == 10


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"", "truncated"),
        (b"FFCK", "truncated"),
        (os.urandom(1000), "does not start with"),
        (np.ones(512).tobytes(), "does not start with"),
    ],
)
def test_garbage_is_refused(setup, bad: bytes, message: str) -> None:
    _, aggregator, _ = setup
    with pytest.raises(CryptoError, match=message):
        aggregator.parse(bad)


def test_truncated_payloads_are_refused(setup) -> None:
    codec, aggregator, good = setup
    for cut in (payload.HEADER_LEN + 1, payload.HEADER_LEN + 10, 100, len(good) // 2, len(good) - 1):
        with pytest.raises(CryptoError):
            aggregator.parse(good[:cut])
        with pytest.raises(CryptoError):
            codec.decrypt_vector([good[:cut]], 10)


def test_random_body_behind_valid_header_is_refused(setup) -> None:
    _, aggregator, good = setup
    for seed in range(5):
        junk = np.random.default_rng(seed).bytes(len(good) - payload.HEADER_LEN)
        with pytest.raises(CryptoError):
            aggregator.parse(good[: payload.HEADER_LEN] + junk)
    with pytest.raises(CryptoError, match="version 9"):
        aggregator.parse(good[:4] + b"\x09" + good[5:])
    with pytest.raises(CryptoError, match="must be bytes"):
        aggregator.parse("FFCK...")  # type: ignore[arg-type]


def test_forged_structures_are_refused(setup) -> None:
    _, aggregator, good = setup
    with pytest.raises(CryptoError, match="declares 1000000000 values"):
        aggregator.parse(_forge(good, sizes=[10**9]))
    with pytest.raises(CryptoError, match="exactly one ciphertext"):
        aggregator.parse(_forge(good, sizes=[10, 10], copies=2))
    with pytest.raises(CryptoError, match="exactly one ciphertext"):
        aggregator.parse(_forge(good, copies=0))
    with pytest.raises(ContextMismatchError, match="scale 2\\^20"):
        aggregator.parse(_forge(good, scale=2.0**20))
    # declaring more values (up to one ciphertext's slots) than were encoded is harmless: CKKS pads
    # with zeros, so it reads as 10 values then zeros, the same as a site encrypting those zeros
    assert aggregator.size(aggregator.parse(_forge(good, sizes=[4096]))) == 4096


def test_ciphertext_of_another_key_is_refused(setup) -> None:
    codec, aggregator, good = setup
    stranger_ctx = new_secret_context(CkksParams())
    stranger = CkksCodec(stranger_ctx, context_fingerprint(stranger_ctx))
    foreign = stranger.encrypt_vector(np.zeros(10))[0]
    with pytest.raises(ContextMismatchError, match="another federation"):
        aggregator.parse(foreign)
    with pytest.raises(ContextMismatchError):
        codec.decrypt_vector([foreign], 10)
    # a aggregator that was not told the fingerprint still refuses to mix two contexts
    blind = CkksAggregator(load_context(serialize_params_only(stranger_ctx), source="s"))
    with pytest.raises(ContextMismatchError, match="two contexts"):
        blind.add(blind.parse(good), blind.parse(foreign))
    # a foreign ciphertext whose tag was forged to ours decrypts to noise, which the codec detects
    forged = good[: payload.HEADER_LEN] + foreign[payload.HEADER_LEN :]
    with pytest.raises(CryptoError, match="another key"):
        codec.decrypt_vector([forged], 10)
    # a lone value of noise stays under the limit about once in 50; every slot is checked, so a
    # forged scalar (the encrypted sample count) is refused every time
    for _ in range(30):
        scalar = codec.encrypt_scalar(1.0)
        forged = scalar[: payload.HEADER_LEN] + stranger.encrypt_scalar(1.0)[payload.HEADER_LEN :]
        with pytest.raises(CryptoError, match="another key"):
            codec.decrypt_scalar(forged)


@pytest.mark.parametrize(
    "params",
    [
        CkksParams(coeff_mod_bit_sizes=(60, 60), scale_bits=40),  # same first prime: TenSEAL alone accepts it
        CkksParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(40, 20, 40), scale_bits=20),
    ],
)
def test_ciphertext_of_other_params_is_refused_even_with_our_tag(setup, params: CkksParams) -> None:
    _, aggregator, good = setup
    other = ts.ckks_vector(new_secret_context(params), [1.0, 2.0])
    retagged = good[: payload.HEADER_LEN] + other.serialize()
    with pytest.raises(ContextMismatchError):
        aggregator.parse(retagged)


def test_summer_refuses_mismatched_chunks(setup) -> None:
    codec, aggregator, good = setup
    with pytest.raises(CryptoError, match="10 and 1 values"):
        aggregator.add(aggregator.parse(good), aggregator.parse(codec.encrypt_scalar(1.0)))
    with pytest.raises(CryptoError, match="exceeds the CKKS bound"):
        aggregator.add_plain(aggregator.parse(codec.encrypt_scalar(1.0)), [2 * CkksParams().value_bound])
    with pytest.raises(CryptoError):
        PlainAggregator().parse(good[:-3])


_FUZZ = textwrap.dedent(
    """
    import random, sys
    import numpy as np
    from fedfms_secure.he.ckks import *
    from fedfms_secure.he.codec import CkksCodec
    from fedfms_secure.he.aggregate import CkksAggregator
    from fedfms_secure.errors import CryptoError
    ctx = new_secret_context(CkksParams()); fp = context_fingerprint(ctx)
    codec = CkksCodec(ctx, fp)
    aggregator = CkksAggregator(load_context(serialize_params_only(ctx), source="s"), fp)
    good = codec.encrypt_vector(np.ones(50))[0]
    base = aggregator.parse(good)
    rng = random.Random(int(sys.argv[1]))
    loaded = refused = 0
    for i in range(int(sys.argv[2])):
        data = bytearray(good)
        for _ in range(rng.choice([1, 1, 2, 8])):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        try:
            chunk = aggregator.parse(bytes(data))
        except CryptoError:
            refused += 1
            continue
        loaded += 1
        aggregator.dump(aggregator.add(chunk, base))
        try:
            codec.decrypt_vector([bytes(data)], 50)
        except CryptoError:
            pass
    print(loaded, refused)
    """
)


def test_bit_flips_and_truncations_never_crash_the_process() -> None:
    """TenSEAL is C++: a crash would kill the server, so fuzz in a child process."""
    proc = subprocess.run(
        [sys.executable, "-c", _FUZZ, "7", "150"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"child exited {proc.returncode}: {proc.stderr[-2000:]}"
    loaded, refused = map(int, proc.stdout.split())
    assert loaded + refused == 150 and refused > 0
