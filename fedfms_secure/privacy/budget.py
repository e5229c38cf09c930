"""A site's budget policy and its per-round ledger.

``delta`` bounds the probability that the (epsilon, delta) guarantee fails outright; a mechanism
with delta near 1/n may publish one of the n training records (patients, or slices at slice
level) in the clear. So delta defaults to ``min(1e-5, 1 / (10 n))`` and a delta above
``1 / (10 n)`` is refused.

The ledger, ``STATE/privacy_ledger.jsonl``, gets one line after every round a site trained:
the round, the DP-SGD steps, and the cumulative epsilon the accountant reports at that point.
It is what ``fedfms-secure privacy report`` prints; the accountant itself stays in
``STATE/privacy.json`` (see :mod:`fedfms_secure.privacy.site`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fedfms_secure.errors import ConfigError

log = logging.getLogger("fedfms_secure.privacy")

LEDGER_FILE = "privacy_ledger.jsonl"
DEFAULT_DELTA = 1e-5
DELTA_FACTOR = 10  # delta must be at most 1 / (DELTA_FACTOR * n)


def max_delta(num_records: int) -> float:
    """The largest delta accepted for ``num_records`` training records (patients or slices)."""
    return 1.0 / (DELTA_FACTOR * max(1, num_records))


def resolve_delta(delta: float | None, num_records: int, unit: str = "patient") -> float:
    """``delta`` checked against the site's number of records of ``unit``, or the default for it
    when ``None``: ``min(1e-5, 1 / (10 n))`` for n training patients (slices at slice level)."""
    limit = max_delta(num_records)
    if delta is None:
        return min(DEFAULT_DELTA, limit)
    if not 0 < delta <= limit:
        raise ConfigError(
            f"delta={delta:g} is too large for {num_records} training {unit}s: it must be well below "
            f"1/n, at most 1/({DELTA_FACTOR}n) = {limit:.3g} (a delta near 1/n allows releasing a "
            f"{unit}'s data outright); omit --delta to use {min(DEFAULT_DELTA, limit):.3g}"
        )
    return delta


def ledger_steps(records: list[dict[str, Any]]) -> int:
    """DP-SGD steps the ledger's records account for."""
    return sum(int(r.get("steps", 0)) for r in records)


def append_ledger(state_dir: Path, record: dict[str, Any]) -> None:
    """Appends one round's record to the site's ledger (flushed to disk before returning)."""
    path = Path(state_dir) / LEDGER_FILE
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_ledger(state_dir: Path) -> list[dict[str, Any]]:
    """The ledger's records, oldest first; ConfigError naming the file if it is unreadable."""
    path = Path(state_dir) / LEDGER_FILE
    if not Path(state_dir).is_dir():
        raise ConfigError(f"{state_dir} is not a folder: give the site's --state folder")
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not path.read_text().endswith("\n"):
                log.warning("ignoring the half-written last line of %s (a crash while appending)", path)
                break
            raise ConfigError(f"{path}, line {number}, is not valid JSON: the ledger was edited or truncated") from None
    return records
