"""A site's persisted privacy state: the calibrated noise and the one accountant of the run.

The accountant lives as long as the federation run, not as long as a round: a fresh accountant
each round would under-report epsilon. Its history is written to ``<state_dir>/privacy.json``
after every local training, so the budget continues across restarts and never resets.

A rolled-back or lost accountant is refused: :meth:`SitePrivacy.open` compares it with the site's
ledger (``privacy_ledger.jsonl``), and :func:`check_against_server` with the number of rounds the
server says took this site's upload. Either holding more steps than the accountant means budget
was spent that the accountant no longer counts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opacus.accountants import IAccountant, create_accountant

from fedfms_secure.atomic import write_atomic
from fedfms_secure.errors import ConfigError
from fedfms_secure.privacy.budget import LEDGER_FILE, ledger_steps, read_ledger
from fedfms_secure.privacy.accounting import (
    calibrate_noise,
    epsilon_of,
    extend_history,
    total_steps,
)
from fedfms_secure.privacy.config import PrivacyConfig

STATE_FILE = "privacy.json"
_FORMAT = 2  # 1: before the privacy unit (slice-level, no record count)

log = logging.getLogger("fedfms_secure.privacy")


@dataclass
class SitePrivacy:
    """Noise multiplier, sampling rate and accountant of one site for one planned run.

    Create or resume it with :meth:`open`. ``accountant`` is the live Opacus accountant that
    training steps; :meth:`save` writes its history back to disk. ``records`` is the number of
    training records of ``config.unit`` (patients, or slices) that ``sample_rate`` was derived
    from (``expected records per step / records``); it is fixed when the run starts.
    ``steps_per_round`` (None: unknown) lets :func:`check_against_server` count trained rounds.
    """

    state_dir: Path
    config: PrivacyConfig
    sample_rate: float
    planned_steps: int
    noise_multiplier: float
    accountant: IAccountant = field(repr=False)
    records: int | None = None
    steps_per_round: int | None = None

    @classmethod
    def open(
        cls, state_dir: Path, config: PrivacyConfig, *, sample_rate: float, planned_steps: int,
        records: int | None = None, steps_per_round: int | None = None,
    ) -> SitePrivacy:
        """Resume the run stored in ``state_dir``, or calibrate sigma once and start one there.

        Re-opening with other settings than the stored ones raises :class:`ConfigError`: the
        budget of a run is fixed when it starts. So does an accountant that holds fewer steps
        than the site's ledger (a rolled-back ``privacy.json``), or a ledger without accountant.
        """
        state_dir = Path(state_dir)
        path = state_dir / STATE_FILE
        if path.exists():
            site = cls._load(path)
            site._check_same(config, sample_rate, planned_steps, records)
            site.check_ledger()
            return site
        _refuse_lost_accountant(state_dir)
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
            records=records,
            steps_per_round=steps_per_round,
        )
        site.save()
        return site

    def check_ledger(self) -> None:
        """:class:`ConfigError` if the ledger records more DP steps than the accountant holds."""
        if not self.state_dir.is_dir():
            return
        ledger = read_ledger(self.state_dir)
        spent, held = ledger_steps(ledger), self.steps_taken
        if spent > held:
            last = ledger[-1]
            raise ConfigError(
                f"{self.state_dir / STATE_FILE} accounts for {held} DP-SGD steps, but this site's ledger "
                f"{self.state_dir / LEDGER_FILE} records {spent} (through round {last.get('round', 0) + 1}, "
                f"epsilon {float(last.get('epsilon', float('nan'))):.3f}): the accountant was rolled back. "
                f"Restore {STATE_FILE} from a backup taken after the last trained round; training on with "
                "the older one would spend the same budget twice"
            )
        if held > spent:  # a stop between saving the accountant and appending the ledger: safe side
            log.warning("privacy accountant holds %d steps, the ledger %d: a round's ledger line was not "
                        "written (the accountant, which counts more, decides)", held, spent)

    @property
    def rounds_accounted(self) -> int | None:
        """Whole rounds of training the accountant accounts for (None if steps_per_round is unknown)."""
        if not self.steps_per_round:
            return None
        return self.steps_taken // self.steps_per_round

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
            "unit": self.config.unit,
            "records": self.records,
            "steps_per_round": self.steps_per_round,
            "accountant": {
                "mechanism": state["mechanism"],
                "history": [list(h) for h in state["history"]],
            },
        }
        # durable as well as atomic: the spent budget must not roll back after a power cut
        write_atomic(self.state_dir / STATE_FILE, json.dumps(data, indent=2).encode(), mode=0o600)

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
                records=None if data.get("records") is None else int(data["records"]),
                steps_per_round=None if data.get("steps_per_round") is None else int(data["steps_per_round"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"privacy state {path} is unreadable ({exc}); restore it from a backup. Deleting "
                "it would reset the spent budget and void the site's privacy guarantee"
            ) from exc

    def _check_same(self, config: PrivacyConfig, sample_rate: float, planned_steps: int,
                    records: int | None) -> None:
        rate_changed = not math.isclose(sample_rate, self.sample_rate, rel_tol=1e-9)
        records_changed = records is not None and self.records is not None and records != self.records
        if (config != self.config or rate_changed or records_changed
                or planned_steps != self.planned_steps):
            hint = ""
            if rate_changed or records_changed:
                hint = (
                    f". The sample rate is expected {config.unit}s per step / training "
                    f"{config.unit}s (fixed at {self.records} when the run started), so a changed "
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
                f"keeps the record of the budget already spent). Deleting {STATE_FILE} does not start a new run: "
                "the ledger and the server still record the budget spent on this data"
            )


def check_against_server(state_dir: Path, trained_rounds: int) -> None:
    """Refuses to train if this site's accountant counts fewer trained rounds than the server's.

    ``trained_rounds`` is how many rounds the server recorded as taking this site's upload. An
    accountant that accounts for fewer (``steps // steps_per_round``) was rolled back or lost, and
    training on with it would spend the same budget twice: :class:`ConfigError` names what to
    restore.
    """
    state_dir = Path(state_dir)
    path = state_dir / STATE_FILE
    if trained_rounds <= 0:
        return
    if not path.exists():
        raise ConfigError(
            f"the server recorded {trained_rounds} round(s) with this site's upload, but {path} is missing: "
            f"restore it (and {LEDGER_FILE}) from a backup taken after round {trained_rounds}; a site "
            "cannot start its budget over"
        )
    site = SitePrivacy._load(path)
    accounted = site.rounds_accounted
    if accounted is None:
        raise ConfigError(
            f"{path} does not record its steps per round, so it cannot be checked against the {trained_rounds} "
            "round(s) the server recorded: restore the privacy.json this version wrote"
        )
    if accounted < trained_rounds:
        raise ConfigError(
            f"{path} accounts for {accounted} trained round(s) ({site.steps_taken} DP-SGD steps, "
            f"{site.steps_per_round} a round), but the server recorded {trained_rounds} round(s) with this "
            f"site's upload: the accountant was rolled back. Restore {STATE_FILE} from a backup taken after "
            f"round {trained_rounds}; training on with it would spend the same budget twice"
        )


def check_local_state(state_dir: Path) -> None:
    """:class:`ConfigError` if ``state_dir``'s accountant is missing or holds fewer steps than its
    ledger (a lost or rolled-back ``privacy.json``); a site checks this before it connects."""
    state_dir = Path(state_dir)
    path = state_dir / STATE_FILE
    if not path.exists():
        _refuse_lost_accountant(state_dir)
        return
    SitePrivacy._load(path).check_ledger()


def _refuse_lost_accountant(state_dir: Path) -> None:
    """:class:`ConfigError` when the ledger shows spent budget but no accountant is there."""
    if not state_dir.is_dir():
        return
    ledger = read_ledger(state_dir)
    if ledger:
        raise ConfigError(
            f"{state_dir / STATE_FILE} is missing, but this site's ledger shows {len(ledger)} trained round(s) "
            f"(epsilon {float(ledger[-1].get('epsilon', float('nan'))):.3f}): restore the file from a backup; "
            "starting over would reset the spent budget"
        )


__all__ = ["STATE_FILE", "SitePrivacy", "check_against_server", "check_local_state"]
