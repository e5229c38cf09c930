"""Local training of a site: plain Adam, or DP-SGD (Opacus) bound to the site's accountant.

The optimizer is Adam over the parameters that ``apply_mode`` left trainable, created fresh on
every call (as usual in FedAvg: local optimizer state does not survive a round). The loss is
Dice + BCE on logits, a mean of per-image terms.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fedfms_secure.errors import ConfigError, ModelError, PrivacyBudgetExhausted
from fedfms_secure.model.segmenter import SamSegmenter
from fedfms_secure.privacy.engine import make_private_trainer
from fedfms_secure.privacy.site import SitePrivacy
from fedfms_secure.train.losses import dice_bce_loss


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings of one round."""

    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    max_physical_batch: int = 16

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_physical_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr}")


@dataclass
class TrainResult:
    """What one call of :func:`train_local` did.

    ``loss`` is the mean training loss over its last epoch (NaN if DP's Poisson sampling drew
    only empty batches); ``epsilon`` is the site's total spent budget after it (None without DP).
    """

    num_samples: int
    steps: int
    loss: float
    epsilon: float | None
    seconds: float


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: ``ceil(num_samples / batch_size)`` (at least 1).

    For DP planning: ``sample_rate = batch_size / num_samples`` and
    ``planned_steps = rounds * epochs * steps_per_epoch(num_samples, batch_size)``.
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
) -> TrainResult:
    """Train the parameters with ``requires_grad`` on ``dataset``; DP-SGD if ``privacy`` is given.

    With ``privacy`` the run takes ``epochs * steps_per_epoch`` Poisson-sampled steps at the
    site's sample rate and noise, raises :class:`PrivacyBudgetExhausted` *before* training if that
    would pass the target epsilon, and persists the accountant afterwards. The model is a plain
    ``SamSegmenter`` again on return.
    """
    num_samples = len(dataset)  # type: ignore[arg-type]
    if num_samples == 0:
        raise ModelError("the site dataset is empty; check its imagesTr/labelsTr folders")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("no parameter requires grad; call apply_mode(model, mode) first")
    steps = config.epochs * steps_per_epoch(num_samples, config.batch_size)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        if privacy is None:
            losses = _train_plain(model, dataset, config, optimizer)
        else:
            _check_budget(privacy, steps)
            losses = _train_private(model, dataset, config, optimizer, privacy, steps)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    last = losses[-max(1, len(losses) // config.epochs) :]
    return TrainResult(
        num_samples=num_samples,
        steps=steps,
        loss=float(sum(last) / len(last)) if last else float("nan"),
        epsilon=None if privacy is None else privacy.epsilon(),
        seconds=seconds,
    )


def _check_budget(privacy: SitePrivacy, steps: int) -> None:
    if privacy.would_exceed(steps):
        raise PrivacyBudgetExhausted(
            f"{steps} more DP steps would take epsilon from {privacy.epsilon():.3f} to "
            f"{privacy.epsilon_after(steps):.3f}, past the target "
            f"{privacy.config.target_epsilon} (state in {privacy.state_dir}); this site's budget "
            "for its data is spent: leave it out of further rounds"
        )


def _device_of(model: SamSegmenter) -> torch.device:
    return next(model.parameters()).device


def _physical_chunks(images: Tensor, labels: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return list(zip(images.split(size), labels.split(size), strict=True))


def _train_plain(
    model: SamSegmenter, dataset: Dataset, config: TrainConfig, optimizer: torch.optim.Optimizer
) -> list[float]:
    gen = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=gen)
    losses: list[float] = []
    device = _device_of(model)
    for _ in range(config.epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for x, y in _physical_chunks(images, labels, config.max_physical_batch):
                loss = dice_bce_loss(model(x), y) * (len(x) / len(images))
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            losses.append(total)
    return losses


def _train_private(
    model: SamSegmenter,
    dataset: Dataset,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    privacy: SitePrivacy,
    steps: int,
) -> list[float]:
    losses: list[float] = []
    batch_loss, batch_count = 0.0, 0
    with make_private_trainer(
        model, optimizer, dataset, privacy,
        steps=steps, max_physical_batch=config.max_physical_batch,
    ) as dp:  # fmt: skip
        device = _device_of(model)
        for images, labels in dp.batches:
            images, labels = images.to(device), labels.to(device)
            if len(images) == 0:
                dp.empty_step()
                losses.append(float("nan"))
                continue
            loss = dice_bce_loss(dp.module(images), labels)
            loss.backward()
            dp.optimizer.step()
            dp.optimizer.zero_grad()
            batch_loss += float(loss.detach()) * len(images)
            batch_count += len(images)
            if dp.logical_step_done:
                losses.append(batch_loss / batch_count)
                batch_loss, batch_count = 0.0, 0
    return [v for v in losses if not math.isnan(v)]


__all__ = ["TrainConfig", "TrainResult", "steps_per_epoch", "train_local"]
