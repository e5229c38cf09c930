"""Dice and HD95."""

from __future__ import annotations

import math

import pytest
import torch

from fedfms_secure.model import build_model
from fedfms_secure.train import evaluate_dice, evaluate_hd95
from fedfms_secure.train.metrics import score_masks
from fedfms_secure.train.losses import dice_bce_loss, per_image_dice_bce, segmentation_loss

from mask_oracle import MaskOracle


def test_dice_per_image_values() -> None:
    """Two empty masks are not scored (NaN), as the README documents, not a perfect 1.0."""
    a = torch.zeros(3, 1, 4, 4)
    b = torch.zeros(3, 1, 4, 4)
    a[0, 0, :2] = 1  # 8 pixels
    b[0, 0, :1] = 1  # 4 pixels, all inside a
    a[1, 0, 0, 0] = 1  # disjoint from b[1]
    b[1, 0, 3, 3] = 1
    # item 2: both empty
    dice = score_masks(a, b).dice[:, 0]
    assert dice[:2].tolist() == pytest.approx([8 / 12, 0.0]) and math.isnan(dice[2])


def test_evaluate_dice_and_hd95_against_an_oracle(ellipses) -> None:
    data = ellipses(5)
    labels = data.tensors[1]
    assert evaluate_dice(MaskOracle(labels), data, batch_size=2) == 1.0
    assert evaluate_hd95(MaskOracle(labels), data, batch_size=2) == 0.0
    shifted = torch.roll(labels, shifts=3, dims=-1)
    dice = evaluate_dice(MaskOracle(shifted), data, batch_size=2)
    assert 0.5 < dice < 1.0
    assert math.isclose(evaluate_hd95(MaskOracle(shifted), data, batch_size=2), 3.0, abs_tol=0.5)


def test_empty_labels_do_not_reward_predicting_nothing(ellipses) -> None:
    data = ellipses(4)
    images, labels = data.tensors
    labels = labels.clone()
    labels[:2] = 0  # two slices without foreground
    mixed = torch.utils.data.TensorDataset(images, labels)
    assert evaluate_dice(MaskOracle(torch.zeros_like(labels)), mixed, batch_size=2) == 0.0
    assert evaluate_dice(MaskOracle(labels), mixed, batch_size=2) == 1.0
    assert math.isnan(evaluate_dice(MaskOracle(labels[:2]), torch.utils.data.TensorDataset(images[:2], labels[:2])))


def test_predicting_nothing_scores_the_diagonal_in_hd95(ellipses) -> None:
    data = ellipses(3)
    labels = data.tensors[1]
    diagonal = math.hypot(*labels.shape[-2:])
    assert evaluate_hd95(MaskOracle(torch.zeros_like(labels)), data, batch_size=2) == pytest.approx(diagonal)
    half = labels.clone()
    half[:1] = 0  # the first image predicted empty, the others perfect
    assert evaluate_hd95(MaskOracle(half), data, batch_size=2) == pytest.approx(diagonal / 3)


def test_an_empty_dataset_scores_nan_without_running_the_model() -> None:
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 8, 8))
    oracle = MaskOracle(torch.zeros(0, 1, 8, 8))
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


class _MultiOracle(MaskOracle):
    num_classes = 2


def test_dice_per_class_and_its_mean(ellipses) -> None:
    from fedfms_secure.train import evaluate_dice_per_class

    images, labels = ellipses(4).tensors
    inner = labels.clone()
    inner[..., 32:] = 0
    inner[:2] = 0  # class 2 absent from the first two images
    targets = torch.cat([labels, inner], dim=1)
    data = torch.utils.data.TensorDataset(images, targets)
    pred = targets.clone()
    pred[:, 1] = 0  # class 1 perfect, class 2 never predicted
    assert evaluate_dice_per_class(_MultiOracle(pred), data, batch_size=3) == [1.0, 0.0]
    assert evaluate_dice(_MultiOracle(pred), data, batch_size=3) == 0.5
    # a label map of class indices (0 background, 1, 2) gives the same targets when disjoint
    index = labels.clone()
    index[..., :32] *= 2  # left half of each ellipse is class 2, right half class 1
    as_map = torch.utils.data.TensorDataset(images, index)
    expected = torch.cat([(index == 1).float(), (index == 2).float()], dim=1)
    assert evaluate_dice_per_class(_MultiOracle(expected), as_map) == [1.0, 1.0]


def test_multi_class_loss_is_the_mean_over_classes_plus_the_iou_term() -> None:
    from fedfms_secure.train.losses import IOU_LOSS_WEIGHT, mask_iou

    logits = torch.randn(3, 2, 8, 8)
    targets = (torch.rand(3, 2, 8, 8) > 0.5).float()
    per = per_image_dice_bce(logits, targets)
    torch.testing.assert_close(
        per, (per_image_dice_bce(logits[:, :1], targets[:, :1])
              + per_image_dice_bce(logits[:, 1:], targets[:, 1:])) / 2)  # fmt: skip
    iou = mask_iou(logits, targets)
    assert iou.shape == (3, 2) and 0 <= float(iou.min()) <= float(iou.max()) <= 1
    assert mask_iou(targets * 20 - 10, targets).eq(1).all()
    assert mask_iou(-torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)).item() == 1.0
    predicted = torch.full((3, 2), 0.5, requires_grad=True)
    loss = segmentation_loss(logits, predicted, targets)
    expected = (per + IOU_LOSS_WEIGHT * (0.5 - iou).pow(2).mean(dim=1)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert predicted.grad.abs().sum() > 0
