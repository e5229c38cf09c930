"""Segmentation metrics through MONAI: Dice, IoU and HD95 per image and per class, and their
mean and standard deviation over the images of a dataset (as FedFMS reports them).

An *image* is one 2-D slice as the model sees it (``image_size`` squared). For each image and
class:

* Dice (``DiceMetric``) and IoU (``MeanIoU``) of the hard mask (sigmoid > 0.5) against the label;
  an image whose label lacks the class is not scored for it (``ignore_empty=True``): counting it
  would let a model that predicts nothing score the share of empty slices;
* HD95 (``HausdorffDistanceMetric(percentile=95)``) in pixels of the model's input, scored on the
  same images; where the prediction is empty but the label is not, MONAI has no distance and the
  image scores the image diagonal (the largest possible), so predicting nothing is never rewarded.

An image's score is the mean over the classes it is scored for; a site's ``*_mean`` and ``*_std``
are the mean and (population) standard deviation of the image scores, NaN when no image is scored.
``per_class`` gives the same per class. Sites send only these aggregates to the server, never how
many images they came from.

So, per image and class (the convention the README documents, in one place):

=================  ===================  ==========  ==========  ===============
prediction         label                Dice        IoU         HD95
=================  ===================  ==========  ==========  ===============
empty              empty                not scored  not scored  not scored
empty              holds the class      0           0           image diagonal
holds the class    empty                not scored  not scored  not scored
=================  ===================  ==========  ==========  ===============

This is the project's one implementation of these rules: evaluation (:mod:`.evaluate`), the
baselines, the run report and the benchmarks all score through it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fedfms_secure.model.prompts import boxes_from_labels, label_targets

METRICS = ("dice", "iou", "hd95")


@dataclass
class ImageScores:
    """Per image and class scores ``[N, K]`` (NaN where an image is not scored for a class)."""

    dice: np.ndarray
    iou: np.ndarray
    hd95: np.ndarray

    @property
    def num_images(self) -> int:
        """How many images were scored (rows)."""
        return int(self.dice.shape[0])

    @staticmethod
    def concat(parts: Sequence[ImageScores], num_classes: int) -> ImageScores:
        """The scores of several datasets as one (for pooled means over sites)."""
        if not parts:
            empty = np.zeros((0, num_classes))
            return ImageScores(empty, empty.copy(), empty.copy())
        return ImageScores(*(np.concatenate([getattr(p, m) for p in parts]) for m in METRICS))


def score_masks(pred: Tensor, target: Tensor) -> ImageScores:
    """Dice, IoU and HD95 of binary masks ``[N, K, S, S]`` (prediction, label) per image and class."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"pred and target must both be [N, K, S, S], got {tuple(pred.shape)} and {tuple(target.shape)}")
    n, k = pred.shape[:2]
    if n == 0:
        empty = np.zeros((0, k))
        return ImageScores(empty, empty.copy(), empty.copy())
    pred, target = pred.float(), target.float()
    with warnings.catch_warnings():  # MONAI warns for every empty mask: that case is handled below
        warnings.simplefilter("ignore")
        dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(pred, target)
        iou = MeanIoU(include_background=True, reduction="none", ignore_empty=True)(pred, target)
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(pred, target)
    has_label = target.flatten(2).any(dim=2)
    has_pred = pred.flatten(2).any(dim=2)
    diagonal = math.hypot(*pred.shape[-2:])
    hd = torch.where(has_label & ~has_pred, torch.full_like(hd, diagonal), hd)
    hd = torch.where(has_label, hd, torch.full_like(hd, float("nan")))
    return ImageScores(*(np.asarray(t.detach().cpu().double().numpy()).reshape(n, k) for t in (dice, iou, hd)))


def summarize(scores: ImageScores, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """``{dice_mean, dice_std, iou_mean, iou_std, hd95_mean, hd95_std, per_class: [...]}``.

    Image scores are the mean over the classes each image is scored for; ``per_class`` holds, for
    each class, ``{"name", dice_mean, dice_std, iou_mean, iou_std, hd95_mean, hd95_std}``.
    """
    k = scores.dice.shape[1]
    names = list(class_names) if class_names is not None else [f"class {i + 1}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    out: dict[str, Any] = {}
    for metric in METRICS:
        values = getattr(scores, metric)
        out.update(_mean_std(metric, _row_means(values)))
    out["per_class"] = []
    for index, name in enumerate(names):
        entry: dict[str, Any] = {"name": name}
        for metric in METRICS:
            entry.update(_mean_std(metric, getattr(scores, metric)[:, index]))
        out["per_class"].append(entry)
    return out


@torch.no_grad()
def predict_masks(model: nn.Module, dataset: Dataset, batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """Binary predictions (sigmoid > 0.5) and per-class targets, both ``[N, K, S, S]``.

    A model built with ``prompt="box"`` gets each class's box from the label (no jitter), as
    box-prompted SAM is evaluated. The model's training mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    num_classes = getattr(model, "num_classes", 1)
    boxed = getattr(model, "prompt", "none") == "box"
    preds, labels = [], []
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        for images, masks in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            targets = label_targets(masks, num_classes)
            images = images.to(device)
            if boxed:
                logits = model(images, boxes_from_labels(targets).to(device))
            else:
                logits = model(images)
            preds.append((torch.sigmoid(logits) > 0.5).cpu())
            labels.append(targets > 0.5)
    finally:
        model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


def score_model(model: nn.Module, dataset: Dataset, batch_size: int = 16) -> ImageScores:
    """Per image and class scores of ``model`` on ``dataset`` (see :func:`score_masks`)."""
    k = getattr(model, "num_classes", 1)
    if len(dataset) == 0:  # type: ignore[arg-type]
        empty = np.zeros((0, k))
        return ImageScores(empty, empty.copy(), empty.copy())
    pred, target = predict_masks(model, dataset, batch_size)
    return score_masks(pred, target)


def evaluate_segmentation(
    model: nn.Module, dataset: Dataset, class_names: Sequence[str] | None = None, batch_size: int = 16
) -> dict[str, Any]:
    """:func:`summarize` of :func:`score_model`: the metrics a site reports."""
    return summarize(score_model(model, dataset, batch_size), class_names)


def _row_means(values: np.ndarray) -> np.ndarray:
    """Mean over the scored classes of each image (NaN for an image scored for none)."""
    if values.size == 0:
        return np.zeros(0)
    scored = ~np.isnan(values)
    counts = scored.sum(axis=1)
    sums = np.where(scored, values, 0.0).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _mean_std(metric: str, values: np.ndarray) -> dict[str, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {f"{metric}_mean": float("nan"), f"{metric}_std": float("nan")}
    return {f"{metric}_mean": float(values.mean()), f"{metric}_std": float(values.std())}


__all__ = ["ImageScores", "METRICS", "evaluate_segmentation", "predict_masks", "score_masks", "score_model",
           "summarize"]  # fmt: skip
