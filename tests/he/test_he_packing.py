"""The packed CKKS scheme: parameters from the bound, quantise/pack, exact sums, guards, rejects."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tenseal as ts

from fedfms_secure.he import packing, payload
from fedfms_secure.he._native import SealOps
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.he.ckks import (
    CkksParams,
    context_fingerprint,
    load_context,
    new_secret_context,
    params_of,
    serialize_params_only,
)
from fedfms_secure.he.codec import CkksCodec, PackedCkksCodec, make_site_codec
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.he.packing import PackingConfig, choose_params
from fedfms_secure.he.aggregate import CkksAggregator, PackedCkksAggregator, make_aggregator
from fedfms_secure.errors import ConfigError, ContextMismatchError, CryptoError, KeyMaterialError

K, R = 3, 5
PARAMS = choose_params(bound=0.5, sites=K, rounds=R, rounding="nearest")


@pytest.fixture(scope="module")
def site_ctx() -> ts.Context:
    return new_secret_context(PARAMS)


@pytest.fixture(scope="module")
def fp(site_ctx: ts.Context) -> str:
    return context_fingerprint(site_ctx)


@pytest.fixture(scope="module")
def server_ctx(site_ctx: ts.Context) -> ts.Context:
    return load_context(serialize_params_only(site_ctx), source="server.ctx")


@pytest.fixture(scope="module")
def codec(site_ctx: ts.Context, fp: str) -> PackedCkksCodec:
    return PackedCkksCodec(site_ctx, fp, PARAMS)


@pytest.fixture(scope="module")
def aggregator(server_ctx: ts.Context, fp: str) -> PackedCkksAggregator:
    return PackedCkksAggregator(server_ctx, fp, PARAMS)


def _sum(aggregator: PackedCkksAggregator, payloads: list[bytes]) -> bytes:
    total = aggregator.parse(payloads[0])
    for item in payloads[1:]:
        total = aggregator.add(total, aggregator.parse(item))
    return aggregator.dump(total)


# --- parameters ------------------------------------------------------------------------------------
def test_params_follow_the_bound_sites_and_rounds() -> None:
    p = choose_params(bound=1.0, sites=3, rounds=5)
    assert (p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.scale_bits) == (8192, (53, 60), 10)
    assert (p.packing.lanes, p.packing.lane_bits, p.packing.quant_bits) == (2, 21, 16)
    assert p.packing.step == 2.0**-16 and p.packing.summands == 15
    # more summands need more carry bits and noise margin: a larger prime, never over SEAL's 128-bit limit
    big = choose_params(bound=1.0, sites=3, rounds=10)
    assert big.packing.lane_bits == 22 and big.coeff_mod_bit_sizes[0] > 53
    assert sum(big.coeff_mod_bit_sizes) <= packing.SEAL_MAX_BITS_128[8192]
    assert packing.estimate_bytes_per_param(8192, big.coeff_mod_bit_sizes[0], big.packing.lanes) <= 8.0
    assert CkksParams.from_dict(p.to_dict()) == p
    assert p.ring == params_of(new_secret_context(p)) and p.ring.packing is None
    assert "packing" not in CkksParams().to_dict()  # unpacked federations keep their manifests


def test_params_beyond_eight_bytes_or_inconsistent_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"over the 8 B limit; quant_bits <= 16 fits"):
        choose_params(bound=1.0, sites=3, rounds=10, quant_bits=17)
    assert choose_params(bound=1.0, sites=3, rounds=10, quant_bits=17, max_bytes_per_param=None).packing.lanes == 2
    with pytest.raises(ConfigError, match="lane_bits=20 cannot hold 15 summands"):
        PackingConfig(bound=1.0, sites=3, rounds=5, lane_bits=20)
    with pytest.raises(ConfigError, match="bound"):
        PackingConfig(bound=float("nan"), sites=3, rounds=5)
    with pytest.raises(ConfigError, match="rounding"):
        PackingConfig(bound=1.0, sites=3, rounds=5, rounding="up")
    good = PARAMS
    with pytest.raises(ConfigError, match="scale_bits must be at least 12"):  # a 60-bit prime: more FFT error
        dataclasses.replace(good, coeff_mod_bit_sizes=(60, 60))
    with pytest.raises(ConfigError, match="need a data prime of 53 bits, not 50"):
        dataclasses.replace(good, coeff_mod_bit_sizes=(50, 60))
    with pytest.raises(ConfigError, match="128-bit-security limit of 109"):
        dataclasses.replace(good, poly_modulus_degree=4096)
    with pytest.raises(ConfigError, match="one data prime and one special prime"):
        dataclasses.replace(good, coeff_mod_bit_sizes=(53, 40, 60))
    with pytest.raises(ConfigError, match="lacks 'quant_bits'"):
        CkksParams.from_dict({**good.to_dict(), "packing": {"bound": 1.0, "sites": 3, "rounds": 5}})


def test_plan_must_fit_the_headroom() -> None:
    PARAMS.packing.check_plan(sites=3, rounds=5)
    PARAMS.packing.check_plan(sites=2, rounds=7)
    with pytest.raises(ConfigError, match="3 sites x 6 rounds would sum 18 .* headroom for 15"):
        PARAMS.packing.check_plan(sites=3, rounds=6)


# --- pure packing math -------------------------------------------------------------------------------
def test_embedding_round_trips_large_integers() -> None:
    rng = np.random.default_rng(0)
    coeffs = rng.integers(-(2**42), 2**42, 8192)
    assert np.array_equal(np.rint(packing.unembed(packing.embed(coeffs))).astype(np.int64), coeffs)


def test_lanes_round_trip_at_their_edges() -> None:
    cfg = PARAMS.packing
    n, top = 8192, cfg.summands * cfg.max_level  # the largest lane sum of the most summands
    levels = np.concatenate([np.full(n, top), np.full(n, -top)])
    levels[::7] = -levels[::7]
    levels[5] = 0
    packed = packing.pack_lanes(levels, cfg, n)
    assert np.array_equal(packing.unpack_lanes(packed, cfg, levels.size, cfg.summands), levels)
    short = np.array([top, -top, 1])
    assert np.array_equal(packing.unpack_lanes(packing.pack_lanes(short, cfg, n), cfg, 3, cfg.summands), short)
    with pytest.raises(CryptoError, match="out of range"):  # more than the summands allow
        packing.unpack_lanes(packed, cfg, levels.size, cfg.summands - 1)
    with pytest.raises(CryptoError, match="out of range"):  # a value past the declared count
        packing.unpack_lanes(packing.pack_lanes(short, cfg, n), cfg, 2, cfg.summands)


def test_quantisation_error_is_small_against_dp_noise() -> None:
    """Step 2^-16 of the bound against the DP noise of one step, sigma * C / batch = 1/32."""
    cfg = PackingConfig(bound=1.0, sites=3, rounds=5)  # bound = C = 1, stochastic rounding
    x = np.random.default_rng(1).uniform(-1, 1, 200_000)
    err = packing.quantize(x, cfg, np.random.default_rng(2)) * cfg.step - x
    assert np.max(np.abs(err)) < cfg.step
    assert abs(float(np.mean(err))) < 0.01 * cfg.step  # unbiased
    ratio = float(np.std(err)) / (1.0 * 1.0 / 32)
    assert ratio < 3e-4  # ~2.4e-4: adds < 1e-7 of the noise variance
    nearest = dataclasses.replace(cfg, rounding="nearest")
    assert np.max(np.abs(packing.quantize(x, nearest) * cfg.step - x)) <= cfg.step / 2


# --- codec and aggregator with TenSEAL ---------------------------------------------------------------------
def test_factories_choose_the_packed_scheme_from_params(site_ctx, server_ctx, fp) -> None:
    assert isinstance(make_site_codec("ckks", site_ctx, fp, params=PARAMS), PackedCkksCodec)
    assert isinstance(make_aggregator("ckks", server_ctx, fp, params=PARAMS), PackedCkksAggregator)
    legacy_ctx = new_secret_context(CkksParams())
    legacy_fp = context_fingerprint(legacy_ctx)
    assert isinstance(make_site_codec("ckks", legacy_ctx, legacy_fp), CkksCodec)
    assert isinstance(make_aggregator("ckks", legacy_ctx, legacy_fp, params=CkksParams()), CkksAggregator)
    with pytest.raises(KeyMaterialError, match="take the context and the params from the same bundle"):
        make_site_codec("ckks", legacy_ctx, legacy_fp, params=PARAMS)


def test_server_context_cannot_decrypt_or_encrypt(codec, aggregator, server_ctx, fp) -> None:
    total = aggregator.parse(codec.encrypt_vector(np.full(10, 0.25))[0])
    ops = SealOps(server_ctx)
    with pytest.raises(CryptoError, match="no secret key"):
        ops.decrypt_slots(total.vector)
    with pytest.raises(CryptoError, match="no secret key"):
        ops.encrypt_seeded(ops.encode(packing.embed(np.zeros(8192))))
    with pytest.raises((ValueError, RuntimeError)):
        total.vector.decrypt()
    with pytest.raises(KeyMaterialError, match="params-only"):
        PackedCkksCodec(server_ctx, fp, PARAMS)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_aggregate_over_all_rounds_equals_the_weighted_mean(site_ctx, fp, aggregator, rounding) -> None:
    """K sites x R rounds accumulate into the global state; every value sits at the edge of the bound."""
    params = dataclasses.replace(PARAMS, packing=dataclasses.replace(PARAMS.packing, rounding=rounding))
    codec = PackedCkksCodec(site_ctx, fp, params, rng=np.random.default_rng(3))
    aggregator = PackedCkksAggregator(aggregator._ctx, fp, params)
    cfg, length = params.packing, codec.chunk_values + 17  # a full and a partial chunk
    rng = np.random.default_rng(4)
    glob: list[bytes] | None = None
    expected = np.zeros(length)
    for r in range(R):
        counts = rng.integers(1, 500, K)
        big_n = round(codec.decrypt_scalar(_sum(aggregator, [codec.encrypt_scalar(float(n)) for n in counts])))
        assert big_n == int(counts.sum())
        uploads = []
        for k in range(K):
            delta = rng.choice([-cfg.bound, cfg.bound], length) * rng.choice([1.0, 0.999, 0.3], length)
            weighted = delta * (counts[k] / big_n)
            expected += weighted
            uploads.append(codec.encrypt_vector(weighted))
        round_sum = [_sum(aggregator, [u[i] for u in uploads]) for i in range(2)]
        glob = round_sum if glob is None else [_sum(aggregator, [g, s]) for g, s in zip(glob, round_sum)]
        assert [aggregator.size(aggregator.parse(g)) for g in glob] == [codec.chunk_values, 17]
        got = codec.decrypt_vector(glob, length)
        per_value = cfg.step / 2 if rounding == "nearest" else cfg.step
        assert np.max(np.abs(got - expected)) <= (r + 1) * K * per_value  # the documented bound
    # the same R rounds at full weight: every lane holds +-K*R*2**quant_bits, the most it may
    full = [codec.encrypt_vector(np.full(length, cfg.bound * s)) for s in (1, -1)]
    top = [_sum(aggregator, [full[0][i]] * cfg.summands) for i in range(2)]
    assert np.array_equal(codec.decrypt_vector(top, length), np.full(length, cfg.summands * cfg.bound))
    bottom = [_sum(aggregator, [full[1][i]] * cfg.summands) for i in range(2)]
    assert np.array_equal(codec.decrypt_vector(bottom, length), np.full(length, -cfg.summands * cfg.bound))
    with pytest.raises(CryptoError, match="past the packing's headroom of 15"):
        aggregator.add(aggregator.parse(top[0]), aggregator.parse(full[0][0]))


def test_overflow_guard_refuses_values_outside_the_safe_range(codec) -> None:
    guard = r"max \|value\| 0.5001 \(at index 3\) exceeds the packing bound \(PackingConfig.bound\) 0.5: .* Clip"
    with pytest.raises(CryptoError, match=guard):
        codec.encrypt_vector(np.array([0.0, 0.1, -0.5, 0.5001]))
    with pytest.raises(CryptoError, match="non-finite"):
        codec.encrypt_vector(np.array([0.0, np.inf]))
    with pytest.raises(CryptoError, match="bound of an encrypted scalar"):
        codec.encrypt_scalar(2 * codec.scalar_bound)
    assert codec.scalar_bound > 1e8
    assert codec.decrypt_scalar(codec.encrypt_scalar(-12.75)) == -12.75


def test_sizes_on_the_wire(codec, aggregator) -> None:
    values = np.random.default_rng(5).uniform(-0.5, 0.5, 2 * codec.chunk_values)
    uploads = codec.encrypt_vector(values)
    assert sum(map(len, uploads)) / values.size < 4.0  # seeded: (c0, seed)
    total = [_sum(aggregator, [u] * K) for u in uploads]
    assert sum(map(len, total)) / values.size < 8.0  # full ciphertexts: sums and the global state


# --- rejects -------------------------------------------------------------------------------------------
def test_truncated_foreign_and_mismatched_payloads_are_refused(codec, aggregator, site_ctx, fp, server_ctx) -> None:
    good = codec.encrypt_vector(np.linspace(-0.5, 0.5, 100))[0]
    for cut in (3, payload.HEADER_LEN, payload.PACKED_HEADER_LEN, len(good) // 2, len(good) - 1):
        with pytest.raises(CryptoError):
            aggregator.parse(good[:cut])
    flipped = bytearray(good)
    flipped[-100] ^= 0x40
    with pytest.raises(CryptoError):
        codec.decrypt_vector([bytes(flipped)], 100)
    # same parameters, another key: refused by its tag, and by decryption if the tag is forged
    other = new_secret_context(PARAMS)
    other_codec = PackedCkksCodec(other, context_fingerprint(other), PARAMS)
    foreign = other_codec.encrypt_vector(np.linspace(-0.5, 0.5, 100))[0]
    with pytest.raises(ContextMismatchError, match="made under CKKS context"):
        aggregator.parse(foreign)
    forged = foreign[:5] + bytes.fromhex(fp) + foreign[payload.HEADER_LEN :]
    with pytest.raises(CryptoError, match="another key"):
        codec.decrypt_vector([_sum(aggregator, [forged])], 100)
    # another packing (another bound) and the unpacked format are refused by name
    wider = dataclasses.replace(PARAMS, packing=dataclasses.replace(PARAMS.packing, bound=1.0))
    with pytest.raises(ContextMismatchError, match="packed with layout"):
        PackedCkksAggregator(server_ctx, fp, wider).parse(good)
    with pytest.raises(ContextMismatchError, match="unpacked CKKS format"):
        aggregator.parse(CkksCodec(site_ctx, fp).encrypt_vector(np.zeros(4))[0])
    with pytest.raises(ContextMismatchError, match="packed CKKS format"):
        CkksAggregator(server_ctx, fp).parse(good)
    # a scalar is not a vector chunk, and a forged summand count past the headroom is refused
    with pytest.raises(CryptoError, match="encrypted scalar"):
        codec.decrypt_vector([codec.encrypt_scalar(3.0)], 1)
    with pytest.raises(CryptoError, match="cannot add an encrypted scalar"):
        aggregator.add(aggregator.parse(good), aggregator.parse(codec.encrypt_scalar(3.0)))
    too_many = good[: payload.HEADER_LEN + 13] + (99).to_bytes(4, "little") + good[payload.PACKED_HEADER_LEN :]
    with pytest.raises(CryptoError, match="99 summed ciphertexts"):
        aggregator.parse(too_many)


def test_add_plain_adds_public_values(codec, aggregator) -> None:
    x = np.linspace(-0.25, 0.25, 1000)
    chunk = aggregator.parse(codec.encrypt_vector(x)[0])
    both = aggregator.add_plain(chunk, np.full(1000, 0.125))
    assert chunk.summands == 1 and both.summands == 2
    np.testing.assert_allclose(codec.decrypt_vector([aggregator.dump(both)], 1000), x + 0.125, atol=codec.step)
    with pytest.raises(CryptoError, match="exceeds the packing bound"):
        aggregator.add_plain(chunk, np.full(1000, 1.0))


# --- bundles carry the packing to both sides ---------------------------------------------------------------
def test_bundles_carry_the_packing(tmp_path) -> None:
    params = choose_params(bound=0.01, sites=2, rounds=3)
    src = init_federation(tmp_path / "prov", federation="f", server_host="localhost", clients=["a", "b"],
                          params=params, he_dealer=True)
    server = load_bundle(export_bundle("server", None, src, tmp_path / "server"), role="server")
    client = load_bundle(export_bundle("client", "a", src, tmp_path / "a"), role="client")
    assert server.params == client.params == params
    codec = make_site_codec("ckks", client.context(), client.fingerprint, params=client.params)
    aggregator = make_aggregator("ckks", server.context(), server.fingerprint, params=server.params)
    x = np.random.default_rng(6).uniform(-0.01, 0.01, 300)
    out = codec.decrypt_vector([_sum(aggregator, codec.encrypt_vector(x) * 2)], 300)
    assert np.max(np.abs(out - 2 * x)) <= 2 * params.packing.step
