"""The slice cache: hits after the first read, a changed file re-read, corrupt entries rebuilt."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedfms_secure.data import load_site
from fedfms_secure.data.cache import SliceCache
from fedfms_secure.data.layout import list_cases
from fedfms_secure.data.preprocess import preprocessing_for

SIZE = 16


@pytest.fixture
def site(small_federation: list[Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_federation[1], tmp_path / "site"))


def _tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.cat([data.train.images, data.val.images]), torch.cat([data.train.labels, data.val.labels]))


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def test_second_read_hits_and_gives_the_same_slices(site: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before = _files(site)
    cold = load_site(site, image_size=SIZE, cache_dir=cache)
    n = cold.num_volumes
    assert (cold.cache_stats.hits, cold.cache_stats.misses, cold.cache_stats.writes) == (0, n, n)
    warm = load_site(site, image_size=SIZE, cache_dir=cache)
    assert (warm.cache_stats.hits, warm.cache_stats.misses, warm.cache_stats.writes) == (n, 0, 0)
    for a, b in zip(_tensors(cold), _tensors(warm)):
        assert torch.equal(a, b)
    assert warm.train.cases == cold.train.cases and warm.val.cases == cold.val.cases
    assert _files(site) == before  # nothing is written into the data folder
    assert len(list((cache / "slices").rglob("*.pt"))) == n
    # another option is another entry, not a hit
    other = load_site(site, image_size=SIZE, cache_dir=cache, clip_percentiles=(1, 99))
    assert (other.cache_stats.hits, other.cache_stats.misses) == (0, n)
    without = load_site(site, image_size=SIZE)
    assert without.cache_stats is None
    for a, b in zip(_tensors(cold), _tensors(without)):
        assert torch.equal(a, b)


def test_a_changed_file_is_read_again(site: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = load_site(site, image_size=SIZE, val_fraction=0.0, keep_empty_every=0, cache_dir=cache)
    label_path = site / "labelsTr" / "case_000.nii.gz"
    old = nib.load(label_path)
    grown = np.asarray(old.dataobj).copy()
    grown[:, :, :] = 0
    grown[4:12, 4:12, :] = 1  # foreground on every slice now
    nib.save(nib.Nifti1Image(grown, old.affine), label_path)
    stamp = os.stat(label_path)
    os.utime(label_path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    again = load_site(site, image_size=SIZE, val_fraction=0.0, keep_empty_every=0, cache_dir=cache)
    assert (again.cache_stats.hits, again.cache_stats.misses) == (first.num_volumes - 1, 1)
    assert again.train.cases.count("case_000") == grown.shape[2]
    assert again.train.cases.count("case_000") != first.train.cases.count("case_000")
    third = load_site(site, image_size=SIZE, val_fraction=0.0, keep_empty_every=0, cache_dir=cache)
    assert third.cache_stats.hits == first.num_volumes  # the rebuilt entry replaced the stale one


class _NotAllowed:
    """An object a weights-only load refuses to build."""


def test_corrupt_entries_are_discarded_and_rebuilt(site: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    cache_dir = tmp_path / "cache"
    fresh = load_site(site, image_size=SIZE, cache_dir=cache_dir)
    pairs = list_cases(site)
    options = preprocessing_for(site, image_size=SIZE)
    cache = SliceCache(cache_dir)
    entries = [cache.entry_path(p, options) for p in pairs[:3]]
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # truncated
    doc = torch.load(entries[1], weights_only=True)
    doc["images"] = doc["images"].clone()
    doc["images"][0, 0, 0, 0] += 0.25  # silently altered, checksum kept
    torch.save(doc, entries[1])
    torch.save({"format": 1, "images": _NotAllowed()}, entries[2])  # would need code to load
    with caplog.at_level(logging.WARNING, logger="fedfms_secure.data"):
        again = load_site(site, image_size=SIZE, cache_dir=cache_dir)
    assert again.cache_stats.discarded == 3 and again.cache_stats.writes == 3
    assert again.cache_stats.hits == fresh.num_volumes - 3
    for a, b in zip(_tensors(fresh), _tensors(again)):
        assert torch.equal(a, b)
    corrupt = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(corrupt) == 3 and all(str(cache_dir) in m for m in corrupt)
    assert load_site(site, image_size=SIZE, cache_dir=cache_dir).cache_stats.hits == fresh.num_volumes


def test_an_unwritable_cache_is_a_warning(site: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    with caplog.at_level(logging.WARNING, logger="fedfms_secure.data"):
        data = load_site(site, image_size=SIZE, cache_dir=blocker / "cache")
    assert len(data.train) > 0 and data.cache_stats.writes == 0
    assert sum("cannot be written" in r.getMessage() for r in caplog.records) == 1
