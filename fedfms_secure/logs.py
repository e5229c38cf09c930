"""Structured log lines: ``time level logger message key=value ...``.

Extra fields come from ``log.info("...", extra={...})``. Callers never pass key material,
ciphertexts or decrypted values: only names, rounds, counts, sizes and timings.
"""

from __future__ import annotations

import logging
import sys

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if extras:
            base += " " + " ".join(f"{k}={_fmt(v)}" for k, v in sorted(extras.items()))
        return base


def _fmt(value: object) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f'"{text}"' if " " in text else text


def setup_logging(level: str = "INFO", prefix: str = "") -> None:
    """Send fedfms_secure's logs to stderr as structured lines (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s " + (f"[{prefix}] " if prefix else "") + "%(name)s: %(message)s"
    handler.setFormatter(KeyValueFormatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger("fedfms_secure")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
