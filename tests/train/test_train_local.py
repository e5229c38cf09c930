"""Local training, with and without DP-SGD, on the tiny preset."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import create_accountant
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fedfms_secure.data.loader import SliceDataset
from fedfms_secure.errors import ConfigError, DataError, ModelError, PrivacyBudgetExhausted
from fedfms_secure.model import MODES, apply_mode, build_model, flatten, load_vector
import fedfms_secure.privacy.engine as engine
import fedfms_secure.train.local as local
from fedfms_secure.privacy import PrivacyConfig, SitePrivacy
from fedfms_secure.privacy.accounting import RDP_ALPHAS
from fedfms_secure.train import TrainConfig, evaluate_dice, steps_per_epoch, train_local
from fedfms_secure.train.losses import per_image_segmentation_loss

OPACUS_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "summed_grad")


def _site(tmp_path, n: int, batch: int, steps: int, epsilon: float = 8.0, unit: str = "slice") -> SitePrivacy:
    """A site whose records are ``unit``s; the DP mechanics tests below use slice records of the
    ellipses (which have no patients); the patient-level tests use ``_patients``."""
    return SitePrivacy.open(tmp_path, PrivacyConfig(target_epsilon=epsilon, unit=unit),
                            sample_rate=batch / n, planned_steps=steps, records=n)  # fmt: skip


def _patients(data, per_patient: int) -> SliceDataset:
    """The ellipses grouped into patients of ``per_patient`` consecutive slices."""
    images, labels = data.tensors
    cases = [f"p{i // per_patient:03d}" for i in range(len(images))]
    return SliceDataset(images, labels, cases)


def _assert_plain_module(model) -> None:
    for p in model.parameters():
        assert not any(hasattr(p, a) for a in OPACUS_PARAM_ATTRS)
        assert p.grad is None
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks
        assert not hasattr(m, "activations") and not hasattr(m, "ft_compute_sample_grad")
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_steps_per_epoch() -> None:
    assert steps_per_epoch(60, 8) == 8
    assert steps_per_epoch(64, 8) == 8
    assert steps_per_epoch(3, 8) == 1


@pytest.mark.parametrize("mode", MODES)
def test_dp_training_runs_moves_only_trainable_params_and_leaves_a_plain_model(
    mode, tmp_path, ellipses
) -> None:
    data = ellipses(24)
    model = build_model(pretrained=False)
    names = apply_mode(model, mode)
    frozen = {n: p.clone() for n, p in model.named_parameters() if n not in names}
    before = flatten(model, names)
    site = _site(tmp_path, 24, 8, steps=2 * steps_per_epoch(24, 8))
    result = train_local(model, data, TrainConfig(batch_size=8, max_physical_batch=4), site)
    assert result.num_samples == 24 and result.steps == 3
    assert site.steps_taken == 3  # physical batches of 4 still make one accounted step per batch
    assert result.epsilon is not None and 0 < result.epsilon < 8.0
    assert result.seconds > 0 and result.loss == result.loss  # not NaN
    assert (flatten(model, names) != before).mean() > 0.5  # DP noise moves every coordinate
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    _assert_plain_module(model)
    # the lead's round loop: load the aggregate, train again on the same object
    load_vector(model, names, before)
    again = train_local(model, data, TrainConfig(batch_size=8), site)
    assert again.epsilon > result.epsilon
    _assert_plain_module(model)


def test_epsilon_grows_across_calls_and_survives_reopen(tmp_path, ellipses) -> None:
    data = ellipses(16)
    model = build_model()
    apply_mode(model, "fedmsa")
    per_call = steps_per_epoch(16, 4)
    site = _site(tmp_path, 16, 4, steps=3 * per_call)
    first = train_local(model, data, TrainConfig(batch_size=4), site)
    second = train_local(model, data, TrainConfig(batch_size=4), site)
    assert 0 < first.epsilon < second.epsilon <= 8.0
    reopened = _site(tmp_path, 16, 4, steps=3 * per_call)  # as after a restart
    assert reopened.steps_taken == 2 * per_call
    assert reopened.epsilon() == pytest.approx(second.epsilon, rel=1e-12)
    fresh = create_accountant(mechanism="rdp")
    for _ in range(2 * per_call):
        fresh.step(noise_multiplier=site.noise_multiplier, sample_rate=4 / 16)
    assert reopened.epsilon() == pytest.approx(fresh.get_epsilon(delta=1e-5, alphas=RDP_ALPHAS))
    third = train_local(model, data, TrainConfig(batch_size=4), reopened)
    assert second.epsilon < third.epsilon <= 8.0
    with pytest.raises(PrivacyBudgetExhausted, match="past the target"):
        train_local(model, data, TrainConfig(batch_size=4), reopened)
    assert reopened.steps_taken == 3 * per_call  # the refused call spent nothing


class _ScriptedSampler(UniformWithReplacementSampler):
    """Poisson sampler stand-in that yields a fixed list of index batches (empties included)."""

    script: list[list[int]] = []

    def __iter__(self):
        assert self.steps == len(self.script)
        yield from (list(b) for b in self.script)


def test_loss_is_the_mean_of_the_last_epoch_with_empty_batches(
    tmp_path, ellipses, monkeypatch
) -> None:
    # 2 epochs x 2 steps; epoch 1 has an empty batch, epoch 2 two real ones (one split in two)
    _ScriptedSampler.script = [[0, 1], [], [2, 3, 0], [1]]
    monkeypatch.setattr(engine, "UniformWithReplacementSampler", _ScriptedSampler)
    seen: list[tuple[float, int]] = []

    def recording_loss(logits, iou, targets):
        losses = per_image_segmentation_loss(logits, iou, targets)
        seen.append((float(losses.detach().mean()), len(targets)))
        return losses

    monkeypatch.setattr(local, "per_image_segmentation_loss", recording_loss)
    model = build_model()
    names = apply_mode(model, "fedmsa")
    before = flatten(model, names)
    site = _site(tmp_path, 4, 2, steps=4, epsilon=50.0)
    result = train_local(model, ellipses(4), TrainConfig(epochs=2, batch_size=2,
                                                         max_physical_batch=2), site)  # fmt: skip
    assert [n for _, n in seen] == [2, 2, 1, 1]  # [2,3,0] split into physical batches 2 + 1
    assert site.steps_taken == result.steps == 4  # the empty batch is a noised, accounted step
    step3 = (seen[1][0] * 2 + seen[2][0] * 1) / 3  # logical step of 3 images
    step4 = seen[3][0]
    assert result.loss == pytest.approx((step3 + step4) / 2, rel=1e-9)
    assert (flatten(model, names) != before).mean() > 0.5
    _assert_plain_module(model)


def test_last_epoch_of_only_empty_batches_reports_nan(tmp_path, ellipses, monkeypatch) -> None:
    _ScriptedSampler.script = [[0, 1], [], [], []]
    monkeypatch.setattr(engine, "UniformWithReplacementSampler", _ScriptedSampler)
    model = build_model()
    apply_mode(model, "fedmsa")
    site = _site(tmp_path, 4, 2, steps=4, epsilon=50.0)
    result = train_local(model, ellipses(4), TrainConfig(epochs=2, batch_size=2), site)
    assert math.isnan(result.loss) and site.steps_taken == 4


def test_a_sample_rate_other_than_batch_over_slices_is_refused(tmp_path, ellipses) -> None:
    model = build_model()
    apply_mode(model, "fedmsa")
    site = _site(tmp_path, 24, 8, steps=30)  # planned for 8 / 24
    with pytest.raises(ConfigError, match=r"4 / 24 = 0\.166667.*sample_rate=0\.333333.*"
                                          r"planned from expected slices per step / training slices"):
        train_local(model, ellipses(24), TrainConfig(batch_size=4), site)
    with pytest.raises(ConfigError, match=r"8 / 20"):
        train_local(model, ellipses(20), TrainConfig(batch_size=8), site)
    assert site.steps_taken == 0
    _assert_plain_module(model)


def test_plain_training_learns_the_easy_task(ellipses) -> None:
    train, test = ellipses(48, seed=0), ellipses(16, seed=1)
    model = build_model(pretrained=False)
    apply_mode(model, "fedmsa")
    dice_before = evaluate_dice(model, test)
    losses = [train_local(model, train, TrainConfig(lr=3e-3, seed=e)).loss for e in range(6)]
    assert losses[-1] < 0.5 * losses[0]
    assert evaluate_dice(model, test) > max(0.7, dice_before + 0.3)


def test_dp_training_with_a_generous_budget_learns(tmp_path, ellipses) -> None:
    train, test = ellipses(48, seed=0), ellipses(16, seed=1)
    model = build_model(pretrained=False)
    apply_mode(model, "fedmsa")
    dice_before = evaluate_dice(model, test)
    epochs = 6
    site = _site(tmp_path, 48, 8, steps=epochs * steps_per_epoch(48, 8), epsilon=1e5)
    losses = [train_local(model, train, TrainConfig(lr=3e-3), site).loss for _ in range(epochs)]
    assert losses[-1] < 0.7 * losses[0]
    assert evaluate_dice(model, test) > dice_before + 0.3


def test_plain_training_is_reproducible_per_seed(ellipses) -> None:
    data = ellipses(16)
    vecs = []
    for _ in range(2):
        model = build_model()
        names = apply_mode(model, "fedmsa")
        train_local(model, data, TrainConfig(batch_size=4, seed=7), None)
        vecs.append(flatten(model, names))
    assert (vecs[0] == vecs[1]).all()


def test_errors_say_what_to_do(ellipses) -> None:
    model = build_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ModelError, match="apply_mode"):
        train_local(model, ellipses(4), TrainConfig())
    apply_mode(model, "fedmsa")
    with pytest.raises(ModelError, match="empty"):
        train_local(model, torch.utils.data.TensorDataset(torch.zeros(0, 1, 64, 64)), TrainConfig())


def _two_classes(data):
    """Class 1: the ellipse; class 2: its left half (inside class 1, as a cup in a disc)."""
    images, labels = data.tensors
    inner = labels.clone()
    inner[..., 32:] = 0
    return torch.utils.data.TensorDataset(images, torch.cat([labels, inner], dim=1))


@pytest.mark.parametrize("mode", MODES)
def test_box_prompted_two_class_training_under_dp(mode, tmp_path, ellipses) -> None:
    data = _two_classes(ellipses(16))
    model = build_model(pretrained=False, num_classes=2, prompt="box")
    names = apply_mode(model, mode)
    frozen = {n: p.clone() for n, p in model.named_parameters() if n not in names}
    before = flatten(model, names)
    site = _site(tmp_path, 16, 8, steps=steps_per_epoch(16, 8))
    result = train_local(model, data, TrainConfig(batch_size=8), site)
    assert result.steps == 2 and site.steps_taken == 2 and result.loss == result.loss
    assert (flatten(model, names) != before).mean() > 0.5
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    _assert_plain_module(model)


def test_plain_training_learns_two_classes_with_boxes(ellipses) -> None:
    from fedfms_secure.train import evaluate_dice_per_class

    train, test = _two_classes(ellipses(48, seed=0)), _two_classes(ellipses(16, seed=1))
    model = build_model(pretrained=False, num_classes=2, prompt="box")
    apply_mode(model, "fedmsa")
    before = evaluate_dice_per_class(model, test)
    for e in range(6):
        train_local(model, train, TrainConfig(lr=3e-3, seed=e))
    after = evaluate_dice_per_class(model, test)
    assert len(after) == 2
    assert all(a > max(0.6, b + 0.2) for a, b in zip(after, before, strict=True)), (before, after)
    assert evaluate_dice(model, test) == pytest.approx(sum(after) / 2)


class _RecordingSampler(UniformWithReplacementSampler):
    """The real Poisson sampler, recording what it was built with and every batch it drew."""

    built: list[tuple[int, float, int]] = []
    drawn: list[list[int]] = []

    def __init__(self, *, num_samples, sample_rate, generator=None, steps=None):
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, generator=generator, steps=steps)
        _RecordingSampler.built.append((num_samples, sample_rate, steps))

    def __iter__(self):
        for batch in super().__iter__():
            _RecordingSampler.drawn.append(list(batch))
            yield batch


def _patient_of(data: SliceDataset):
    """Maps an image (exact pixels) back to the patient it belongs to."""
    keys = {data.images[i].float().numpy().tobytes(): (data.cases[i], i) for i in range(len(data))}
    return lambda image: keys[image.detach().float().numpy().tobytes()]


def test_patient_level_dp_samples_patients_at_q_and_one_slice_each(tmp_path, ellipses, monkeypatch) -> None:
    data = _patients(ellipses(60), per_patient=3)  # 20 patients of 3 slices
    _RecordingSampler.built, _RecordingSampler.drawn = [], []
    monkeypatch.setattr(engine, "UniformWithReplacementSampler", _RecordingSampler)
    seen: list[list[tuple[str, int]]] = []
    patient_of = _patient_of(data)

    real_loss = local.per_image_loss  # the DP path's loss (one term per image)

    def recording_loss(module, model, images, labels, **kw):
        seen.append([patient_of(x) for x in images])
        return real_loss(module, model, images, labels, **kw)

    monkeypatch.setattr(local, "per_image_loss", recording_loss)
    model = build_model()
    apply_mode(model, "fedmsa")
    per_epoch = steps_per_epoch(20, 5)
    site = _site(tmp_path, 20, 5, steps=10 * per_epoch, epsilon=50.0, unit="patient")
    result = train_local(model, data, TrainConfig(epochs=10, batch_size=5, max_physical_batch=64), site)
    # the sampler runs over the 20 patients (not the 60 slices) at q = 5 / 20, for the planned steps
    assert _RecordingSampler.built == [(20, 0.25, 40)]
    assert result.num_samples == 20 and result.steps == 40 == site.steps_taken and result.unit == "patient"
    drawn = _RecordingSampler.drawn
    assert len(drawn) == 40 and all(len(set(b)) == len(b) for b in drawn)
    mean = sum(len(b) for b in drawn) / len(drawn)
    assert 5 - 1.3 < mean < 5 + 1.3  # Binomial(20, 1/4) per step: sd of the mean over 40 steps 0.31
    # every sampled patient contributes exactly one slice (one per-sample gradient) to its step
    nonempty = [b for b in drawn if b]
    assert len(seen) == len(nonempty)
    for step, batch in zip(seen, nonempty, strict=True):
        patients = [p for p, _ in step]
        assert len(patients) == len(set(patients)) == len(batch)
        assert sorted(patients) == sorted(f"p{i:03d}" for i in batch)
    # the slice of a patient is drawn at random: over the run, patients show more than one slice
    slices_of: dict[str, set[int]] = {}
    for step in seen:
        for p, i in step:
            slices_of.setdefault(p, set()).add(i)
    assert sum(len(v) > 1 for v in slices_of.values()) >= 10
    _assert_plain_module(model)


def test_patient_records_need_to_know_the_patients(tmp_path, ellipses) -> None:
    model = build_model()
    apply_mode(model, "fedmsa")
    site = _site(tmp_path, 8, 4, steps=10, unit="patient")
    with pytest.raises(DataError, match="which patient each slice belongs to"):
        train_local(model, ellipses(8), TrainConfig(batch_size=4), site)
    assert site.steps_taken == 0
    _assert_plain_module(model)


def test_slices_per_patient_gives_each_sampled_patient_m_distinct_consecutive_slices(
    tmp_path, ellipses, monkeypatch
) -> None:
    data = _patients(ellipses(60), per_patient=3)  # 20 patients of 3 slices
    _RecordingSampler.built, _RecordingSampler.drawn = [], []
    monkeypatch.setattr(engine, "UniformWithReplacementSampler", _RecordingSampler)
    seen: list[list[tuple[str, int]]] = []
    patient_of = _patient_of(data)
    real_loss = local.per_image_loss

    def recording_loss(module, model, images, labels, **kw):
        seen.append([patient_of(x) for x in images])
        return real_loss(module, model, images, labels, **kw)

    monkeypatch.setattr(local, "per_image_loss", recording_loss)
    model = build_model()
    apply_mode(model, "fedmsa")
    site = _site(tmp_path, 20, 5, steps=4 * steps_per_epoch(20, 5), epsilon=50.0, unit="patient")
    config = TrainConfig(epochs=4, batch_size=5, max_physical_batch=64, slices_per_patient=2)
    result = train_local(model, data, config, site)
    # still one record per patient: the sampler runs over the 20 patients at q = 5 / 20
    assert _RecordingSampler.built == [(20, 0.25, 16)] and result.steps == 16 == site.steps_taken
    nonempty = [b for b in _RecordingSampler.drawn if b]
    assert len(seen) == len(nonempty)
    for step, batch in zip(seen, nonempty, strict=True):
        assert len(step) == 2 * len(batch)
        pairs = [step[i : i + 2] for i in range(0, len(step), 2)]
        assert sorted(a[0] for a, _ in pairs) == sorted(f"p{i:03d}" for i in batch)
        for (pa, ia), (pb, ib) in pairs:  # two distinct slices of the same patient, side by side
            assert pa == pb and ia != ib
    _assert_plain_module(model)
