"""Evaluation of a segmenter: Dice (and HD95 through MONAI) over a dataset of 2-D slices."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


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
    """Binary predictions (sigmoid > 0.5) and labels for every item of ``dataset``."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        for images, masks in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            preds.append((torch.sigmoid(model(images.to(device))) > 0.5).cpu())
            labels.append(masks > 0.5)
    finally:
        model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


def evaluate_dice(model: nn.Module, dataset: Dataset, batch_size: int = 16) -> float:
    """Mean Dice over the images of ``dataset`` whose label has foreground (threshold 0.5 on the
    sigmoid); NaN if there is none.

    Images with an empty label are left out, as MONAI's ``DiceMetric(ignore_empty=True)`` does:
    counting them would let a model that predicts nothing score the fraction of empty slices.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        return float("nan")
    pred, target = predict_masks(model, dataset, batch_size)
    has_foreground = target.flatten(1).any(dim=1)
    if not bool(has_foreground.any()):
        return float("nan")
    return float(dice_per_image(pred[has_foreground], target[has_foreground]).mean())


def evaluate_hd95(model: nn.Module, dataset: Dataset, batch_size: int = 16) -> float:
    """Mean 95th-percentile Hausdorff distance in pixels (MONAI) over images where both the
    prediction and the label are non-empty; NaN if there is no such image (or no image at all)."""
    from monai.metrics import compute_hausdorff_distance

    if len(dataset) == 0:  # type: ignore[arg-type]
        return float("nan")
    pred, target = predict_masks(model, dataset, batch_size)
    keep = (pred.flatten(1).any(dim=1)) & (target.flatten(1).any(dim=1))
    if not bool(keep.any()):
        return float("nan")
    hd = compute_hausdorff_distance(pred[keep].float(), target[keep].float(), percentile=95)
    values = hd.flatten().cpu().numpy()
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


__all__ = ["dice_per_image", "evaluate_dice", "evaluate_hd95", "predict_masks"]
