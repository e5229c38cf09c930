"""One way to write a file so that a crash or a SIGTERM never leaves it half-written.

:func:`write_atomic` writes bytes; :func:`write_atomic_with` hands an open binary file to a writer
callback (``torch.save``, ``numpy.save``, ...) so that large documents need not be built in memory
first. Both write a temporary file in the target's folder, flush it to disk, rename it over the
target and then flush the folder, so that the rename itself survives a power loss.

Files are private to their user (0600) unless a caller asks for another mode: what this project
writes is mostly patient-derived (splits, caches, scores, models) or key material; public files
(certificates, the federation's manifest) pass ``mode=0o644``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic_with(path: Path | str, write: Callable[[BinaryIO], object], *, mode: int = 0o600) -> None:
    """Let ``write`` fill ``path`` (permission bits ``mode``) through an open binary file, atomically.

    ``write`` receives a file opened for writing bytes (e.g. ``lambda f: torch.save(doc, f)``); what it
    returns is ignored. The bytes go to a fresh temporary file (``mkstemp``: created 0600, never a
    followed link) in the same folder, get ``mode``, are flushed to disk and then renamed over
    ``path``; the folder is flushed after the rename. A crash leaves either the old file or the new
    one, never a truncated one; a symlink at ``path`` is replaced, not written through. The temporary
    file is removed if anything fails, ``write`` included.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def write_atomic(path: Path | str, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` with permission bits ``mode``, atomically and durably
    (see :func:`write_atomic_with`)."""
    write_atomic_with(path, lambda handle: handle.write(data), mode=mode)  # a buffered write writes all or raises


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder
            os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["write_atomic", "write_atomic_with"]
