"""Dice and HD95."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedfms_secure.model import build_model
from fedfms_secure.train import evaluate_dice, evaluate_hd95
from fedfms_secure.train.evaluate import dice_per_image
from fedfms_secure.train.losses import dice_bce_loss, per_image_dice_bce


class _Oracle(nn.Module):
    """Returns +/-10 logits from a fixed mask list, in dataset order (batch by batch)."""

    def __init__(self, masks: torch.Tensor) -> None:
        super().__init__()
        self.masks, self.pos = masks, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.masks[self.pos : self.pos + len(images)] * 20 - 10
        self.pos += len(images)
        return out


def test_dice_per_image_values() -> None:
    a = torch.zeros(3, 1, 4, 4)
    b = torch.zeros(3, 1, 4, 4)
    a[0, 0, :2] = 1  # 8 pixels
    b[0, 0, :1] = 1  # 4 pixels, all inside a
    a[1, 0, 0, 0] = 1  # disjoint from b[1]
    b[1, 0, 3, 3] = 1
    # item 2: both empty
    torch.testing.assert_close(dice_per_image(a, b), torch.tensor([8 / 12, 0.0, 1.0]))


def test_evaluate_dice_and_hd95_against_an_oracle(ellipses) -> None:
    data = ellipses(5)
    labels = data.tensors[1]
    assert evaluate_dice(_Oracle(labels), data, batch_size=2) == 1.0
    assert evaluate_hd95(_Oracle(labels), data, batch_size=2) == 0.0
    shifted = torch.roll(labels, shifts=3, dims=-1)
    dice = evaluate_dice(_Oracle(shifted), data, batch_size=2)
    assert 0.5 < dice < 1.0
    assert math.isclose(evaluate_hd95(_Oracle(shifted), data, batch_size=2), 3.0, abs_tol=0.5)


def test_empty_labels_do_not_reward_predicting_nothing(ellipses) -> None:
    data = ellipses(4)
    images, labels = data.tensors
    labels = labels.clone()
    labels[:2] = 0  # two slices without foreground
    mixed = torch.utils.data.TensorDataset(images, labels)
    assert evaluate_dice(_Oracle(torch.zeros_like(labels)), mixed, batch_size=2) == 0.0
    assert evaluate_dice(_Oracle(labels), mixed, batch_size=2) == 1.0
    assert math.isnan(evaluate_dice(_Oracle(labels[:2]), torch.utils.data.TensorDataset(images[:2], labels[:2])))


def test_an_empty_dataset_scores_nan_without_running_the_model() -> None:
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 8, 8))
    oracle = _Oracle(torch.zeros(0, 1, 8, 8))
    assert math.isnan(evaluate_hd95(oracle, empty))
    assert math.isnan(evaluate_dice(oracle, empty))
    assert oracle.pos == 0


def test_evaluate_restores_training_mode(ellipses) -> None:
    model = build_model().train()
    score = evaluate_dice(model, ellipses(3))
    assert 0.0 <= score <= 1.0 and model.training


def test_loss_is_a_mean_of_per_image_terms() -> None:
    logits = torch.randn(4, 1, 8, 8)
    labels = (torch.rand(4, 1, 8, 8) > 0.5).float()
    per = per_image_dice_bce(logits, labels)
    assert per.shape == (4,)
    torch.testing.assert_close(dice_bce_loss(logits, labels), per.mean())
    torch.testing.assert_close(per[1], per_image_dice_bce(logits[1:2], labels[1:2])[0])
    perfect = per_image_dice_bce(labels * 40 - 20, labels)
    assert float(perfect.max()) < 0.05
