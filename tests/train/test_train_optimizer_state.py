"""A site can keep Adam's state across rounds: ``train_local`` returns it and resumes from it."""

from __future__ import annotations

import numpy as np

from fedfms_secure.model import apply_mode, build_model, flatten
from fedfms_secure.train import TrainConfig, train_local


def _train(data, calls: int, epochs: int, keep: bool) -> tuple[np.ndarray, dict]:
    model = build_model()
    names = apply_mode(model, "fedmsa")
    state = None
    for _ in range(calls):
        # one full batch per step: the batch order cannot differ between the runs compared
        result = train_local(model, data, TrainConfig(epochs=epochs, batch_size=len(data), lr=3e-3, seed=1),
                             optimizer_state=state if keep else None)
        state = result.optimizer_state
    return flatten(model, names), state


def test_resumed_state_continues_the_same_adam_run(ellipses) -> None:
    data = ellipses(8)
    once, state_once = _train(data, calls=1, epochs=3, keep=False)
    resumed, state = _train(data, calls=3, epochs=1, keep=True)
    fresh, _ = _train(data, calls=3, epochs=1, keep=False)
    steps = {float(s["step"]) for s in state["state"].values()}
    assert steps == {3.0}, "the moments and the step count carry over"
    assert {float(s["step"]) for s in state_once["state"].values()} == {3.0}
    # the same path up to summation order (each call reshuffles the batch from the seed; Adam turns
    # rounding in near-zero gradients into full steps), while a fresh optimizer every call restarts
    # the moments and their bias correction: another path
    off_resumed, off_fresh = np.abs(resumed - once).mean(), np.abs(fresh - once).mean()
    assert off_fresh > 1e-4
    assert off_resumed < 0.1 * off_fresh, (off_resumed, off_fresh)


def test_default_is_a_fresh_optimizer_and_state_is_returned(ellipses) -> None:
    data = ellipses(8)
    model = build_model()
    apply_mode(model, "fedmsa")
    result = train_local(model, data, TrainConfig(epochs=1, batch_size=4, seed=0))
    assert {float(s["step"]) for s in result.optimizer_state["state"].values()} == {2.0}
