"""Local training and evaluation, shared by sites and the centralized baseline."""

from __future__ import annotations

from fedfms_secure.train.evaluate import evaluate_dice, evaluate_dice_per_class, evaluate_hd95
from fedfms_secure.train.local import TrainConfig, TrainResult, steps_per_epoch, train_local
from fedfms_secure.train.losses import dice_bce_loss, segmentation_loss
from fedfms_secure.train.metrics import evaluate_segmentation, score_masks, summarize

__all__ = [
    "TrainConfig",
    "TrainResult",
    "dice_bce_loss",
    "segmentation_loss",
    "evaluate_dice",
    "evaluate_dice_per_class",
    "evaluate_hd95",
    "evaluate_segmentation",
    "score_masks",
    "summarize",
    "steps_per_epoch",
    "train_local",
]
