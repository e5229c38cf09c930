"""One daemon per ``--state`` folder: an exclusive ``fcntl`` lock on ``STATE/daemon.lock``.

Two servers on one state folder would each hold rounds in memory and overwrite each other's
files; two site daemons on one folder would each spend the site's privacy budget. The lock is
the kernel's (``flock``), so a daemon that crashed or was killed leaves no stale lock behind; the
file keeps the holder's PID for the message.

A state folder holds patient-derived data (slice caches, splits, scores, models) and the budget:
it is made private to its user (0700) when locked, and the daemons run with ``PRIVATE_UMASK`` so
that what they write in it is 0600 (folders 0700).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from fedfms_secure.errors import ConfigError

LOCK_NAME = "daemon.lock"
#: the daemons' (and the demo's) umask: files 0600, folders 0700
PRIVATE_UMASK = 0o077


class StateLock:
    """Holds the lock of one state folder until :meth:`release` (or the process ends)."""

    def __init__(self, state: Path, what: str) -> None:
        self.path = Path(state) / LOCK_NAME
        self._file: IO[str] | None = None
        state = Path(state)
        try:
            state.mkdir(mode=0o700, parents=True, exist_ok=True)
            if state.stat().st_uid == os.getuid():
                os.chmod(state, 0o700)  # an existing folder too: it holds patient-derived data
            fh = open(self.path, "a+")
        except OSError as exc:
            raise ConfigError(f"cannot use the state folder {state} ({exc.strerror}): give --state a folder "
                              "this user can write") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise ConfigError(
                f"state folder {state} in use by PID {holder} (another {what} runs on it): stop that process "
                f"first, or give this one another --state"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._file = fh

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "StateLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
