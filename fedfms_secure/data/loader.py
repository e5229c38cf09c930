"""The front door of the data subsystem: ``load_site`` turns a site folder into datasets.

Files are read once; the preprocessed 2-D slices are held in memory as tensors (images as
float16, labels as uint8 class indices: 3 bytes per pixel, 3 MiB per slice at 1024 x 1024), so
training epochs never touch the disk. With ``cache_dir`` the slices of each case are also kept on
disk (:mod:`fedfms_secure.data.cache`), so the next run skips reading and resampling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from fedfms_secure.data.cache import CacheStats, SliceCache
from fedfms_secure.data.labels import LabelMap
from fedfms_secure.data.layout import CasePair, expected_label, list_cases, patient_ids
from fedfms_secure.data.preprocess import CLIP_PERCENTILES, Preprocessing, load_pair_slices, preprocessing_for
from fedfms_secure.data.split import resolve_split
from fedfms_secure.errors import ConfigError, DataError

log = logging.getLogger("fedfms_secure.data")


class SliceDataset(Dataset):
    """Preprocessed 2-D slices held in memory.

    Item ``i`` is ``(image, label)``: float32 tensors ``[1, S, S]``, the image in [0, 1] and the
    label the class index of each pixel (0 background, 1..K; {0, 1} with one class).
    ``cases[i]`` names the volume (or file) slice ``i`` came from, ``patients[i]`` its patient (the
    DP record; the case itself unless 2-D files are grouped, see :mod:`fedfms_secure.data.layout`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cases: list[str],
                 patients: list[str] | None = None) -> None:
        if not (len(images) == len(labels) == len(cases)) or (patients is not None and len(patients) != len(cases)):
            raise ValueError("images, labels, cases and patients must have the same length")
        self.images = images.to(torch.float16)
        self.labels = labels.to(torch.uint8)
        self.cases = list(cases)
        self.patients = list(cases) if patients is None else list(patients)

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
    train: SliceDataset
    val: SliceDataset
    num_volumes: int
    image_size: int
    preprocessing: Preprocessing | None = None
    # one message per skipped pair (with skip_bad), naming its file
    skipped: list[str] = field(default_factory=list)
    # hits, misses, discarded (corrupt) entries and writes of the slice cache; None without one
    cache_stats: CacheStats | None = None

    @property
    def label_map(self) -> LabelMap:
        assert self.preprocessing is not None
        return self.preprocessing.label_map

    @property
    def class_names(self) -> list[str]:
        return list(self.label_map.names)


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
    labels: str | dict | LabelMap | None = None,
    clip_percentiles: tuple[float, float] | str = CLIP_PERCENTILES,
    cache_dir: Path | None = None,
    patient_pattern: str | None = None,
) -> SiteData:
    """Load a site folder (``imagesTr/`` + ``labelsTr/``, NIfTI volumes or PNG pictures).

    Args:
        site_dir: the site folder (see :mod:`fedfms_secure.data.layout`).
        image_size: side of the square slices handed to the model.
        split_file: JSON file pinning the train/val split; written on first use, reused after.
        val_fraction: share of the volumes held out for validation when a split is drawn
            (0: every volume trains, e.g. to evaluate a held-out site on all of it).
        seed: seed of a newly drawn split.
        axis: axis (0, 1 or 2) of the stored voxel array that 3-D volumes are sliced along.
        keep_empty_every: keep every k-th slice without foreground (0: drop them all).
        skip_bad: skip (with a logged warning) pairs that are missing, corrupt or mismatched
            instead of raising :class:`DataError`.
        labels: label spec mapping label values onto the model's classes (see
            :mod:`fedfms_secure.data.labels`); None: every non-zero value is foreground.
        clip_percentiles: intensity percentiles ``(low, high)`` clipped to, then scaled to [0, 1].
        cache_dir: keep the preprocessed slices here (:mod:`fedfms_secure.data.cache`); None: no cache.
        patient_pattern: regular expression giving a 2-D file's patient from its name (see
            :func:`~fedfms_secure.data.layout.patient_ids`); the split is drawn by patient.

    Raises:
        ConfigError: an argument is out of range.
        DataError: the folder, a file or the split file is wrong, or no slice is usable.
    """
    _check_args(val_fraction)
    site_dir = Path(site_dir)
    options = preprocessing_for(site_dir, image_size=image_size, axis=axis, keep_empty_every=keep_empty_every,
                                clip_percentiles=clip_percentiles, labels=labels)
    skipped: list[str] = []
    pairs = _usable_pairs(list_cases(site_dir), skip_bad=skip_bad, skipped=skipped)
    patient_of = patient_ids(site_dir, pairs, patient_pattern)
    grouped = any(patient_of[p.name] != p.name for p in pairs)
    # split by patient, so that no patient has slices in both train and val; a split file names
    # cases, or patients when 2-D files are grouped into patients
    units = sorted(set(patient_of.values())) if grouped else [p.name for p in pairs]
    split = resolve_split(units, split_file=split_file, val_fraction=val_fraction, seed=seed)
    key = (lambda p: patient_of[p.name]) if grouped else (lambda p: p.name)
    train_set, val_set = set(split.train), set(split.val)
    cache = SliceCache(cache_dir) if cache_dir is not None else None
    train, loaded_train = load_cases([p for p in pairs if key(p) in train_set], options, skip_bad=skip_bad,
                                     cache=cache, skipped=skipped, patient_of=patient_of)
    val, loaded_val = load_cases([p for p in pairs if key(p) in val_set], options, skip_bad=skip_bad,
                                 cache=cache, skipped=skipped, patient_of=patient_of)
    if len(train) == 0:
        raise DataError(
            f"site {site_dir} has no usable training slice ({loaded_train + loaded_val} of "
            f"{len(pairs)} volumes loaded); check that labelsTr/ holds non-empty labels (and that the "
            "label map selects values they hold), or lower val_fraction."
        )
    if len(val) == 0 and (val_fraction > 0 or split.val):
        log.warning("site %s has no validation slice; validation metrics will be empty", site_dir)
    if not (bool(train.labels.any()) or bool(val.labels.any())):
        # e.g. PNG masks stored as 0/255 under a map that selects 1, 2, 3: training would see background only
        log.warning(
            "site %s: no slice has a foreground voxel under the label map %s; check the map against the "
            "label values `fedfms-secure data inspect %s` lists", site_dir, options.label_map.describe()["map"],
            site_dir,
        )
    if cache is not None:
        log.debug("slice cache %s: %s", cache.root, cache.stats)
    return SiteData(
        name=site_dir.name,
        train=train,
        val=val,
        num_volumes=loaded_train + loaded_val,
        image_size=image_size,
        preprocessing=options,
        skipped=skipped,
        cache_stats=cache.stats if cache is not None else None,
    )


def _usable_pairs(pairs: list[CasePair], *, skip_bad: bool, skipped: list[str]) -> list[CasePair]:
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
        skipped.append(message)
    return usable


def load_cases(
    pairs: list[CasePair],
    options: Preprocessing,
    *,
    skip_bad: bool = False,
    cache: SliceCache | None = None,
    skipped: list[str] | None = None,
    patient_of: dict[str, str] | None = None,
) -> tuple[SliceDataset, int]:
    """Slices of the given cases (from ``cache`` when it holds them), and how many cases loaded.
    ``patient_of`` maps a case name to its patient (default: the case is its own patient)."""
    images, labels, cases, patients = [], [], [], []
    size = options.image_size
    for pair in pairs:
        cached = cache.get(pair, options) if cache is not None else None
        if cached is not None:
            img, lab = cached
        else:
            try:
                img, lab = load_pair_slices(pair, options)
            except DataError as exc:
                if not skip_bad:
                    raise
                log.warning("skipping case %s: %s", pair.name, exc)
                if skipped is not None:
                    skipped.append(str(exc))
                continue
            img = img.half()  # halve the footprint before the next volume is read
            if cache is not None:
                cache.put(pair, options, img, lab)
        images.append(img)
        labels.append(lab)
        cases += [pair.name] * len(img)
        patients += [(patient_of or {}).get(pair.name, pair.name)] * len(img)
    loaded = len(images)
    if not images:
        images = [torch.zeros(0, 1, size, size, dtype=torch.float16)]
        labels = [torch.zeros(0, 1, size, size, dtype=torch.uint8)]
    return SliceDataset(torch.cat(images), torch.cat(labels), cases, patients), loaded


def _check_args(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1), e.g. 0.25.")
