"""On-disk cache of preprocessed slices, so that a site reads and resamples its files only once.

One entry per case and preprocessing: ``CACHE/slices/<aa>/<key>.pt`` where ``key`` hashes the
image and label paths and :meth:`Preprocessing.digest` (every option, and the preprocessing
version). The entry records the size and ``mtime_ns`` of both files: a file that changed since
makes the entry stale, and it is rebuilt (and overwritten) on the next read. An entry is never
trusted: it is read with ``torch.load(weights_only=True)`` (no code runs), its header must match,
its tensors must have the expected shapes and types, and a SHA-256 of their bytes must match the
one stored with them; anything else is logged, deleted and rebuilt from the files.

The cache lives where the caller says (``--cache DIR``, or the site's state folder), never inside
a data folder, which may be read-only. A cache that cannot be written is a warning, not an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedfms_secure.atomic import write_atomic_with
from fedfms_secure.data.layout import CasePair
from fedfms_secure.data.preprocess import Preprocessing

CACHE_FORMAT = 1
SUBDIR = "slices"

log = logging.getLogger("fedfms_secure.data")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # no entry, or a stale one
    discarded: int = 0  # corrupt entries deleted
    writes: int = 0


class SliceCache:
    """Preprocessed slices of cases, keyed by file identity and preprocessing options."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.stats = CacheStats()
        self._writable = True

    def entry_path(self, pair: CasePair, options: Preprocessing) -> Path:
        key = _key(pair, options)
        return self.root / SUBDIR / key[:2] / f"{key}.pt"

    def get(self, pair: CasePair, options: Preprocessing) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached ``(images float16, labels uint8)`` of ``pair``, or None (miss, stale or corrupt)."""
        path = self.entry_path(pair, options)
        if not path.is_file():
            self.stats.misses += 1
            return None
        try:
            stamp = _stamp(pair)
        except OSError:
            self.stats.misses += 1
            return None
        try:
            doc = torch.load(path, map_location="cpu", weights_only=True)
            images, labels = _validate(doc, pair, options)
        except _Stale:
            self.stats.misses += 1
            return None
        except Exception as exc:  # noqa: BLE001 - anything wrong with an entry means: rebuild it
            self._discard(path, f"{type(exc).__name__}: {exc}")
            return None
        if doc["stamp"] != stamp:
            log.debug("cache entry %s is stale (a file changed): rebuilding", path)
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return images, labels

    def put(self, pair: CasePair, options: Preprocessing, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Store the slices of ``pair`` (atomically); a write failure disables the cache with a warning."""
        if not self._writable:
            return
        path = self.entry_path(pair, options)
        images = images.to(torch.float16).contiguous()
        labels = labels.to(torch.uint8).contiguous()
        doc = {
            "format": CACHE_FORMAT,
            "image": str(pair.image.resolve()),
            "label": str(pair.label.resolve()) if pair.label else "",
            "options": options.digest(),
            "stamp": _stamp(pair),
            "images": images,
            "labels": labels,
            "sha256": _checksum(images, labels),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic_with(path, lambda handle: torch.save(doc, handle))
            self.stats.writes += 1
        except OSError as exc:
            self._writable = False
            log.warning("slice cache %s cannot be written (%s); going on without caching", self.root, exc)

    def _discard(self, path: Path, why: str) -> None:
        self.stats.discarded += 1
        log.warning("slice cache entry %s is corrupt (%s): deleted, rebuilding it from the files", path, why)
        try:
            path.unlink()
        except OSError:
            pass


class _Stale(Exception):
    """An intact entry made for other files or options (e.g. after a hash collision of paths)."""


def _validate(doc: Any, pair: CasePair, options: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
        raise ValueError("not a slice cache entry of this version")
    if (doc.get("image"), doc.get("label"), doc.get("options")) != (
        str(pair.image.resolve()), str(pair.label.resolve()) if pair.label else "", options.digest()
    ):
        raise _Stale()
    images, labels = doc.get("images"), doc.get("labels")
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("tensors missing")
    size = options.image_size
    if images.dtype != torch.float16 or labels.dtype != torch.uint8:
        raise ValueError(f"unexpected dtypes {images.dtype}, {labels.dtype}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, size, size) or labels.shape != images.shape:
        raise ValueError(f"unexpected shapes {tuple(images.shape)}, {tuple(labels.shape)}")
    if doc.get("sha256") != _checksum(images, labels):
        raise ValueError("checksum mismatch")
    if not isinstance(doc.get("stamp"), list):
        raise ValueError("no file stamp")
    if labels.numel() and int(labels.max()) > options.label_map.num_classes:
        raise ValueError("label value out of range")
    return images, labels


def _stamp(pair: CasePair) -> list[int]:
    """Size and modification time (ns) of the image and the label."""
    out = []
    for path in (pair.image, pair.label):
        if path is None:
            out += [-1, -1]
            continue
        st = os.stat(path)
        out += [int(st.st_size), int(st.st_mtime_ns)]
    return out


def _checksum(images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(str((tuple(images.shape), str(images.dtype), str(labels.dtype))).encode())
    if images.numel():
        digest.update(images.contiguous().view(torch.uint8).numpy())
    if labels.numel():
        digest.update(labels.contiguous().numpy())
    return digest.hexdigest()


def _key(pair: CasePair, options: Preprocessing) -> str:
    label = str(pair.label.resolve()) if pair.label else ""
    text = f"{CACHE_FORMAT}\0{pair.image.resolve()}\0{label}\0{options.digest()}"
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["CACHE_FORMAT", "CacheStats", "SliceCache"]
