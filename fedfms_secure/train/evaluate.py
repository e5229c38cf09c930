"""One number per model and dataset, for quick checks (training tests, benchmarks): mean Dice, per
class Dice and mean HD95.

They are summaries of :func:`fedfms_secure.train.metrics.score_model`, so they follow its rules
(an image is scored for a class only when its label holds that class; an empty prediction there
scores Dice 0 and HD95 the image diagonal). Where a site or a baseline reports metrics it uses
:func:`~fedfms_secure.train.metrics.evaluate_segmentation`, which adds IoU, standard deviations and
per-class entries.
"""

from __future__ import annotations

import math

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from fedfms_secure.train.metrics import predict_masks, score_model


def _per_class_means(values: np.ndarray) -> list[float]:
    """Mean over the scored images of each column of ``[N, K]`` (NaN for a column scored nowhere)."""
    out = []
    for column in values.T:
        scored = column[~np.isnan(column)]
        out.append(float(scored.mean()) if scored.size else float("nan"))
    return out


def _mean_of_scored(values: list[float]) -> float:
    scored = [v for v in values if not math.isnan(v)]
    return float(sum(scored) / len(scored)) if scored else float("nan")


def evaluate_dice_per_class(model: nn.Module, dataset: Dataset, batch_size: int = 16) -> list[float]:
    """For each class, the mean Dice over the images whose label has that class (NaN if none)."""
    return _per_class_means(score_model(model, dataset, batch_size).dice)


def evaluate_dice(model: nn.Module, dataset: Dataset, batch_size: int = 16) -> float:
    """Mean Dice (threshold 0.5 on the sigmoid): the mean over classes of
    :func:`evaluate_dice_per_class`, classes absent from the dataset left out; NaN if no image has
    foreground.

    Images with an empty label are left out, as MONAI's ``DiceMetric(ignore_empty=True)`` does:
    counting them would let a model that predicts nothing score the fraction of empty slices.
    """
    return _mean_of_scored(evaluate_dice_per_class(model, dataset, batch_size))


def evaluate_hd95(model: nn.Module, dataset: Dataset, batch_size: int = 16) -> float:
    """Mean 95th-percentile Hausdorff distance in pixels (MONAI): per class over the images whose
    label has that class, an empty prediction there scoring the image diagonal; then the mean over
    the classes present. NaN if no image has foreground."""
    return _mean_of_scored(_per_class_means(score_model(model, dataset, batch_size).hd95))


__all__ = ["evaluate_dice", "evaluate_dice_per_class", "evaluate_hd95", "predict_masks"]
