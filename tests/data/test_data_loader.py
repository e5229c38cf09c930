"""load_site on real NIfTI and PNG files: shapes, ranges, slice selection, the volume split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedfms_secure.data import SiteData, SliceDataset, load_site
from fedfms_secure.errors import ConfigError, DataError

SIZE = 24


def _expected_slices(site: Path, keep_empty_every: int, axis: int = 2) -> int:
    total = 0
    for path in (site / "labelsTr").iterdir():
        label = np.moveaxis(np.asarray(nib.load(path).dataobj) > 0, axis, 0)
        fg = label.reshape(label.shape[0], -1).any(axis=1)
        empty = int((~fg).sum())
        kept_empty = math.ceil(empty / keep_empty_every) if keep_empty_every else 0
        total += int(fg.sum()) + kept_empty
    return total


def test_items_shapes_ranges_and_binary_labels(small_federation: list[Path]) -> None:
    data = load_site(small_federation[0], image_size=SIZE)
    assert isinstance(data, SiteData) and isinstance(data.train, SliceDataset)
    assert data.name == "site_1" and data.image_size == SIZE
    assert data.num_volumes == len(list((small_federation[0] / "imagesTr").iterdir()))
    image, label = data.train[0]
    assert image.shape == label.shape == (1, SIZE, SIZE)
    assert image.dtype == label.dtype == torch.float32
    for part in (data.train, data.val):
        images = torch.stack([part[i][0] for i in range(len(part))])
        labels = torch.stack([part[i][1] for i in range(len(part))])
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert set(labels.unique().tolist()) == {0.0, 1.0}
    # per-volume percentile scaling reaches both ends of [0, 1] on every volume
    for name in data.train.case_names:
        slices = data.train.images[[c == name for c in data.train.cases]].float()
        assert slices.max() > 0.95 and slices.min() < 0.05


def test_empty_slices_are_subsampled(small_federation: list[Path]) -> None:
    site = small_federation[1]
    for k in (5, 1, 0):
        data = load_site(site, image_size=SIZE, val_fraction=0.0, keep_empty_every=k)
        assert len(data.val) == 0
        assert len(data.train) == _expected_slices(site, k), k
    every_fifth = load_site(site, image_size=SIZE, val_fraction=0.0)
    all_slices = load_site(site, image_size=SIZE, val_fraction=0.0, keep_empty_every=1)
    assert len(every_fifth.train) < len(all_slices.train)
    along_x = load_site(site, image_size=SIZE, val_fraction=0.0, keep_empty_every=1, axis=0)
    assert len(along_x.train) == _expected_slices(site, 1, axis=0)


def test_split_is_by_volume_persisted_and_stable(
    small_federation: list[Path], tmp_path: Path
) -> None:
    site = small_federation[2]
    split_file = tmp_path / "splits" / "site_3.json"
    first = load_site(site, image_size=SIZE, split_file=split_file, seed=0)
    assert split_file.exists()
    pinned = json.loads(split_file.read_text())
    assert set(pinned["train"]).isdisjoint(pinned["val"]) and pinned["val"]
    assert first.train.case_names == pinned["train"]
    assert first.val.case_names == pinned["val"]
    assert set(first.train.cases).isdisjoint(first.val.cases)
    # another seed and fraction: the file wins, nothing moves
    again = load_site(site, image_size=SIZE, split_file=split_file, seed=99, val_fraction=0.5)
    assert again.train.case_names == first.train.case_names
    assert again.val.case_names == first.val.case_names
    assert json.loads(split_file.read_text()) == pinned


def test_different_seeds_give_different_splits(small_federation: list[Path]) -> None:
    site = max(small_federation, key=lambda s: len(list((s / "imagesTr").iterdir())))
    assert len(list((site / "imagesTr").iterdir())) >= 4
    vals = {tuple(load_site(site, image_size=8, seed=s).val.case_names) for s in range(4)}
    assert len(vals) > 1


def test_split_file_naming_a_missing_volume(small_federation: list[Path], tmp_path: Path) -> None:
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"format": 1, "train": ["case_000", "case_999"], "val": ["case_001"]}))
    with pytest.raises(DataError, match="case_999.*delete the split file"):
        load_site(small_federation[0], image_size=SIZE, split_file=split_file)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"format": 1, "train": "case_000", "val": []}, r"'train' must be a list of case names"),
        ({"format": 1, "train": ["case_000"], "val": [1]}, r"'val' must be a list of case names"),
        ({"format": 1, "train": ["case_000", "case_000"], "val": []}, "names a case twice"),
        ({"format": 2, "train": ["case_000"], "val": []}, "has format 2, this version reads format 1"),
        ({"train": ["case_000"], "val": []}, "has format None"),
        ({"format": True, "train": ["case_000"], "val": []}, "has format True"),
        (["case_000"], "is not a JSON object"),
    ],
)
def test_malformed_split_file_is_refused(
    small_federation: list[Path], tmp_path: Path, doc: object, message: str
) -> None:
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=rf"split file .*split.json.*{message}.*delete it"):
        load_site(small_federation[0], image_size=SIZE, split_file=split_file)


def test_png_site_loads(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        picture = (rng.random((40, 30)) * 255).astype(np.uint8)
        mask = np.zeros((40, 30), np.uint8)
        mask[: 10 + i, :] = 255  # a band across the top: tells rows from columns
        Image.fromarray(picture).save(tmp_path / "imagesTr" / f"img_{i}.png")
        Image.fromarray(mask).save(tmp_path / "labelsTr" / f"img_{i}.png")
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(tmp_path / "imagesTr" / "rgb.png")
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "labelsTr" / "rgb.png")
    data = load_site(tmp_path, image_size=SIZE, val_fraction=0.4)
    assert data.num_volumes == 5
    assert (len(data.train), len(data.val)) == (3, 2)
    image, label = data.train[0]
    assert image.shape == label.shape == (1, SIZE, SIZE)
    assert set(torch.cat([data.train[i][1] for i in range(3)]).unique().tolist()) <= {0.0, 1.0}
    # rows stay rows (PNG read as [H, W], not transposed): the top band stays on top
    for part in (data.train, data.val):
        for i, case in enumerate(part.cases):
            if case != "rgb":
                resized = part[i][1][0]
                assert resized[:3, :].all() and resized[-3:, :].sum() == 0, case


def test_invalid_arguments(small_federation: list[Path]) -> None:
    site = small_federation[0]
    for kwargs in ({"axis": 3}, {"val_fraction": 1.0}, {"keep_empty_every": -1}):
        with pytest.raises(ConfigError):
            load_site(site, image_size=SIZE, **kwargs)
    with pytest.raises(ConfigError):
        load_site(site, image_size=2)
