"""One way to write a file so that a crash or a SIGTERM never leaves it half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path | str, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` with permission bits ``mode``, atomically and durably.

    The bytes go to a fresh temporary file (``mkstemp``: created 0600, never a followed link) in the
    same folder, get ``mode``, are flushed to disk and then renamed over ``path``. A crash leaves
    either the old file or the new one, never a truncated one; a symlink at ``path`` is replaced,
    not written through. The temporary file is removed if anything fails.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)  # a buffered write writes everything or raises
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
