"""Aggregation is reproducible: the same seed gives the same aggregate, whatever the arrival order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedfms_secure.he.ckks import context_fingerprint, new_secret_context
from fedfms_secure.he.codec import PlainCodec, make_site_codec
from fedfms_secure.he.packing import choose_params
from fedfms_secure.he.aggregate import PLAIN_LIMIT, PlainAggregator
from fedfms_secure.errors import CryptoError


def _site_updates(rng: np.random.Generator, sites: int = 4, size: int = 3000) -> list[np.ndarray]:
    # magnitudes spread over many binades, so float64 addition order matters for plain floats
    return [rng.standard_normal(size) * 10.0 ** rng.integers(-9, 0, size) for _ in range(sites)]


def _sum_in_order(updates: list[np.ndarray], order: tuple[int, ...]) -> bytes:
    aggregator, codec = PlainAggregator(), PlainCodec()
    total = aggregator.parse(codec.encrypt_vector(np.zeros(updates[0].size))[0])
    for k in order:
        total = aggregator.add(total, aggregator.parse(codec.encrypt_vector(updates[k])[0]))
    return aggregator.dump(total)


def test_plain_sum_does_not_depend_on_arrival_order():
    updates = _site_updates(np.random.default_rng(3))
    # the naive float64 sums do differ between orders: the test would catch a float accumulator
    naive = {np.sum([updates[k] for k in order], axis=0).tobytes()
             for order in itertools.permutations(range(len(updates)))}
    assert len(naive) > 1
    dumps = {_sum_in_order(updates, order) for order in itertools.permutations(range(len(updates)))}
    assert len(dumps) == 1
    total = np.frombuffer(dumps.pop(), dtype="<f8")
    np.testing.assert_allclose(total, np.sum(updates, axis=0), rtol=0, atol=len(updates) * 2.0**-52)


def test_plain_summer_refuses_values_beyond_its_range():
    aggregator = PlainAggregator()
    with pytest.raises(CryptoError, match="clip the update"):
        aggregator.parse(np.array([1.0, PLAIN_LIMIT * 2]).astype("<f8").tobytes())
    half = aggregator.parse(np.array([PLAIN_LIMIT * 0.75]).astype("<f8").tobytes())
    with pytest.raises(CryptoError, match="not clipped"):
        aggregator.add(half, half)


def test_seeded_rounding_repeats_and_differs_by_seed():
    params = choose_params(bound=0.5, sites=3, rounds=5)  # stochastic rounding, the default
    ctx = new_secret_context(params)
    fingerprint = context_fingerprint(ctx)
    codec = make_site_codec("ckks", ctx, fingerprint, params=params)
    values = np.random.default_rng(0).uniform(-0.5, 0.5, 3000) * codec.bound
    decoded = []
    for entropy in [(0, 1, 2), (0, 1, 2), (0, 1, 3)]:
        codec.seed_rounding(*entropy)
        decoded.append(codec.decrypt_vector(codec.encrypt_vector(values), values.size))
    np.testing.assert_array_equal(decoded[0], decoded[1])
    assert np.any(decoded[0] != decoded[2])  # stochastic: another seed rounds some values the other way
    assert np.max(np.abs(decoded[0] - values)) < codec.step
