"""Segmentation losses, reduced as a mean of independent per-image terms (as DP-SGD requires)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SMOOTH = 1.0


def per_image_dice_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Soft Dice loss + BCE-with-logits for each image: ``[B, 1, S, S]`` -> ``[B]``."""
    probs = torch.sigmoid(logits).flatten(1)
    target = labels.flatten(1)
    inter = (probs * target).sum(dim=1)
    dice = (2 * inter + SMOOTH) / (probs.sum(dim=1) + target.sum(dim=1) + SMOOTH)
    bce = F.binary_cross_entropy_with_logits(logits.flatten(1), target, reduction="none")
    return (1.0 - dice) + bce.mean(dim=1)


def dice_bce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over the batch of :func:`per_image_dice_bce` (no term mixes two images)."""
    return per_image_dice_bce(logits, labels).mean()


__all__ = ["dice_bce_loss", "per_image_dice_bce"]
