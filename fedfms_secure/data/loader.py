"""The front door of the data subsystem: ``load_site`` turns a site folder into datasets.

Files are read once; the preprocessed 2-D slices are held in memory as tensors (images as
float16, labels as bool: 3 bytes per pixel, 3 MiB per slice at 1024 x 1024), so training epochs
never touch the disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from fedfms_secure.data.layout import CasePair, expected_label, list_cases
from fedfms_secure.data.preprocess import load_pair_slices
from fedfms_secure.data.split import resolve_split
from fedfms_secure.errors import ConfigError, DataError

log = logging.getLogger("fedfms_secure.data")


class SliceDataset(Dataset):
    """Preprocessed 2-D slices held in memory.

    Item ``i`` is ``(image, label)``: float32 tensors ``[1, S, S]``, the image in [0, 1] and the
    label in {0, 1}. ``cases[i]`` names the volume slice ``i`` came from.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cases: list[str]) -> None:
        if not (len(images) == len(labels) == len(cases)):
            raise ValueError("images, labels and cases must have the same length")
        self.images = images.to(torch.float16)
        self.labels = labels.to(torch.bool)
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float(), self.labels[index].float()

    @property
    def case_names(self) -> list[str]:
        """Sorted names of the volumes that contribute at least one slice."""
        return sorted(set(self.cases))


@dataclass
class SiteData:
    """A site's training and validation slices (split by volume)."""

    name: str
    train: Dataset
    val: Dataset
    num_volumes: int
    image_size: int


def load_site(
    site_dir: Path,
    *,
    image_size: int,
    split_file: Path | None = None,
    val_fraction: float = 0.25,
    seed: int = 0,
    axis: int = 2,
    keep_empty_every: int = 5,
    skip_bad: bool = False,
) -> SiteData:
    """Load a site folder (``imagesTr/`` + ``labelsTr/``, NIfTI volumes or PNG pictures).

    Args:
        site_dir: the site folder (see :mod:`fedfms_secure.data.layout`).
        image_size: side of the square slices handed to the model.
        split_file: JSON file pinning the train/val split; written on first use, reused after.
        val_fraction: share of the volumes held out for validation when a split is drawn.
        seed: seed of a newly drawn split.
        axis: spatial axis (0, 1 or 2) that 3-D volumes are sliced along.
        keep_empty_every: keep every k-th slice without foreground (0: drop them all).
        skip_bad: skip (with a logged warning) pairs that are missing, corrupt or mismatched
            instead of raising :class:`DataError`.

    Raises:
        ConfigError: an argument is out of range.
        DataError: the folder, a file or the split file is wrong, or no slice is usable.
    """
    _check_args(image_size, val_fraction, axis, keep_empty_every)
    site_dir = Path(site_dir)
    pairs = _usable_pairs(list_cases(site_dir), skip_bad=skip_bad)
    split = resolve_split(
        [p.name for p in pairs], split_file=split_file, val_fraction=val_fraction, seed=seed
    )
    by_name = {p.name: p for p in pairs}
    options = dict(image_size=image_size, axis=axis, keep_empty_every=keep_empty_every)
    train, loaded_train = _load_cases([by_name[n] for n in split.train], skip_bad, **options)
    val, loaded_val = _load_cases([by_name[n] for n in split.val], skip_bad, **options)
    if len(train) == 0:
        raise DataError(
            f"site {site_dir} has no usable training slice ({loaded_train + loaded_val} of "
            f"{len(pairs)} volumes loaded); check that labelsTr/ holds non-empty labels, or lower "
            "val_fraction."
        )
    if len(val) == 0 and (val_fraction > 0 or split.val):
        log.warning("site %s has no validation slice; validation metrics will be empty", site_dir)
    return SiteData(
        name=site_dir.name,
        train=train,
        val=val,
        num_volumes=loaded_train + loaded_val,
        image_size=image_size,
    )


def _usable_pairs(pairs: list[CasePair], *, skip_bad: bool) -> list[CasePair]:
    usable = []
    for pair in pairs:
        if pair.label is not None:
            usable.append(pair)
            continue
        expected = expected_label(pair.image)
        message = (
            f"image {pair.image} has no label (expected {expected}); add the label or remove "
            "the image."
        )
        if not skip_bad:
            raise DataError(message)
        log.warning("skipping: %s", message)
    return usable


def _load_cases(
    pairs: list[CasePair], skip_bad: bool, *, image_size: int, axis: int, keep_empty_every: int
) -> tuple[SliceDataset, int]:
    """Slices of the given cases, and how many cases loaded."""
    images, labels, cases = [], [], []
    for pair in pairs:
        try:
            img, lab = load_pair_slices(
                pair, image_size=image_size, axis=axis, keep_empty_every=keep_empty_every
            )
        except DataError as exc:
            if not skip_bad:
                raise
            log.warning("skipping case %s: %s", pair.name, exc)
            continue
        images.append(img.half())  # halve the footprint before the next volume is read
        labels.append(lab)
        cases += [pair.name] * len(img)
    loaded = len(images)
    if not images:
        images = [torch.zeros(0, 1, image_size, image_size)]
        labels = [torch.zeros(0, 1, image_size, image_size, dtype=torch.bool)]
    return SliceDataset(torch.cat(images), torch.cat(labels), cases), loaded


def _check_args(image_size: int, val_fraction: float, axis: int, keep_empty_every: int) -> None:
    if image_size < 8:
        raise ConfigError(f"image_size={image_size} is too small; use at least 8 (SAM uses 1024).")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1), e.g. 0.25.")
    if axis not in (0, 1, 2):
        raise ConfigError(f"axis={axis} must be 0, 1 or 2 (the axis 3-D volumes are sliced along).")
    if keep_empty_every < 0:
        raise ConfigError(
            f"keep_empty_every={keep_empty_every} must be >= 0 (5 keeps one empty slice in five, "
            "0 drops them all)."
        )
