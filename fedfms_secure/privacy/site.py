"""A site's persisted privacy state: the calibrated noise and the one accountant of the run.

The accountant lives as long as the federation run, not as long as a round: a fresh accountant
each round would under-report epsilon. Its history is written to ``<state_dir>/privacy.json``
after every local training, so the budget continues across restarts and never resets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opacus.accountants import IAccountant, create_accountant

from fedfms_secure.errors import ConfigError
from fedfms_secure.privacy.accounting import (
    calibrate_noise,
    epsilon_of,
    extend_history,
    total_steps,
)
from fedfms_secure.privacy.config import PrivacyConfig

STATE_FILE = "privacy.json"
_FORMAT = 1


@dataclass
class SitePrivacy:
    """Noise multiplier, sampling rate and accountant of one site for one planned run.

    Create or resume it with :meth:`open`. ``accountant`` is the live Opacus accountant that
    training steps; :meth:`save` writes its history back to disk.
    """

    state_dir: Path
    config: PrivacyConfig
    sample_rate: float
    planned_steps: int
    noise_multiplier: float
    accountant: IAccountant = field(repr=False)

    @classmethod
    def open(
        cls, state_dir: Path, config: PrivacyConfig, *, sample_rate: float, planned_steps: int
    ) -> SitePrivacy:
        """Resume the run stored in ``state_dir``, or calibrate sigma once and start one there.

        Re-opening with other settings than the stored ones raises :class:`ConfigError`: the
        budget of a run is fixed when it starts.
        """
        state_dir = Path(state_dir)
        path = state_dir / STATE_FILE
        if path.exists():
            site = cls._load(path)
            site._check_same(config, sample_rate, planned_steps)
            return site
        sigma = calibrate_noise(
            target_epsilon=config.target_epsilon,
            delta=config.delta,
            sample_rate=sample_rate,
            steps=planned_steps,
            accountant=config.accountant,
        )
        site = cls(
            state_dir=state_dir,
            config=config,
            sample_rate=float(sample_rate),
            planned_steps=int(planned_steps),
            noise_multiplier=sigma,
            accountant=create_accountant(mechanism=config.accountant),
        )
        site.save()
        return site

    @property
    def steps_taken(self) -> int:
        """DP-SGD steps recorded so far."""
        return total_steps(self.accountant.history)

    def epsilon(self) -> float:
        """Epsilon spent so far at ``config.delta`` (0.0 before any step)."""
        return epsilon_of(self.accountant.history, delta=self.config.delta,
                          accountant=self.config.accountant)  # fmt: skip

    def epsilon_after(self, steps: int) -> float:
        """Epsilon that would be spent after ``steps`` more steps at this run's settings."""
        history = extend_history(self.accountant.history, noise_multiplier=self.noise_multiplier,
                                 sample_rate=self.sample_rate, steps=steps)  # fmt: skip
        return epsilon_of(history, delta=self.config.delta, accountant=self.config.accountant)

    def would_exceed(self, steps: int) -> bool:
        """Would ``steps`` more steps take epsilon past ``config.target_epsilon``?"""
        return self.epsilon_after(steps) > self.config.target_epsilon

    def save(self) -> None:
        """Write the state to ``state_dir/privacy.json`` atomically."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = self.accountant.state_dict()
        data: dict[str, Any] = {
            "format": _FORMAT,
            "config": self.config.to_dict(),
            "sample_rate": self.sample_rate,
            "planned_steps": self.planned_steps,
            "noise_multiplier": self.noise_multiplier,
            "accountant": {
                "mechanism": state["mechanism"],
                "history": [list(h) for h in state["history"]],
            },
        }
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".json.tmp")
        # Durable as well as atomic: the spent budget must not roll back after a power cut.
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.state_dir)

    @classmethod
    def _load(cls, path: Path) -> SitePrivacy:
        try:
            data = json.loads(path.read_text())
            config = PrivacyConfig.from_dict(data["config"])
            acc = data["accountant"]
            history = [(float(s), float(q), int(n)) for s, q, n in acc["history"]]
            accountant = create_accountant(mechanism=config.accountant)
            accountant.load_state_dict({"mechanism": acc["mechanism"], "history": history})
            return cls(
                state_dir=path.parent,
                config=config,
                sample_rate=float(data["sample_rate"]),
                planned_steps=int(data["planned_steps"]),
                noise_multiplier=float(data["noise_multiplier"]),
                accountant=accountant,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"privacy state {path} is unreadable ({exc}); restore it from a backup. Deleting "
                "it would reset the spent budget and void the site's privacy guarantee"
            ) from exc

    def _check_same(self, config: PrivacyConfig, sample_rate: float, planned_steps: int) -> None:
        rate_changed = not math.isclose(sample_rate, self.sample_rate, rel_tol=1e-9)
        if config != self.config or rate_changed or planned_steps != self.planned_steps:
            hint = ""
            if rate_changed:
                hint = (
                    ". The sample rate is batch_size / number of training slices, so a changed "
                    "dataset or preprocessing (e.g. keep_empty_every, the split) or a changed "
                    "batch size is the usual cause: restore them"
                )
            changed = [f"{name}: {before} then, {after} now" for name, before, after in (
                *((f.name, getattr(self.config, f.name), getattr(config, f.name)) for f in dataclasses.fields(config)),
                ("sample_rate", f"{self.sample_rate:.6g}", f"{sample_rate:.6g}"),
                ("planned DP-SGD steps (rounds x local epochs x steps per epoch)", self.planned_steps, planned_steps),
            ) if before != after]
            raise ConfigError(
                f"{self.state_dir / STATE_FILE} belongs to a run with other settings ({'; '.join(changed)})"
                f"{hint}. A run's budget is fixed when it starts: use the original settings, or, for a new "
                "federation run (e.g. more rounds after a finished one), give this site a new --state (this one "
                f"keeps the record of the budget already spent). Deleting {STATE_FILE} would start a new run but "
                "resets (forfeits) the spent budget accounting, voiding the site's privacy guarantee for data "
                "already used"
            )


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["STATE_FILE", "SitePrivacy"]
