"""Segmentation losses, reduced as a mean of independent per-image terms (as DP-SGD requires).

For ``K`` classes every term is the mean over the classes of a per-class term, so each class
counts equally whatever its size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SMOOTH = 1.0
# The IoU head (SAM's mask-quality score) trains on the detached decoder output, so this weight
# only sets its share of the per-sample gradient norm that DP-SGD clips, not the mask features.
IOU_LOSS_WEIGHT = 0.1


def per_image_dice_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Soft Dice loss + BCE-with-logits per image, averaged over classes: ``[B, K, S, S]`` -> ``[B]``."""
    probs = torch.sigmoid(logits).flatten(2)
    target = labels.flatten(2)
    inter = (probs * target).sum(dim=2)
    dice = (2 * inter + SMOOTH) / (probs.sum(dim=2) + target.sum(dim=2) + SMOOTH)
    bce = F.binary_cross_entropy_with_logits(logits.flatten(2), target, reduction="none")
    return ((1.0 - dice) + bce.mean(dim=2)).mean(dim=1)


def dice_bce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over the batch of :func:`per_image_dice_bce` (no term mixes two images)."""
    return per_image_dice_bce(logits, labels).mean()


@torch.no_grad()
def mask_iou(logits: Tensor, targets: Tensor) -> Tensor:
    """IoU of the hard masks ``logits > 0`` with ``targets`` per image and class -> ``[B, K]``
    (1.0 where both are empty). No gradient: it is the IoU head's regression target."""
    pred = (logits > 0).flatten(2)
    target = targets.flatten(2) > 0.5
    inter = (pred & target).sum(dim=2).float()
    union = (pred | target).sum(dim=2).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def per_image_segmentation_loss(logits: Tensor, iou_pred: Tensor, targets: Tensor) -> Tensor:
    """Dice + BCE per image plus ``IOU_LOSS_WEIGHT`` x the squared error of SAM's predicted IoU
    (SAM trains its IoU head with this MSE), averaged over classes: -> ``[B]``."""
    iou_mse = (iou_pred - mask_iou(logits, targets)).pow(2).mean(dim=1)
    return per_image_dice_bce(logits, targets) + IOU_LOSS_WEIGHT * iou_mse


def segmentation_loss(logits: Tensor, iou_pred: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of :func:`per_image_segmentation_loss`: the training loss."""
    return per_image_segmentation_loss(logits, iou_pred, targets).mean()


__all__ = ["IOU_LOSS_WEIGHT", "dice_bce_loss", "mask_iou", "per_image_dice_bce",
           "per_image_segmentation_loss", "segmentation_loss"]  # fmt: skip
