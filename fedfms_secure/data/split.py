"""Train/validation split of a site BY VOLUME, optionally pinned in a JSON split file.

Slices of one volume are strongly correlated, so splitting slices would leak validation data into
training. The split is drawn over case names (seeded) and, when a split file is given, written on
first use and read back afterwards: adding a volume, changing the seed or ``val_fraction`` later
never moves a case between train and val. Delete the split file to draw a new split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfms_secure.atomic import write_atomic
from fedfms_secure.errors import DataError

SPLIT_FORMAT = 1

log = logging.getLogger("fedfms_secure.data")


@dataclass(frozen=True)
class Split:
    """Case names of the training and validation volumes (disjoint, each sorted)."""

    train: tuple[str, ...]
    val: tuple[str, ...]


def draw_split(names: list[str], *, val_fraction: float, seed: int) -> Split:
    """Split case names into train and val, deterministic in ``(sorted names, seed)``.

    At least one volume stays in training; with ``val_fraction > 0`` and two or more volumes at
    least one goes to validation.
    """
    names = sorted(names)
    n = len(names)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(names[i] for i in order[:n_val])
    train = sorted(names[i] for i in order[n_val:])
    return Split(train=tuple(train), val=tuple(val))


def resolve_split(
    names: list[str], *, split_file: Path | None, val_fraction: float, seed: int
) -> Split:
    """The split to use for ``names``: read from ``split_file`` if it exists, else drawn.

    A newly drawn split is written to ``split_file`` (if given). A split file naming a volume that
    is not in ``names`` raises :class:`DataError`; volumes on disk that the file does not name are
    left out with a warning, so that the split never changes between runs.
    """
    if split_file is None:
        return draw_split(names, val_fraction=val_fraction, seed=seed)
    split_file = Path(split_file)
    if not split_file.exists():
        split = draw_split(names, val_fraction=val_fraction, seed=seed)
        _write(split_file, split, val_fraction=val_fraction, seed=seed)
        log.info("wrote split %s (%d train, %d val)", split_file, len(split.train), len(split.val))
        return split
    split = _read(split_file)
    missing = sorted(set(split.train + split.val) - set(names))
    if missing:
        raise DataError(
            f"split file {split_file} names volumes that no longer exist: {', '.join(missing)}. "
            "If the dataset changed on purpose, delete the split file to draw a new split."
        )
    extra = sorted(set(names) - set(split.train + split.val))
    if extra:
        log.warning(
            "split file %s does not name %d volume(s) (%s); they are left out. Delete the split "
            "file to draw a new split that includes them.",
            split_file,
            len(extra),
            ", ".join(extra),
        )
    return split


def _write(path: Path, split: Split, *, val_fraction: float, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": SPLIT_FORMAT,
        "seed": seed,
        "val_fraction": val_fraction,
        "train": list(split.train),
        "val": list(split.val),
    }
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())


def _read(path: Path) -> Split:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"split file {path} is unreadable ({exc}); delete it to draw a new split.") from exc
    if not isinstance(doc, dict):
        raise DataError(f"split file {path} is not a JSON object; delete it to draw a new split.")
    version = doc.get("format")
    if isinstance(version, bool) or version != SPLIT_FORMAT:
        raise DataError(
            f"split file {path} has format {version!r}, this version reads format {SPLIT_FORMAT}; "
            "delete it to draw a new split."
        )
    train, val = doc.get("train"), doc.get("val")
    for key, names in (("train", train), ("val", val)):
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise DataError(
                f"split file {path}: {key!r} must be a list of case names (strings), got {names!r}; "
                "delete it to draw a new split."
            )
        if len(set(names)) != len(names):
            raise DataError(f"split file {path} names a case twice in {key!r}; delete it to draw a new split.")
    overlap = set(train) & set(val)
    if overlap:
        raise DataError(
            f"split file {path} puts {', '.join(sorted(overlap))} in both train and val; "
            "delete it to draw a new split."
        )
    return Split(train=tuple(sorted(train)), val=tuple(sorted(val)))
