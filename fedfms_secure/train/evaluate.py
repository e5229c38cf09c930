"""Evaluation of a segmenter: Dice (and HD95 through MONAI) over a dataset of 2-D slices."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fedfms_secure.model.prompts import boxes_from_labels, label_targets


def dice_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """Hard Dice of binary masks ``[B, 1, S, S]`` -> ``[B]``; two empty masks score 1.0."""
    pred = pred.flatten(1).float()
    target = target.flatten(1).float()
    inter = (pred * target).sum(dim=1)
    total = pred.sum(dim=1) + target.sum(dim=1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-8), torch.ones_like(total))


@torch.no_grad()
def predict_masks(
    model: nn.Module, dataset: Dataset, batch_size: int = 16
) -> tuple[Tensor, Tensor]:
    """Binary predictions (sigmoid > 0.5) and per-class targets, both ``[N, K, S, S]``.

    A model built with ``prompt="box"`` gets each class's box from the label (no jitter), as
    box-prompted SAM is evaluated.
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


def _class_dice(pred: Tensor, target: Tensor) -> float:
    has_foreground = target.flatten(1).any(dim=1)
    if not bool(has_foreground.any()):
        return float("nan")
    return float(dice_per_image(pred[has_foreground], target[has_foreground]).mean())


def evaluate_dice_per_class(model: nn.Module, dataset: Dataset, batch_size: int = 16) -> list[float]:
    """For each class, the mean Dice over the images whose label has that class (NaN if none)."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        return [float("nan")] * getattr(model, "num_classes", 1)
    pred, target = predict_masks(model, dataset, batch_size)
    return [_class_dice(pred[:, k], target[:, k]) for k in range(pred.shape[1])]


def evaluate_dice(model: nn.Module, dataset: Dataset, batch_size: int = 16) -> float:
    """Mean Dice over the images of ``dataset`` whose label has foreground (threshold 0.5 on the
    sigmoid); NaN if there is none. With several classes: the mean over classes of
    :func:`evaluate_dice_per_class` (classes absent from the dataset left out).

    Images with an empty label are left out, as MONAI's ``DiceMetric(ignore_empty=True)`` does:
    counting them would let a model that predicts nothing score the fraction of empty slices.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        return float("nan")
    scores = [d for d in evaluate_dice_per_class(model, dataset, batch_size) if not math.isnan(d)]
    return float(sum(scores) / len(scores)) if scores else float("nan")


def evaluate_hd95(model: nn.Module, dataset: Dataset, batch_size: int = 16) -> float:
    """Mean 95th-percentile Hausdorff distance in pixels (MONAI) over images (and classes) where
    both the prediction and the label are non-empty; NaN if there is no such image."""
    from monai.metrics import compute_hausdorff_distance

    if len(dataset) == 0:  # type: ignore[arg-type]
        return float("nan")
    pred, target = predict_masks(model, dataset, batch_size)
    pred, target = pred.flatten(0, 1).unsqueeze(1), target.flatten(0, 1).unsqueeze(1)
    keep = (pred.flatten(1).any(dim=1)) & (target.flatten(1).any(dim=1))
    if not bool(keep.any()):
        return float("nan")
    hd = compute_hausdorff_distance(pred[keep].float(), target[keep].float(), percentile=95)
    values = hd.flatten().cpu().numpy()
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


__all__ = ["dice_per_image", "evaluate_dice", "evaluate_dice_per_class", "evaluate_hd95",
           "predict_masks"]  # fmt: skip
