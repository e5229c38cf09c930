"""Local training and evaluation, shared by sites, the baselines and the benchmarks.

What the room holds (one concept per module):

* ``local``: one site's local training step (:func:`train_local`: Adam, Dice + BCE + IoU-head
  loss, DP-SGD through :mod:`fedfms_secure.privacy` when a site's privacy state is given);
* ``losses``: the segmentation losses;
* ``metrics``: the one implementation of Dice, IoU and HD95 (MONAI) and of the empty-mask
  convention, per image and class, and their per-site summaries; evaluation, baselines, the
  run report and the benchmarks all score through it;
* ``evaluate``: one-number summaries of ``metrics`` (mean Dice, per class Dice, mean HD95);
* ``baselines``: centralized training and each site alone (:func:`~.baselines.train_central`,
  :func:`~.baselines.run_local_baselines`), with the federated run's own training code;
* ``model_file``: the model files a run leaves (final global model, baseline models).

What it may import: ``fedfms_secure.model`` (builders, prompts, modes, vectors),
``fedfms_secure.privacy`` (the DP-SGD engine and a site's budget state), ``fedfms_secure.data``
(site loading, for the baselines), ``config``, ``errors`` and ``atomic``, plus torch, numpy and
MONAI. Never the transport, the server, the site daemon, ``he`` or ``keys``: training knows
nothing of how updates travel or are encrypted.
"""

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
