"""Structured log lines: ``time level logger message key=value ...``.

Extra fields come from ``log.info("...", extra={...})``. Callers never pass key material,
ciphertexts or decrypted values: only names, rounds, counts, sizes and timings.

Rounds: the code passes the protocol's 0-based round index as ``round=``; every log line shows
the round as users count them, 1..R (as ``status``, ``privacy report`` and the demo's table do),
converted here by :class:`UserRounds` on the way out.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from fedfms_secure.protocol import user_round

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "round_shown"}


class UserRounds(logging.Filter):
    """Shows the integer ``round=`` and ``next_round=`` fields as the user's round numbers
    (``protocol.user_round``)."""

    FIELDS = ("round", "next_round")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.__dict__.get("round_shown"):  # one record may pass several handlers
            return True
        for name in self.FIELDS:
            index = record.__dict__.get(name)
            if isinstance(index, int) and not isinstance(index, bool):
                record.__dict__[name] = user_round(index)
        record.__dict__["round_shown"] = True
        return True


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
    handler.addFilter(UserRounds())
    root = logging.getLogger("fedfms_secure")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def add_log_file(path: Path | None) -> None:
    """Also append fedfms_secure's logs to ``path`` (a daemon's ``--log-file``), same format as stderr."""
    if path is None:
        return
    from fedfms_secure.errors import ConfigError

    root = logging.getLogger("fedfms_secure")
    target = Path(path).expanduser().resolve()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == target for h in root.handlers):
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(target, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the log file {path} ({exc.strerror}): give --log-file a path in a "
                          "folder this user can write") from None
    stderr = next((h for h in root.handlers if h.formatter is not None), None)
    handler.setFormatter(stderr.formatter if stderr is not None
                         else KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    handler.addFilter(UserRounds())
    root.addHandler(handler)
