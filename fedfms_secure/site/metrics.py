"""A site's own per-round record: ``STATE/metrics.jsonl``, one JSON object a line, readable only by
the site's user (mode 0600).

After each round (and after a round it waited out) the site appends what it measured there: the
global model's validation scores (``dice``, ``iou``, ``hd95`` and their ``*_std``, ``dice_class_k``
with several classes), ``dice_local`` (its own model before averaging, for a round it trained),
``bytes_up`` / ``bytes_down``, ``contributed``, and ``epsilon`` spent so far with ``epsilon_unit``
(``"patient"`` or ``"slice"``; both null without DP). None of it goes to the server, which gets only
:data:`fedfms_secure.protocol.SERVER_METRICS`.

Appends are flushed to disk; a line cut short by a crash is ended before the next record and is
skipped when the file is read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def append_metrics(state_dir: Path, record: dict[str, Any]) -> Path:
    """Appends ``record`` to ``STATE/metrics.jsonl`` (created 0600; NaN and infinities written as
    null) and returns the file's path."""
    path = Path(state_dir) / METRICS_FILE
    line = (json.dumps(_finite_or_null(record), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # also a file made before by another umask or tool
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # end a line cut short by a crash, so that this record stays whole
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_metrics(state_dir: Path) -> list[dict[str, Any]]:
    """The site's records, oldest first; a line that does not parse (cut short by a crash) is
    skipped. An absent file (or folder) holds none."""
    path = Path(state_dir) / METRICS_FILE
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int):
            records.append(record)
    return records


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    return value
