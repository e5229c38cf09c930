"""make_private_trainer: budget check, single-use batches, per-sample clipping, empty batches."""

from __future__ import annotations

import pytest
import torch

from fedfms_secure.errors import ModelError, PrivacyBudgetExhausted
from fedfms_secure.model import apply_mode, build_model, flatten
from fedfms_secure.privacy import PrivacyConfig, SitePrivacy, make_private_trainer
from fedfms_secure.train.local import batch_loss, per_image_loss


def _model():
    model = build_model()
    apply_mode(model, "fedmsa")
    return model


def _adam(model) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def _no_opacus_left(model) -> bool:
    return all(not hasattr(p, "grad_sample") and p.grad is None for p in model.parameters())


def test_the_budget_is_checked_before_anything_is_wrapped(tmp_path, ellipses) -> None:
    site = SitePrivacy.open(tmp_path, PrivacyConfig(target_epsilon=2.0), sample_rate=0.5,
                            planned_steps=4)  # fmt: skip
    model = _model()
    with pytest.raises(PrivacyBudgetExhausted, match="past the target 2.0"):
        with make_private_trainer(model, _adam(model), ellipses(4), site, steps=8):
            pytest.fail("entered a trainer the budget does not allow")
    assert site.steps_taken == 0
    assert _no_opacus_left(model) and not any(m._forward_hooks for m in model.modules())


def test_nothing_to_train_is_refused_on_the_dp_path(tmp_path, ellipses) -> None:
    site = SitePrivacy.open(tmp_path, PrivacyConfig(), sample_rate=0.5, planned_steps=4)
    model = _model()
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 64, 64), torch.zeros(0, 1, 64, 64))
    with pytest.raises(ModelError, match="empty"):
        with make_private_trainer(model, _adam(model), empty, site, steps=1):
            pass
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ModelError, match="apply_mode"):
        with make_private_trainer(model, torch.optim.SGD([torch.zeros(1)], lr=1.0),
                                  ellipses(4), site, steps=1):  # fmt: skip
            pass


def test_batches_can_be_iterated_only_once(tmp_path, ellipses) -> None:
    site = SitePrivacy.open(tmp_path, PrivacyConfig(target_epsilon=50.0), sample_rate=1e-4,
                            planned_steps=6)  # fmt: skip
    model = _model()
    with make_private_trainer(model, _adam(model), ellipses(4), site, steps=3) as dp:
        assert len(list(dp.batches)) == 3  # Poisson at 1e-4: (almost surely) three empty batches
        with pytest.raises(RuntimeError, match="already iterated.*3 DP steps"):
            iter(dp.batches)


def test_empty_poisson_batches_still_take_noised_accounted_steps(tmp_path, ellipses) -> None:
    model = _model()
    names = apply_mode(model, "fedmsa")
    before = flatten(model, names)
    site = SitePrivacy.open(tmp_path, PrivacyConfig(target_epsilon=50.0), sample_rate=1e-4,
                            planned_steps=5)  # fmt: skip
    with make_private_trainer(model, _adam(model), ellipses(4), site, steps=5) as dp:
        for images, labels in dp.batches:
            assert images.shape[1:] == (1, 64, 64) and labels.shape[1:] == (1, 64, 64)
            if len(images) == 0:
                dp.empty_step()
            else:  # probability ~2e-3: a real batch, trained as usual
                batch_loss(dp.module, model, images, labels).backward()
                dp.optimizer.step()
                dp.optimizer.zero_grad()
    assert site.steps_taken == 5
    assert (flatten(model, names) != before).mean() > 0.5  # noise-only steps still move
    assert _no_opacus_left(model)
    assert SitePrivacy.open(tmp_path, PrivacyConfig(target_epsilon=50.0), sample_rate=1e-4,
                            planned_steps=5).steps_taken == 5  # saved on exit  # fmt: skip


def test_per_sample_gradients_are_clipped_before_the_noise(tmp_path, ellipses) -> None:
    clip = 1e-3  # far below the per-image gradient norms of this model
    site = SitePrivacy.open(tmp_path, PrivacyConfig(target_epsilon=1e4, max_grad_norm=clip),
                            sample_rate=1.0, planned_steps=1)  # fmt: skip
    model = _model()
    data = ellipses(3)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    with make_private_trainer(model, _adam(model), data, site, steps=1) as dp:
        params = dp.optimizer.params
        add_noise = dp.optimizer.add_noise

        def spy() -> None:  # called after clip_and_accumulate, before any noise
            per_sample = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)
            summed = torch.cat([p.summed_grad.flatten() for p in params])
            seen.append((per_sample.detach().clone(), summed.detach().clone(),
                         per_sample.norm(dim=1)))  # fmt: skip
            add_noise()

        dp.optimizer.add_noise = spy
        for images, labels in dp.batches:
            assert len(images) == 3  # sample rate 1: every image in the one batch
            batch_loss(dp.module, model, images, labels).backward()
            dp.optimizer.step()
            dp.optimizer.zero_grad()
    assert len(seen) == 1
    per_sample, summed, norms = seen[0]
    assert float(norms.min()) > 10 * clip  # clipping had work to do
    assert float(summed.norm()) <= clip * len(per_sample) * (1 + 1e-4)
    assert float(per_sample.sum(dim=0).norm()) > clip * len(per_sample)  # unclipped would not fit
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch.testing.assert_close(summed, (factors[:, None] * per_sample).sum(dim=0),
                               rtol=1e-4, atol=1e-9)  # fmt: skip


def _clipped_sum(tmp_path, data, clip: float, clipping: str) -> torch.Tensor:
    """The clipped, summed gradient of one step over all of ``data`` (before any noise)."""
    site = SitePrivacy.open(tmp_path / clipping, PrivacyConfig(target_epsilon=1e4, max_grad_norm=clip),
                            sample_rate=1.0, planned_steps=1)  # fmt: skip
    model = _model()
    seen: list[torch.Tensor] = []
    with make_private_trainer(model, _adam(model), data, site, steps=1, clipping=clipping) as dp:
        params = dp.optimizer.params
        add_noise = dp.optimizer.add_noise

        def spy() -> None:
            seen.append(torch.cat([p.summed_grad.flatten() for p in params]).detach().clone())
            add_noise()

        dp.optimizer.add_noise = spy
        for images, labels in dp.batches:
            assert len(images) == len(data)
            dp.backward(per_image_loss(dp.module, model, images, labels))
            dp.optimizer.step()
            dp.optimizer.zero_grad()
    assert _no_opacus_left(model)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("clip", [1e-3, 1e3])  # every image clipped; none clipped
def test_ghost_clipping_sums_the_same_clipped_gradients_as_per_sample_clipping(tmp_path, ellipses, clip) -> None:
    data = ellipses(4)
    standard = _clipped_sum(tmp_path, data, clip, "standard")
    ghost = _clipped_sum(tmp_path, data, clip, "ghost")
    assert float(standard.norm()) > 0
    if clip < 1:
        assert float(standard.norm()) <= clip * len(data) * (1 + 1e-4)
    torch.testing.assert_close(ghost, standard, rtol=2e-3, atol=1e-7)


def test_ghost_clipping_trains_with_empty_steps_and_an_unknown_mode_is_refused(tmp_path, ellipses) -> None:
    site = SitePrivacy.open(tmp_path, PrivacyConfig(target_epsilon=50.0), sample_rate=1e-4, planned_steps=2)
    model = _model()
    before = flatten(model, [n for n, p in model.named_parameters() if p.requires_grad])
    with make_private_trainer(model, _adam(model), ellipses(3), site, steps=2, clipping="ghost") as dp:
        for images, _ in dp.batches:
            assert len(images) == 0  # rate 1e-4: empty Poisson batches, noise only
            dp.empty_step()
    after = flatten(model, [n for n, p in model.named_parameters() if p.requires_grad])
    assert (before != after).any()  # the noise moved the parameters
    assert site.accountant.history and _no_opacus_left(model)
    with pytest.raises(Exception, match="clipping 'fast' is not one of standard, ghost"):
        with make_private_trainer(model, _adam(model), ellipses(3), site, steps=1, clipping="fast"):
            pass


class _Patients(torch.utils.data.Dataset):
    """Slices with a patient each: ``per`` consecutive slices per patient."""

    def __init__(self, data, per: int) -> None:
        self.data, self.patients = data, [f"p{i // per}" for i in range(len(data))]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


@pytest.mark.parametrize("clip", [1e-3, 1e3])  # every patient clipped; none clipped
def test_slices_per_patient_average_a_patients_gradients_before_clipping(tmp_path, ellipses, clip) -> None:
    from fedfms_secure.privacy.units import PatientDataset
    from fedfms_secure.train.local import per_image_loss as loss_of

    slices = _Patients(ellipses(6), per=2)
    patients = PatientDataset(slices, per_patient=2)
    images, labels = patients[0]
    assert images.shape[0] == labels.shape[0] == 2  # both of patient 0's slices, stacked
    # the reference: each patient's mean gradient over its two slices, clipped to C as a whole, summed
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.zeros(sum(p.numel() for p in params))
    for k in range(3):
        x = torch.stack([slices[2 * k][0], slices[2 * k + 1][0]])
        y = torch.stack([slices[2 * k][1], slices[2 * k + 1][1]])
        grads = torch.autograd.grad(loss_of(model, model, x, y).mean(), params)
        g = torch.cat([t.flatten() for t in grads])
        expected += g * min(1.0, clip / (float(g.norm()) + 1e-6))
    site = SitePrivacy.open(tmp_path, PrivacyConfig(target_epsilon=1e4, max_grad_norm=clip), sample_rate=1.0,
                            planned_steps=1)  # fmt: skip
    seen: list[torch.Tensor] = []
    with make_private_trainer(model, _adam(model), patients, site, steps=1) as dp:
        add_noise = dp.optimizer.add_noise

        def spy() -> None:
            seen.append(torch.cat([p.summed_grad.flatten() for p in dp.optimizer.params]).detach().clone())
            add_noise()

        dp.optimizer.add_noise = spy
        for x, y in dp.batches:
            assert x.shape[:2] == (3, 2)  # sample rate 1: three patients of two slices
            dp.backward(per_image_loss(dp.module, model, x.flatten(0, 1), y.flatten(0, 1)), images_per_record=2)
            dp.optimizer.step()
            dp.optimizer.zero_grad()
    assert _no_opacus_left(model) and len(seen) == 1
    if clip < 1:
        assert float(seen[0].norm()) <= clip * 3 * (1 + 1e-4)  # three records, not six
    torch.testing.assert_close(seen[0], expected, rtol=2e-3, atol=1e-8)


def test_slices_per_patient_is_refused_where_it_cannot_hold(tmp_path, ellipses) -> None:
    from fedfms_secure.errors import ConfigError
    from fedfms_secure.privacy.units import PatientDataset, record_dataset
    from fedfms_secure.train.local import TrainConfig

    with pytest.raises(ConfigError, match="at least 1"):
        PatientDataset(_Patients(ellipses(2), per=1), per_patient=0)
    with pytest.raises(ConfigError, match="patient-level DP only"):
        record_dataset(_Patients(ellipses(2), per=1), "slice", 2)
    with pytest.raises(ConfigError, match="needs clipping 'standard'"):
        TrainConfig(slices_per_patient=2, clipping="ghost")
    # a patient with fewer slices than m: drawn with replacement, still m images
    one = PatientDataset(_Patients(ellipses(3), per=3), per_patient=5)
    assert len(one) == 1 and one[0][0].shape[0] == 5
