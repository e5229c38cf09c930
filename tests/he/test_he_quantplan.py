"""The quantisation sized from the update plan: the 1%-of-noise rule, headroom, clipping, exact sums."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedfms_secure.errors import ConfigError
from fedfms_secure.he import packing
from fedfms_secure.he.aggregate import PackedCkksAggregator
from fedfms_secure.he.ckks import (
    CkksParams, context_fingerprint, load_context, new_secret_context, serialize_params_only,
)
from fedfms_secure.he.codec import PackedCkksCodec
from fedfms_secure.he.quantplan import UpdatePlan, clip_to_bound, plan_params

PLANS = [
    UpdatePlan(lr=3e-3, local_steps=25, min_local_steps=15, sites=3, rounds=5),  # the demo plan
    UpdatePlan(lr=1e-4, local_steps=4, sites=2, rounds=3),
    UpdatePlan(lr=3e-3, local_steps=200, sites=8, rounds=4, error_ratio=0.02),
    UpdatePlan(bound=0.5, noise_std=0.01, sites=5, rounds=2),  # the figures given directly
]


@pytest.mark.parametrize("plan", PLANS, ids=["demo", "small-lr", "many-steps", "given"])
def test_step_meets_the_noise_rule_and_is_the_coarsest_that_does(plan: UpdatePlan) -> None:
    params = plan_params(plan)
    cfg = params.packing
    noise = plan.weighted_noise_std
    assert cfg.bound == plan.update_bound and cfg.noise_std == noise
    assert cfg.step / 2 <= plan.error_ratio * noise  # the guarantee: error std <= step / 2
    assert cfg.step > plan.error_ratio * noise  # one bit fewer would break it: no bits wasted
    # measured: a K-site aggregate of noisy weighted updates, quantised as the sites do
    rng = np.random.default_rng(0)
    k = plan.sites
    updates = np.clip(rng.normal(0, noise, (k, 100_000)), -cfg.bound, cfg.bound)
    errors = np.stack([packing.quantize(u, cfg, rng) * cfg.step - u for u in updates])
    assert abs(float(errors.mean())) < 0.05 * cfg.step  # unbiased
    assert float(errors.sum(axis=0).std()) <= plan.error_ratio * math.sqrt(k) * noise


def test_noise_and_bound_follow_adam_under_dp() -> None:
    plan = UpdatePlan(lr=3e-3, local_steps=25, min_local_steps=16, sites=4, rounds=5)
    assert plan.update_bound == pytest.approx(3e-3 * 25)
    assert plan.weighted_noise_std == pytest.approx(3e-3 * 4 / 4)
    assert plan.quant_bits == math.ceil(math.log2(0.075 / (2 * 0.01 * 3e-3)))
    no_dp = UpdatePlan(lr=3e-3, local_steps=25, sites=4, rounds=5, dp=False)
    assert no_dp.weighted_noise_std is None
    assert no_dp.update_bound / 2**no_dp.quant_bits / 2 <= 1e-3 * no_dp.update_bound
    assert plan_params(no_dp).packing.noise_std is None
    with pytest.raises(ConfigError, match="learning rate and the local steps"):
        UpdatePlan(lr=3e-3, sites=3, rounds=5)
    with pytest.raises(ConfigError, match="exceeds local_steps"):
        UpdatePlan(lr=3e-3, local_steps=5, min_local_steps=6)
    with pytest.raises(ConfigError, match="error_ratio=0 must be a positive"):
        UpdatePlan(lr=3e-3, local_steps=5, error_ratio=0)


def test_a_plan_whose_headroom_cannot_fit_is_refused_with_what_to_change() -> None:
    plan = UpdatePlan(lr=1e-3, local_steps=400, sites=20, rounds=50)  # 14 bits + 10 carry bits
    with pytest.raises(ConfigError, match="20 sites x 50 rounds of headroom .* do not fit.*Plan fewer rounds per "
                                          "CKKS key .*rotate-he"):
        plan_params(plan)
    with pytest.raises(ConfigError, match="more than the 30 a lane can carry"):
        UpdatePlan(bound=1.0, noise_std=1e-9, sites=3, rounds=5).quant_bits


def test_clipping_to_the_bound_is_applied_and_counted() -> None:
    update = np.array([0.5, -0.2, 0.06, -0.0601, 0.0, 0.059])
    clipped, count = clip_to_bound(update, 0.06)
    assert count == 3
    assert np.array_equal(clipped, [0.06, -0.06, 0.06, -0.06, 0.0, 0.059])
    same, none = clip_to_bound(clipped, 0.06)
    assert none == 0 and np.array_equal(same, clipped)
    with pytest.raises(ConfigError, match="positive finite"):
        clip_to_bound(update, float("nan"))


def test_packing_records_its_noise_std_and_old_manifests_still_load() -> None:
    cfg = plan_params(PLANS[0]).packing
    again = packing.PackingConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.noise_std == pytest.approx(3e-3 * math.sqrt(15) / 3)
    old = {k: v for k, v in cfg.to_dict().items() if k != "noise_std"}
    assert packing.PackingConfig.from_dict(old).noise_std is None
    assert "noise_std" not in packing.PackingConfig.from_dict(old).to_dict()  # layout tag unchanged
    with pytest.raises(ConfigError, match="noise_std=-1"):
        packing.PackingConfig.from_dict({**old, "noise_std": -1})


def test_sums_over_all_rounds_decode_within_the_quantisation_error_at_the_plan_packing() -> None:
    """K sites x R rounds of weighted updates into one global state, with real TenSEAL ciphertexts."""
    plan = PLANS[0]
    params: CkksParams = plan_params(plan)
    cfg = params.packing
    assert cfg.lanes == 3 and params.coeff_mod_bit_sizes[0] <= 60
    ctx = new_secret_context(params)
    fp = context_fingerprint(ctx)
    codec = PackedCkksCodec(ctx, fp, params, rng=np.random.default_rng(1))
    agg = PackedCkksAggregator(load_context(serialize_params_only(ctx), source="server"), fp, params)
    rng = np.random.default_rng(2)
    length = codec.chunk_values + 101  # a full chunk and a partial one
    exact = np.zeros(length)
    state = None
    for _ in range(plan.rounds):
        weights = rng.dirichlet(np.ones(plan.sites))
        for w in weights:
            delta = rng.normal(0, 1.2 * plan.lr * math.sqrt(20), length)
            delta[:50] = cfg.bound * rng.choice([-1.0, 1.0], 50)  # the edges of the bound
            update, _ = clip_to_bound(delta * w, cfg.bound)
            exact += update
            chunks = [agg.parse(p) for p in codec.encrypt_vector(update)]
            state = chunks if state is None else [agg.add(a, b) for a, b in zip(state, chunks)]
    got = codec.decrypt_vector([agg.dump(c) for c in state], length)
    err = got - exact
    assert np.max(np.abs(err)) < cfg.summands * cfg.step  # stochastic rounding: < step per summand
    assert float(err.std()) <= math.sqrt(cfg.summands) * cfg.step / 2
    # every lane full at the edge: the headroom holds K x R summands exactly
    top = agg.parse(codec.encrypt_vector(np.full(length, cfg.bound))[0])
    total = top
    for _ in range(cfg.summands - 1):
        total = agg.add(total, top)
    n = min(length, codec.chunk_values)
    assert np.array_equal(codec.decrypt_vector([agg.dump(total)], n), np.full(n, cfg.summands * cfg.bound))
