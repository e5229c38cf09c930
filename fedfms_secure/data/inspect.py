"""``fedfms-secure data inspect``: what a folder of site folders holds, and what is wrong with it.

Every pair is read as the loader reads it, but a problem (an image without a label, a corrupt or
unreadable file, mismatched shapes, an empty label) is listed with the file it concerns instead of
stopping the inspection; the slice counts are those :func:`~fedfms_secure.data.load_site` gives
with ``skip_bad=True`` (the split drawn from ``seed``, as a site's first run would draw it).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fedfms_secure.data.layout import expected_label, find_sites, list_cases
from fedfms_secure.data.loader import load_site
from fedfms_secure.data.preprocess import read_array
from fedfms_secure.errors import DataError

MAX_LABEL_VALUES = 32


def inspect_federation(data_dir: Path, **options: Any) -> dict[str, Any]:
    """``{"sites": [inspect_site(...) for each site folder]}``."""
    return {"sites": [inspect_site(site, **options) for site in find_sites(Path(data_dir))]}


def inspect_site(site_dir: Path, *, image_size: int = 64, axis: int = 2, keep_empty_every: int = 5,
                 val_fraction: float = 0.25, seed: int = 0) -> dict[str, Any]:
    """Numbers and problems of one site folder."""
    site_dir = Path(site_dir)
    problems: list[dict[str, str]] = []
    shapes: Counter[str] = Counter()
    values: set[float] = set()
    foreground = voxels = readable = 0
    try:
        pairs = list_cases(site_dir)
    except DataError as exc:
        pairs = []
        problems.append({"file": str(site_dir), "problem": str(exc)})
    for pair in pairs:
        if pair.label is None:
            problems.append({"file": str(pair.image),
                             "problem": f"no label: expected {expected_label(pair.image)}"})
            continue
        try:
            image, label = read_array(pair.image), read_array(pair.label)
        except DataError as exc:
            problems.append({"file": str(pair.image), "problem": str(exc)})
            continue
        if image.shape != label.shape:
            problems.append({"file": str(pair.label),
                             "problem": f"label shape {label.shape} differs from the image's {image.shape}"})
            continue
        readable += 1
        shapes[" x ".join(map(str, image.shape[1:]))] += 1  # read_array gives channel-first arrays
        if len(values) <= MAX_LABEL_VALUES:
            values.update(float(v) for v in np.unique(label)[: MAX_LABEL_VALUES + 1])
        fg = int(np.count_nonzero(label > 0))
        if fg == 0:
            problems.append({"file": str(pair.label), "problem": "the label is empty (no foreground voxel)"})
        foreground += fg
        voxels += label.size
    train = val = 0
    try:
        data = load_site(site_dir, image_size=image_size, axis=axis, keep_empty_every=keep_empty_every,
                         val_fraction=val_fraction, seed=seed, skip_bad=True)
        train, val = len(data.train), len(data.val)
    except DataError as exc:
        problems.append({"file": str(site_dir), "problem": str(exc)})
    return {
        "name": site_dir.name,
        "path": str(site_dir),
        "volumes": len(pairs),
        "readable_volumes": readable,
        "train_slices": train,
        "val_slices": val,
        "image_shapes": dict(shapes),
        "label_values": sorted(values)[:MAX_LABEL_VALUES],
        "foreground_fraction": foreground / voxels if voxels else 0.0,
        "problems": problems,
    }
