"""The communicated parameter vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfms_secure.errors import ModelError
from fedfms_secure.model import apply_mode, build_model, flatten, load_vector, vector_length


def test_flatten_is_float32_in_the_given_order() -> None:
    model = build_model()
    names = apply_mode(model, "fedmsa")
    vec = flatten(model, names)
    assert vec.dtype == np.float32 and vec.ndim == 1
    params = dict(model.named_parameters())
    assert vec.size == vector_length(model, names) == sum(params[n].numel() for n in names)
    first = dict(model.named_parameters())[names[0]]
    np.testing.assert_array_equal(vec[: first.numel()], first.detach().numpy().ravel())


def test_round_trip_moves_exactly_the_named_parameters() -> None:
    source, target = build_model(seed=1), build_model(seed=2)
    names = apply_mode(source, "fedmsa")
    apply_mode(target, "fedmsa")
    vec = flatten(source, names) + np.float32(0.5)
    frozen_before = {n: p.clone() for n, p in target.named_parameters() if n not in names}
    load_vector(target, names, vec)
    np.testing.assert_array_equal(flatten(target, names), vec)
    for n, p in target.named_parameters():
        if n not in names:
            assert torch.equal(p, frozen_before[n]), n
    # the copy is independent of the array
    vec[:] = 0
    assert np.any(flatten(target, names) != 0)


def test_length_mismatch_and_unknown_names_are_model_errors() -> None:
    model = build_model()
    names = apply_mode(model, "fedmsa")
    vec = flatten(model, names)
    with pytest.raises(ModelError, match=f"expected \\({vec.size},\\)"):
        load_vector(model, names, vec[:-1])
    with pytest.raises(ModelError, match="expected"):
        load_vector(model, names, vec.reshape(1, -1))
    with pytest.raises(ModelError, match="no parameter"):
        flatten(model, ["sam.nope.weight"])
    bad = vec.copy()
    bad[3] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        load_vector(model, names, bad)
