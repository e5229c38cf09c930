"""CKKS contexts, the site codecs and the server aggregators, with real TenSEAL."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import tenseal as ts

from fedfms_secure.he.ckks import (
    MAX_SUMMANDS,
    CkksParams,
    context_fingerprint,
    load_context,
    new_secret_context,
    params_of,
    serialize_params_only,
    serialize_site_context,
)
from fedfms_secure.he.codec import CkksCodec, PlainCodec, UpdateCodec, make_site_codec
from fedfms_secure.he.aggregate import CkksAggregator, PayloadAggregator, PlainAggregator, make_aggregator
from fedfms_secure.errors import ConfigError, CryptoError, KeyMaterialError

PARAMS = CkksParams()
SLOTS = PARAMS.slots


@pytest.fixture(scope="module")
def site_ctx() -> ts.Context:
    return new_secret_context(PARAMS)


@pytest.fixture(scope="module")
def fingerprint(site_ctx: ts.Context) -> str:
    return context_fingerprint(site_ctx)


@pytest.fixture(scope="module")
def server_ctx(site_ctx: ts.Context) -> ts.Context:
    return load_context(serialize_params_only(site_ctx), source="server.ctx")


@pytest.fixture(scope="module")
def codec(site_ctx: ts.Context, fingerprint: str) -> CkksCodec:
    return CkksCodec(site_ctx, fingerprint)


def test_params_dict_round_trip_and_validation() -> None:
    p = CkksParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(40, 20, 40), scale_bits=20)
    assert CkksParams.from_dict(p.to_dict()) == p
    assert p.slots == 2048
    assert PARAMS.data_bits == 100 and PARAMS.capacity == 2.0**58
    assert PARAMS.value_bound == 2.0**58 / MAX_SUMMANDS
    with pytest.raises(ConfigError, match="poly_modulus_degree=3000"):
        CkksParams(poly_modulus_degree=3000)
    with pytest.raises(ConfigError, match="scale_bits=60"):
        CkksParams(scale_bits=60)
    with pytest.raises(ConfigError, match="scale_bits"):
        CkksParams.from_dict({"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 60]})


def test_contexts_serialize_and_recover_params(site_ctx: ts.Context, server_ctx: ts.Context) -> None:
    assert site_ctx.has_secret_key() and site_ctx.has_public_key()
    assert not site_ctx.has_relin_keys() and not site_ctx.has_galois_keys()
    assert not server_ctx.has_secret_key() and not server_ctx.has_public_key()
    assert len(serialize_params_only(site_ctx)) < 200
    assert params_of(site_ctx) == PARAMS and params_of(server_ctx) == PARAMS
    other = CkksParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(40, 20, 40), scale_bits=20)
    assert params_of(new_secret_context(other)) == other
    reloaded = load_context(serialize_site_context(site_ctx), source="site.ctx")
    assert reloaded.has_secret_key()


def test_fingerprint_stable_and_key_dependent(site_ctx: ts.Context, fingerprint: str) -> None:
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    reloaded = load_context(serialize_site_context(site_ctx), source="site.ctx")
    assert context_fingerprint(reloaded) == fingerprint
    assert context_fingerprint(new_secret_context(PARAMS)) != fingerprint  # same params, other keys
    with pytest.raises(KeyMaterialError, match="manifest"):
        context_fingerprint(load_context(serialize_params_only(site_ctx), source="server.ctx"))


def test_load_context_rejects_garbage() -> None:
    for junk in (b"", b"\x00" * 10, b"hello world, not a context", bytes(range(256)) * 4):
        with pytest.raises(KeyMaterialError, match="bundle-x/ckks.ctx"):
            load_context(junk, source="bundle-x/ckks.ctx")


def test_load_context_refuses_a_valid_bfv_context() -> None:
    bfv = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=1032193)
    for data in (bfv.serialize(save_secret_key=True), bfv.serialize()):
        with pytest.raises(KeyMaterialError, match=r"bundle-x/ckks.ctx is not a valid TenSEAL CKKS context.*BFV"):
            load_context(data, source="bundle-x/ckks.ctx")


@pytest.mark.parametrize("length", [1, 7, SLOTS, SLOTS + 1, 2 * SLOTS + 123])
def test_ckks_round_trip(codec: CkksCodec, length: int) -> None:
    vec = np.random.default_rng(length).normal(scale=0.1, size=length)
    payloads = codec.encrypt_vector(vec)
    assert len(payloads) == -(-length // SLOTS)
    out = codec.decrypt_vector(payloads, length)
    assert out.dtype == np.float64 and out.shape == (length,)
    assert np.max(np.abs(out - vec)) < 1e-6


@pytest.mark.parametrize("length", [1, 5, 4096, 4100])
def test_plain_round_trip_is_exact(length: int) -> None:
    codec = PlainCodec()
    vec = np.random.default_rng(0).normal(size=length)
    payloads = codec.encrypt_vector(vec)
    assert len(payloads) == -(-length // codec.chunk_values)
    assert payloads[0][:8] == np.float64(vec[0]).astype("<f8").tobytes()
    np.testing.assert_array_equal(codec.decrypt_vector(payloads, length), vec)
    assert codec.decrypt_scalar(codec.encrypt_scalar(-2.25)) == -2.25


def test_scalars_and_vector_errors(codec: CkksCodec) -> None:
    assert abs(codec.decrypt_scalar(codec.encrypt_scalar(1234.0)) - 1234.0) < 1e-6
    for c in (codec, PlainCodec()):
        with pytest.raises(CryptoError, match="empty"):
            c.encrypt_vector(np.array([]))
        with pytest.raises(CryptoError, match="1-D"):
            c.encrypt_vector(np.ones((2, 2)))
        with pytest.raises(CryptoError, match="non-finite"):
            c.encrypt_vector(np.array([1.0, np.nan]))
    payloads = codec.encrypt_vector(np.ones(SLOTS + 1))
    with pytest.raises(CryptoError, match="2 payloads arrived for 9000 values"):
        codec.decrypt_vector(payloads, 9000)
    with pytest.raises(CryptoError, match="expected 4096"):
        codec.decrypt_vector(payloads[::-1], SLOTS + 1)
    with pytest.raises(CryptoError, match="expected an encrypted scalar"):
        codec.decrypt_scalar(payloads[0])


def test_bound_check_names_value_and_bound(codec: CkksCodec) -> None:
    bound = PARAMS.value_bound
    ok = np.array([bound, -bound, 0.5])
    out = codec.decrypt_vector(codec.encrypt_vector(ok), 3)
    # no wrap: every value comes back to float64 precision of the chunk's largest magnitude
    assert np.max(np.abs(out - ok)) < 1e-12 * bound
    message = re.escape(f"max |value| {2 * bound:.6g} exceeds the CKKS bound {bound:.6g}")
    with pytest.raises(CryptoError, match=message):
        codec.encrypt_vector(np.array([0.0, -2 * bound]))
    with pytest.raises(CryptoError, match="exceeds the CKKS bound"):
        codec.encrypt_scalar(1e30)


SIXTY_SIXTY = CkksParams(coeff_mod_bit_sizes=(60, 60), scale_bits=40)


@pytest.fixture(scope="module")
def small_ctx() -> ts.Context:
    return new_secret_context(SIXTY_SIXTY)


def test_capacity_is_what_tenseal_encodes_for_one_prime(small_ctx: ts.Context) -> None:
    """(60, 60): the data level is one 60-bit prime, so a slot holds 2^(60 - 40 - 2), not 2^19."""
    assert SIXTY_SIXTY.data_bits == 60 and SIXTY_SIXTY.capacity == 2.0**18
    cap = SIXTY_SIXTY.capacity
    assert abs(ts.ckks_vector(small_ctx, [0.99 * cap]).decrypt()[0] - 0.99 * cap) < 1e-3
    with pytest.raises(ValueError, match="too large"):
        ts.ckks_vector(small_ctx, [1.01 * cap])


def test_sixty_sixty_bound_keeps_every_sum_of_max_summands_exact(small_ctx: ts.Context) -> None:
    fp = context_fingerprint(small_ctx)
    codec = CkksCodec(small_ctx, fp)
    aggregator = CkksAggregator(load_context(serialize_params_only(small_ctx), source="server.ctx"), fp)
    bound = SIXTY_SIXTY.value_bound
    assert codec.bound == bound == 2.0**18 / MAX_SUMMANDS
    # 2.6e5 passed the old 2^19 bound: three sites of it wrapped silently past ~5.2e5
    with pytest.raises(CryptoError, match=rf"max \|value\| 260000 exceeds the CKKS bound {bound:.6g}"):
        codec.encrypt_vector(np.array([2.6e5]))
    chunk = aggregator.parse(codec.encrypt_scalar(bound))
    total = chunk
    for _ in range(MAX_SUMMANDS - 1):
        total = aggregator.add(total, chunk)
    assert abs(codec.decrypt_scalar(aggregator.dump(total)) - MAX_SUMMANDS * bound) < 1e-3


def test_tenseal_encoding_errors_become_crypto_errors(small_ctx: ts.Context) -> None:
    codec = CkksCodec(small_ctx, context_fingerprint(small_ctx))
    codec.bound = float("inf")  # past the codec's own check, TenSEAL refuses to encode
    with pytest.raises(CryptoError, match="TenSEAL cannot encrypt"):
        codec.encrypt_vector(np.array([4.0 * SIXTY_SIXTY.capacity]))


def test_params_without_headroom_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"leave no headroom.*2\^3"):
        CkksParams(coeff_mod_bit_sizes=(40, 40), scale_bits=35)
    assert CkksParams(coeff_mod_bit_sizes=(40, 40), scale_bits=30).value_bound == 2.0**8 / MAX_SUMMANDS


def test_k_site_sum_matches_plaintext_sum(site_ctx: ts.Context, fingerprint: str, server_ctx: ts.Context) -> None:
    k, length = 8, 2 * SLOTS + 100
    rng = np.random.default_rng(1)
    updates = [rng.normal(scale=0.05, size=length) for _ in range(k)]
    weights = rng.dirichlet(np.ones(k))
    aggregator = make_aggregator("ckks", server_ctx, fingerprint)
    site = make_site_codec("ckks", site_ctx, fingerprint)
    assert isinstance(site, UpdateCodec) and isinstance(aggregator, PayloadAggregator)
    totals = None
    for w, u in zip(weights, updates):
        parsed = [aggregator.parse(p) for p in site.encrypt_vector(w * u)]
        totals = parsed if totals is None else [aggregator.add(a, b) for a, b in zip(totals, parsed)]
    assert [aggregator.size(t) for t in totals] == [SLOTS, SLOTS, 100]
    theta0 = rng.normal(size=length)
    chunks = [aggregator.add_plain(t, theta0[i * SLOTS : (i + 1) * SLOTS]) for i, t in enumerate(totals)]
    result = site.decrypt_vector([aggregator.dump(c) for c in chunks], length)
    expected = theta0 + sum(w * u for w, u in zip(weights, updates))
    assert np.max(np.abs(result - expected)) < 1e-6
    # encrypted sample counts: the commit phase
    n = aggregator.parse(site.encrypt_scalar(120.0))
    for count in (37.0, 5.0):
        n = aggregator.add(n, aggregator.parse(site.encrypt_scalar(count)))
    assert abs(site.decrypt_scalar(aggregator.dump(n)) - 162.0) < 1e-6


def test_params_only_context_adds_but_cannot_encrypt_or_decrypt(codec: CkksCodec, server_ctx: ts.Context) -> None:
    aggregator = CkksAggregator(server_ctx)
    chunk = aggregator.add(aggregator.parse(codec.encrypt_scalar(1.0)), aggregator.parse(codec.encrypt_scalar(2.0)))
    with pytest.raises(ValueError, match="secret"):
        chunk.vector.decrypt()
    with pytest.raises(ValueError, match="encryption"):
        ts.ckks_vector(server_ctx, [1.0])
    with pytest.raises(KeyMaterialError, match="params-only"):
        CkksCodec(server_ctx, "00" * 32)
    with pytest.raises(KeyMaterialError, match="does not belong"):
        CkksCodec(new_secret_context(PARAMS), codec.fingerprint)
    with pytest.raises(KeyMaterialError, match="64 hex digits"):
        CkksAggregator(server_ctx, "plain")
    assert abs(codec.decrypt_scalar(aggregator.dump(chunk)) - 3.0) < 1e-6


def test_plain_summer_and_factories() -> None:
    codec, aggregator = make_site_codec("plain", None, "plain"), make_aggregator("plain", None)
    assert isinstance(aggregator, PlainAggregator) and codec.fingerprint == "plain"
    a, b = (aggregator.parse(p) for p in codec.encrypt_vector(np.arange(3.0)) + codec.encrypt_vector(np.ones(3)))
    total = aggregator.add_plain(aggregator.add(a, b), [10.0, 10.0, 10.0])
    np.testing.assert_array_equal(codec.decrypt_vector([aggregator.dump(total)], 3), [11.0, 12.0, 13.0])
    with pytest.raises(CryptoError, match="7 bytes"):
        aggregator.parse(b"\x00" * 7)
    with pytest.raises(CryptoError, match="3 and 4 values"):
        aggregator.add(a, aggregator.parse(np.ones(4).tobytes()))
    with pytest.raises(ConfigError, match="unknown update scheme 'bfv'"):
        make_site_codec("bfv", None, "x")
    with pytest.raises(ConfigError, match="unknown update scheme"):
        make_aggregator("paillier", None)
    with pytest.raises(KeyMaterialError, match="ckks"):
        make_aggregator("ckks", None)


def test_plain_weights_of_large_sites_sum_exactly() -> None:
    """A sample count beyond the plain aggregator's +-PLAIN_LIMIT for update values still travels
    (scaled) and sums exactly: three sites of 697, 100,000 and 3 samples."""
    from fedfms_secure.he.aggregate import PLAIN_LIMIT

    codec, aggregator = make_site_codec("plain", None, "plain"), make_aggregator("plain", None)
    counts = [697, 100_000, 3]
    assert max(counts) > PLAIN_LIMIT
    chunks = [aggregator.parse(codec.encrypt_scalar(float(n))) for n in counts]
    total = aggregator.add(aggregator.add(chunks[0], chunks[1]), chunks[2])
    assert codec.decrypt_scalar(aggregator.dump(total)) == float(sum(counts))


def test_every_codec_states_its_bound_and_step(site_ctx: ts.Context, fingerprint: str) -> None:
    """The site clips to ``bound`` and records ``step`` through the interface, whatever the codec."""
    plain = PlainCodec()
    assert (plain.bound, plain.step) == (math.inf, 0.0)
    ckks = make_site_codec("ckks", site_ctx, fingerprint)
    assert 0 < ckks.bound < math.inf and ckks.step == 0.0
    for codec in (plain, ckks):
        assert isinstance(codec.bound, float) and isinstance(codec.step, float)
