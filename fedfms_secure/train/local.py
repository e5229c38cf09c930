"""Local training of a site: plain Adam, or DP-SGD (Opacus) bound to the site's accountant.

The optimizer is Adam over the parameters that ``apply_mode`` left trainable, created fresh on
every call (as usual in FedAvg: local optimizer state does not survive a round), unless the caller
hands back the ``optimizer_state`` a previous call returned. The loss is
Dice + BCE on logits per class plus SAM's IoU-head MSE, a mean of per-image terms
(:func:`~fedfms_secure.train.losses.segmentation_loss`). A model built with ``prompt="box"`` gets
each class's box from the label, jittered as SAM's training does (``TrainConfig.box_jitter``).

Under DP the records are the privacy unit's (``privacy.config.unit``): at patient level (the
default) each Poisson step samples patients, and a sampled patient contributes one randomly drawn
slice, i.e. one clipped gradient (:class:`~fedfms_secure.privacy.units.PatientDataset`). The
batch size is then the expected number of patients per step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fedfms_secure.errors import ConfigError
from fedfms_secure.model.prompts import DEFAULT_BOX_JITTER, boxes_from_labels, label_targets
from fedfms_secure.model.segmenter import SamSegmenter
from fedfms_secure.privacy.engine import CLIPPING_MODES, check_trainable, make_private_trainer
from fedfms_secure.privacy.site import SitePrivacy
from fedfms_secure.privacy.units import record_dataset
from fedfms_secure.train.losses import per_image_segmentation_loss


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings of one round.

    ``batch_size``: slices per step without DP; under DP the *expected* number of records (patients
    at patient level) per Poisson step.
    """

    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    max_physical_batch: int = 16
    box_jitter: float = DEFAULT_BOX_JITTER  # only for models built with prompt="box"
    clipping: str = "standard"  # DP-SGD: "standard" per-sample gradients or Opacus' "ghost" clipping
    # patient-level DP-SGD: slices of a sampled patient whose gradients are averaged before clipping
    # (one clipped gradient per patient either way); no effect without DP or at slice level
    slices_per_patient: int = 1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_physical_batch", "slices_per_patient"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.clipping not in CLIPPING_MODES:
            raise ConfigError(f"TrainConfig.clipping must be one of {', '.join(CLIPPING_MODES)}, got "
                              f"{self.clipping!r}")
        if self.slices_per_patient > 1 and self.clipping == "ghost":
            raise ConfigError("TrainConfig.slices_per_patient > 1 needs clipping 'standard' (per-sample "
                              "gradients are averaged per patient before clipping)")
        if not 0 <= self.box_jitter <= 1:
            raise ConfigError(f"TrainConfig.box_jitter must be in [0, 1], got {self.box_jitter}")


@dataclass
class TrainResult:
    """What one call of :func:`train_local` did.

    ``num_samples`` counts the records trained on (patients under patient-level DP, else slices;
    it is the site's FedAvg weight); ``loss`` is the mean training loss over the steps of its last
    epoch (NaN if DP's Poisson sampling drew only empty batches in that epoch); ``epsilon`` is the
    site's total spent budget after it (None without DP), per ``unit`` (None without DP).
    """

    num_samples: int
    steps: int
    loss: float
    epsilon: float | None
    seconds: float
    unit: str | None = None
    optimizer_state: dict | None = None  # Adam's state_dict after training, to resume from


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: ``ceil(num_samples / batch_size)`` (at least 1).

    For DP planning ``num_samples`` is the number of records n (patients at patient level):
    ``sample_rate = batch_size / n`` and
    ``planned_steps = rounds * epochs * steps_per_epoch(n, batch_size)``.
    """
    if num_samples < 1 or batch_size < 1:
        raise ConfigError(
            f"need num_samples >= 1 and batch_size >= 1, got {num_samples} and {batch_size}"
        )
    return max(1, math.ceil(num_samples / batch_size))


def train_local(
    model: SamSegmenter,
    dataset: Dataset,
    config: TrainConfig,
    privacy: SitePrivacy | None = None,
    optimizer_state: dict | None = None,
) -> TrainResult:
    """Train the parameters with ``requires_grad`` on ``dataset``; DP-SGD if ``privacy`` is given.

    With ``privacy`` the run takes ``epochs * steps_per_epoch`` Poisson-sampled steps over the
    records of the site's privacy unit (patients by default) at its sample rate and noise, raises
    :class:`PrivacyBudgetExhausted` *before* training if that would pass the target epsilon
    (checked by :func:`make_private_trainer`), and persists the accountant afterwards. The site's
    sample rate must be ``config.batch_size / records``, the rate its noise was planned for, else
    :class:`ConfigError`. The model is a plain ``SamSegmenter`` again on return.
    ``optimizer_state`` (a previous result's) resumes Adam's moments instead of starting them at
    zero.
    """
    params = check_trainable(model, dataset)
    # slices of a sampled patient in one DP record (patient level only)
    per_patient = config.slices_per_patient if privacy is not None and privacy.config.unit == "patient" else 1
    if privacy is not None:
        dataset = record_dataset(dataset, privacy.config.unit, per_patient)
        _check_sample_rate(privacy, config, len(dataset))  # type: ignore[arg-type]
    num_samples = len(dataset)  # type: ignore[arg-type]
    per_epoch = steps_per_epoch(num_samples, config.batch_size)
    steps = config.epochs * per_epoch
    optimizer = torch.optim.Adam(params, lr=config.lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        if privacy is None:
            epoch_losses = _train_plain(model, dataset, config, optimizer)
        else:
            epoch_losses = _train_private(model, dataset, config, optimizer, privacy, per_epoch, per_patient)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    last = [v for v in epoch_losses[-1] if not math.isnan(v)] if epoch_losses else []
    return TrainResult(
        num_samples=num_samples,
        steps=steps,
        loss=float(sum(last) / len(last)) if last else float("nan"),
        epsilon=None if privacy is None else privacy.epsilon(),
        seconds=seconds,
        unit=None if privacy is None else privacy.config.unit,
        optimizer_state=optimizer.state_dict(),
    )


def _check_sample_rate(privacy: SitePrivacy, config: TrainConfig, records: int) -> None:
    rate = config.batch_size / records
    unit = privacy.config.unit
    if not math.isclose(rate, privacy.sample_rate, rel_tol=1e-6):
        raise ConfigError(
            f"batch_size / training {unit}s = {config.batch_size} / {records} = {rate:.6g}, "
            f"but the site's privacy state ({privacy.state_dir}) has sample_rate="
            f"{privacy.sample_rate:.6g}: sample_rate was planned from expected {unit}s per step / "
            f"training {unit}s, and the noise is only valid at that rate. Train with the batch size "
            "and dataset the privacy state was opened for"
        )


def _device_of(model: SamSegmenter) -> torch.device:
    return next(model.parameters()).device


def batch_loss(
    module: torch.nn.Module,
    model: SamSegmenter,
    images: Tensor,
    labels: Tensor,
    *,
    box_jitter: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The training loss of one batch. ``module`` is ``model`` or its Opacus wrapper."""
    return per_image_loss(module, model, images, labels, box_jitter=box_jitter, generator=generator).mean()


def per_image_loss(
    module: torch.nn.Module,
    model: SamSegmenter,
    images: Tensor,
    labels: Tensor,
    *,
    box_jitter: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The training loss of each image of a batch (its mean is :func:`batch_loss`)."""
    targets = label_targets(labels, model.num_classes)
    boxes = None
    if model.prompt == "box":
        boxes = boxes_from_labels(targets, jitter=box_jitter, generator=generator)
    logits, iou = module(images, boxes, with_iou=True)
    return per_image_segmentation_loss(logits, iou, targets)


def _physical_chunks(images: Tensor, labels: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return list(zip(images.split(size), labels.split(size), strict=True))


def _train_plain(
    model: SamSegmenter, dataset: Dataset, config: TrainConfig, optimizer: torch.optim.Optimizer
) -> list[list[float]]:
    """Losses of every step, grouped by epoch."""
    gen = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=gen)
    epoch_losses: list[list[float]] = []
    device = _device_of(model)
    jitter_gen = torch.Generator().manual_seed(config.seed + 1)
    for _ in range(config.epochs):
        losses: list[float] = []
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for x, y in _physical_chunks(images, labels, config.max_physical_batch):
                loss = batch_loss(model, model, x, y, box_jitter=config.box_jitter,
                                  generator=jitter_gen) * (len(x) / len(images))  # fmt: skip
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            losses.append(total)
        epoch_losses.append(losses)
    return epoch_losses


def _train_private(
    model: SamSegmenter,
    dataset: Dataset,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    privacy: SitePrivacy,
    per_epoch: int,
    per_patient: int = 1,
) -> list[list[float]]:
    """Losses of every logical step (NaN for an empty Poisson batch), grouped by epoch. Each item of
    ``dataset`` stacks ``per_patient`` slices of one patient when that is above 1."""
    epoch_losses: list[list[float]] = [[] for _ in range(config.epochs)]
    done = 0  # logical steps finished; step ``done`` belongs to epoch ``done // per_epoch``
    step_loss, step_count = 0.0, 0
    jitter_gen = torch.Generator().manual_seed(config.seed + 1)
    m = per_patient  # physical batches count patients, m slices each
    with make_private_trainer(
        model, optimizer, dataset, privacy,
        steps=config.epochs * per_epoch, max_physical_batch=max(1, config.max_physical_batch // m),
        clipping=config.clipping,
    ) as dp:  # fmt: skip
        device = _device_of(model)
        for images, labels in dp.batches:
            if m > 1:  # [patients, m, ...] -> [patients * m, ...], a patient's slices consecutive
                images, labels = images.flatten(0, 1), labels.flatten(0, 1)
            images, labels = images.to(device), labels.to(device)
            if len(images) == 0:
                dp.empty_step()
                epoch_losses[done // per_epoch].append(float("nan"))
                done += 1
                continue
            losses = per_image_loss(dp.module, model, images, labels, box_jitter=config.box_jitter,
                                    generator=jitter_gen)  # fmt: skip
            dp.backward(losses, images_per_record=m)
            loss = losses.mean()
            dp.optimizer.step()
            dp.optimizer.zero_grad()
            step_loss += float(loss.detach()) * len(images)
            step_count += len(images)
            if dp.logical_step_done:
                epoch_losses[done // per_epoch].append(step_loss / step_count)
                done += 1
                step_loss, step_count = 0.0, 0
    return epoch_losses


__all__ = ["TrainConfig", "TrainResult", "batch_loss", "per_image_loss", "steps_per_epoch", "train_local"]
