"""One front door for a site's DP plan: records, sample rate, delta and steps from its data.

Used by the site daemon and the baselines (``train central|local``), so both derive the same
numbers: n = training records of the unit (patients by default), expected records per step
``b = min(batch_size, n)``, ``q = b / n`` (fixed here, before training, for the whole run),
``ceil(n / b)`` steps per epoch, and delta ``min(1e-5, 1/(10 n))`` unless given.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from fedfms_secure.errors import ConfigError
from fedfms_secure.privacy.budget import resolve_delta
from fedfms_secure.privacy.config import PrivacyConfig
from fedfms_secure.privacy.site import SitePrivacy
from fedfms_secure.privacy.units import check_unit, records, unit_words

log = logging.getLogger("fedfms_secure.privacy")


@dataclass(frozen=True)
class RecordPlan:
    """How many records a site trains on, and the DP-SGD steps it takes over them."""

    unit: str
    records: int  # training patients (or slices)
    slices: int  # training slices
    expected_per_step: int  # the plan's batch size, capped at ``records``
    steps_per_epoch: int

    @property
    def sample_rate(self) -> float:
        """Poisson sampling rate q = expected records per step / records."""
        return self.expected_per_step / self.records


def plan_records(dataset: Dataset, *, unit: str, batch_size: int) -> RecordPlan:
    """The record plan of ``dataset`` (a site's training slices) for ``unit`` and ``batch_size``."""
    check_unit(unit)
    if batch_size < 1:
        raise ConfigError(f"batch_size (expected {unit}s per step) must be >= 1, got {batch_size}")
    n = records(dataset, unit)
    if n < 1:
        raise ConfigError("the site has no training record: check its imagesTr/labelsTr folders")
    expected = min(batch_size, n)
    return RecordPlan(unit=unit, records=n, slices=len(dataset),  # type: ignore[arg-type]
                      expected_per_step=expected, steps_per_epoch=max(1, math.ceil(n / expected)))


def open_site_privacy(
    state_dir: Path, plan: RecordPlan, *, epochs: int, rounds: int, epsilon: float,
    delta: float | None, max_grad_norm: float, accountant: str = "rdp",
) -> SitePrivacy:
    """Opens (or resumes) the site's accountant for ``rounds`` rounds of ``epochs`` epochs."""
    per_round = epochs * plan.steps_per_epoch
    site = SitePrivacy.open(
        state_dir,
        PrivacyConfig(target_epsilon=epsilon, delta=resolve_delta(delta, plan.records, plan.unit),
                      max_grad_norm=max_grad_norm, accountant=accountant, unit=plan.unit),
        sample_rate=plan.sample_rate, planned_steps=rounds * per_round, records=plan.records,
        steps_per_round=per_round,
    )
    log.info("DP-SGD record is one %s: %d training records (%d slices), %d expected per step (q=%.4g), "
             "delta %.3g, sigma %.4f", unit_words(plan.unit), plan.records, plan.slices, plan.expected_per_step,
             plan.sample_rate, site.config.delta, site.noise_multiplier)
    return site


__all__ = ["RecordPlan", "open_site_privacy", "plan_records"]
