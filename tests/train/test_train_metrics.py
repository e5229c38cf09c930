"""Dice, IoU and HD95 through MONAI against values computed by hand on tiny masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedfms_secure.train.metrics import ImageScores, evaluate_segmentation, score_masks, summarize

from mask_oracle import MaskOracle

DIAGONAL = math.hypot(8, 8)


def _masks(k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.zeros(3, k, 8, 8, dtype=torch.bool)
    target = torch.zeros(3, k, 8, 8, dtype=torch.bool)
    pred[0, 0, 2:4, 2:4] = True  # 4 pixels, all inside the label
    target[0, 0, 2:4, 2:5] = True  # 6 pixels: one more column, 1 pixel away
    target[1, 0, 1:3, 1:3] = True  # missed entirely: nothing predicted
    pred[2, 0, 5:7, 5:7] = True  # a false positive on an image without the class
    return pred, target


@pytest.mark.parametrize(
    ("has_pred", "has_label", "expected"),
    [
        (False, False, (math.nan, math.nan, math.nan)),  # nothing to find, nothing found: not scored
        (False, True, (0.0, 0.0, DIAGONAL)),  # missed: Dice 0, HD95 the image diagonal
        (True, False, (math.nan, math.nan, math.nan)),  # the label lacks the class: not scored
    ],
)
def test_the_empty_mask_convention(has_pred: bool, has_label: bool, expected: tuple[float, float, float]) -> None:
    pred = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    target = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    pred[0, 0, 2:5, 2:5] = has_pred
    target[0, 0, 3:6, 3:6] = has_label
    scores = score_masks(pred, target)
    got = (float(scores.dice[0, 0]), float(scores.iou[0, 0]), float(scores.hd95[0, 0]))
    for value, want in zip(got, expected):
        assert math.isnan(value) if math.isnan(want) else value == pytest.approx(want)


def test_per_image_scores_by_hand() -> None:
    scores = score_masks(*_masks())
    np.testing.assert_allclose(scores.dice[:, 0], [2 * 4 / (4 + 6), 0.0, np.nan], rtol=1e-6)
    np.testing.assert_allclose(scores.iou[:, 0], [4 / 6, 0.0, np.nan], rtol=1e-6)
    # HD95: the label's extra column lies 1 px from the prediction; an empty prediction scores
    # the image diagonal; an image without the class is not scored
    np.testing.assert_allclose(scores.hd95[:, 0], [1.0, DIAGONAL, np.nan], rtol=1e-6)


def test_shifted_square_by_hand() -> None:
    target = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    target[0, 0, 0:4, 0:4] = True
    pred = torch.roll(target, shifts=3, dims=-1)  # columns 3..6: one column overlaps
    scores = score_masks(pred, target)
    assert scores.dice[0, 0] == pytest.approx(2 * 4 / 32)
    assert scores.iou[0, 0] == pytest.approx(4 / 28)
    assert scores.hd95[0, 0] == pytest.approx(3.0)


def test_summary_means_and_stds_over_images_and_per_class() -> None:
    pred, target = _masks(k=2)
    target[0, 1, 5:7, 0:2] = True  # class 2 only on image 0, found exactly
    pred[0, 1, 5:7, 0:2] = True
    summary = summarize(score_masks(pred, target), ["organ", "lesion"])
    # image scores: mean over the classes each image is scored for -> [0.9, 0.0]
    assert summary["dice_mean"] == pytest.approx(0.45) and summary["dice_std"] == pytest.approx(0.45)
    iou0 = (4 / 6 + 1.0) / 2
    assert summary["iou_mean"] == pytest.approx(iou0 / 2) and summary["iou_std"] == pytest.approx(iou0 / 2)
    hd0, hd1 = (1.0 + 0.0) / 2, DIAGONAL
    assert summary["hd95_mean"] == pytest.approx((hd0 + hd1) / 2)
    assert summary["hd95_std"] == pytest.approx(abs(hd1 - hd0) / 2)
    organ, lesion = summary["per_class"]
    assert organ["name"] == "organ" and organ["dice_mean"] == pytest.approx(0.4) and organ["dice_std"] == pytest.approx(0.4)
    assert lesion == {"name": "lesion", "dice_mean": 1.0, "dice_std": 0.0, "iou_mean": 1.0, "iou_std": 0.0,
                      "hd95_mean": 0.0, "hd95_std": 0.0}


def test_random_masks_match_the_formulas() -> None:
    gen = torch.Generator().manual_seed(3)
    pred = torch.rand(5, 2, 12, 12, generator=gen) > 0.6
    target = torch.rand(5, 2, 12, 12, generator=gen) > 0.5
    scores = score_masks(pred, target)
    inter = (pred & target).flatten(2).sum(2).double().numpy()
    sizes = pred.flatten(2).sum(2).double().numpy() + target.flatten(2).sum(2).double().numpy()
    np.testing.assert_allclose(scores.dice, 2 * inter / sizes, rtol=1e-6)
    np.testing.assert_allclose(scores.iou, inter / (sizes - inter), rtol=1e-6)


def test_nothing_scored_is_nan_and_pooling_concatenates() -> None:
    empty = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    summary = summarize(score_masks(empty, empty))
    assert all(math.isnan(summary[k]) for k in ("dice_mean", "dice_std", "iou_mean", "hd95_mean"))
    a, b = score_masks(*_masks()), score_masks(empty, empty)
    pooled = ImageScores.concat([a, b], 1)
    assert pooled.num_images == 5
    assert summarize(pooled)["dice_mean"] == pytest.approx(summarize(a)["dice_mean"])


def test_evaluate_a_model_on_a_dataset(ellipses) -> None:
    data = ellipses(4)
    labels = data.tensors[1]
    perfect = evaluate_segmentation(MaskOracle(labels), data, ["ellipse"], batch_size=3)
    assert (perfect["dice_mean"], perfect["iou_mean"], perfect["hd95_mean"]) == (1.0, 1.0, 0.0)
    assert perfect["per_class"][0]["name"] == "ellipse"
    shifted = evaluate_segmentation(MaskOracle(torch.roll(labels, shifts=3, dims=-1)), data, batch_size=3)
    assert 0.5 < shifted["dice_mean"] < 1.0 and shifted["hd95_mean"] == pytest.approx(3.0, abs=0.5)
