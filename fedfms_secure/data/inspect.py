"""``fedfms-secure data inspect``: what a folder of site folders holds, and what is wrong with it.

Every pair is read as the loader reads it, but a problem (an image without a label, a corrupt or
unreadable file, mismatched shapes or orientations, an empty label, a ``dataset.json`` that lists
files that are not there, a site left without validation slices) is listed with the file it concerns instead of stopping the inspection;
the slice counts are those :func:`~fedfms_secure.data.load_site` gives with ``skip_bad=True`` (the
split drawn from ``seed``, as a site's first run would draw it).

Numbers per site: ``volumes`` (cases in ``imagesTr/``), ``readable_volumes`` (pairs that read and
match), ``train_slices`` / ``val_slices``, ``image_shapes`` (spatial shape -> count),
``label_values`` (the distinct values stored in the label files, before any mapping),
``foreground_fraction`` (voxels of a readable pair's label that the label map makes foreground,
over all voxels of those labels) and ``class_fractions`` (the same per class, by class name).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fedfms_secure.data.labels import DATASET_JSON, resolve_label_map
from fedfms_secure.data.layout import IMAGES_DIR, expected_label, find_sites, list_cases
from fedfms_secure.data.loader import load_site
from fedfms_secure.data.preprocess import CLIP_PERCENTILES, _to_single_channel, check_pair, read_volume
from fedfms_secure.errors import DataError

MAX_LABEL_VALUES = 32


def inspect_federation(data_dir: Path, **options: Any) -> dict[str, Any]:
    """``{"sites": [inspect_site(...) for each site folder]}``."""
    return {"sites": [inspect_site(site, **options) for site in find_sites(Path(data_dir))]}


def inspect_site(site_dir: Path, *, image_size: int = 64, axis: int = 2, keep_empty_every: int = 5,
                 val_fraction: float = 0.25, seed: int = 0, labels: Any = None,
                 clip_percentiles: Any = CLIP_PERCENTILES, cache_dir: Path | None = None) -> dict[str, Any]:
    """Numbers and problems of one site folder (see the module docstring)."""
    site_dir = Path(site_dir)
    problems: list[dict[str, str]] = []
    shapes: Counter[str] = Counter()
    values: set[float] = set()
    label_map = None
    try:
        label_map = resolve_label_map(labels, site_dir)
    except DataError as exc:  # a name this site's dataset.json does not define
        problems.append({"file": str(site_dir / DATASET_JSON), "problem": str(exc)})
    per_class = np.zeros(label_map.num_classes if label_map else 1, dtype=np.int64)
    voxels = readable = 0
    listed = True
    try:
        pairs = list_cases(site_dir)
    except DataError as exc:
        pairs, listed = [], False
        problems.append({"file": str(site_dir), "problem": str(exc)})
    problems += _dataset_json_problems(site_dir, len(pairs))
    for pair in pairs:
        if pair.label is None:
            problems.append({"file": str(pair.image),
                             "problem": f"no label: expected {expected_label(pair.image)}"})
            continue
        try:
            image, image_affine = read_volume(pair.image)
        except DataError as exc:
            problems.append({"file": str(pair.image), "problem": str(exc)})
            continue
        try:
            label, label_affine = read_volume(pair.label)
            image = _to_single_channel(image, pair.image, is_label=False)
            label = _to_single_channel(label, pair.label, is_label=True)
        except DataError as exc:
            problems.append({"file": str(pair.label), "problem": str(exc)})
            continue
        if image.shape != label.shape:
            problems.append({"file": str(pair.label),
                             "problem": f"label shape {label.shape} differs from the image's {image.shape} "
                                        f"({pair.image}); resample the label onto the image grid or remove the pair"})
            continue
        try:
            warning = check_pair(pair.image, image.shape, image_affine, pair.label, label.shape, label_affine)
        except DataError as exc:
            problems.append({"file": str(pair.label), "problem": str(exc)})
            continue
        if warning:
            problems.append({"file": str(pair.label), "problem": warning})
        readable += 1
        shapes[" x ".join(map(str, image.shape))] += 1
        if len(values) <= MAX_LABEL_VALUES:
            values.update(float(v) for v in np.unique(label)[: MAX_LABEL_VALUES + 1])
        voxels += label.size
        if label_map is None:
            continue
        classes = label_map.apply(label)
        counts = np.bincount(classes.ravel(), minlength=label_map.num_classes + 1)[1:]
        if counts.sum() == 0:
            what = "no foreground voxel" if label_map.pairs is None else "no voxel of the mapped label values"
            problems.append({"file": str(pair.label), "problem": f"the label is empty ({what})"})
        per_class += counts[: label_map.num_classes]
    train = val = 0
    if label_map is not None and listed:  # (a folder that cannot be listed is reported above)
        try:
            data = load_site(site_dir, image_size=image_size, axis=axis, keep_empty_every=keep_empty_every,
                             val_fraction=val_fraction, seed=seed, skip_bad=True, labels=label_map,
                             clip_percentiles=clip_percentiles, cache_dir=cache_dir)
            train, val = len(data.train), len(data.val)
        except DataError as exc:
            problems.append({"file": str(site_dir), "problem": str(exc)})
        else:
            if val == 0 and val_fraction > 0:
                problems.append({"file": str(site_dir), "problem": (
                    f"no validation slice ({data.num_volumes} usable volume(s); the split holds out one "
                    "only from two on), so this site's validation scores will be empty (NaN); add volumes, "
                    "or use the site as a held-out site (--holdout)")})
    names = list(label_map.names) if label_map else []
    return {
        "name": site_dir.name,
        "path": str(site_dir),
        "volumes": len(pairs),
        "readable_volumes": readable,
        "train_slices": train,
        "val_slices": val,
        "image_shapes": dict(shapes),
        "label_values": sorted(values)[:MAX_LABEL_VALUES],
        "classes": names,
        "foreground_fraction": float(per_class.sum()) / voxels if voxels else 0.0,
        "class_fractions": {name: float(n) / voxels if voxels else 0.0 for name, n in zip(names, per_class)},
        "problems": problems,
    }


def _dataset_json_problems(site_dir: Path, cases_on_disk: int) -> list[dict[str, str]]:
    """What a site's ``dataset.json`` claims that the folder does not hold."""
    path = site_dir / DATASET_JSON
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [{"file": str(path), "problem": f"not valid JSON ({exc}); fix it or remove it (it is optional)"}]
    if not isinstance(doc, dict):
        return [{"file": str(path), "problem": "not a JSON object; fix it or remove it (it is optional)"}]
    problems = []
    training = doc.get("training")
    if isinstance(training, list):
        for entry in training:
            if not isinstance(entry, dict):
                continue
            for key in ("image", "label"):
                rel = entry.get(key)
                if isinstance(rel, str) and not _listed_file_exists(site_dir, rel, is_image=key == "image"):
                    problems.append({"file": str(site_dir / rel),
                                     "problem": f"listed in {DATASET_JSON} ('training', {key!r}) but missing"})
    declared = doc.get("numTraining")
    if isinstance(declared, int) and not isinstance(declared, bool) and declared != cases_on_disk:
        problems.append({"file": str(path), "problem": f"numTraining is {declared} but {IMAGES_DIR}/ holds "
                                                       f"{cases_on_disk} case(s)"})
    return problems


def _listed_file_exists(site_dir: Path, rel: str, *, is_image: bool) -> bool:
    path = site_dir / rel
    if path.is_file():
        return True
    if not is_image:
        return False
    # nnU-Net v1 lists "./imagesTr/case.nii.gz" for the file case_0000.nii.gz
    for suffix in (".nii.gz", ".nii", ".png"):
        if path.name.lower().endswith(suffix):
            stem = path.name[: -len(suffix)]
            return (path.parent / f"{stem}_0000{path.name[len(stem):]}").is_file()
    return False


__all__ = ["inspect_federation", "inspect_site"]
