"""Broken sites: corrupt files, missing labels, shape mismatches, nothing usable."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedfms_secure.data import load_site
from fedfms_secure.data.preprocess import normalize_intensity
from fedfms_secure.errors import DataError

SIZE = 16


@pytest.fixture
def site(small_federation: list[Path], tmp_path: Path) -> Path:
    """A writable copy of a synthetic site."""
    return Path(shutil.copytree(small_federation[0], tmp_path / "site"))


def _n_cases(site: Path) -> int:
    return len(list((site / "imagesTr").iterdir()))


def test_corrupt_volume_named_and_skippable(
    site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = site / "imagesTr" / "case_001.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file" * 20)
    with pytest.raises(DataError, match=r"case_001\.nii\.gz") as err:
        load_site(site, image_size=SIZE)
    assert "corrupt" in str(err.value)
    # the NIfTI reader's own complaint, not MONAI's fallback through every other reader (which
    # tells the user to install reader libraries and runs to kilobytes of tracebacks)
    assert "not a gzip file" in str(err.value)
    assert "install" not in str(err.value) and "Traceback" not in str(err.value)
    assert len(str(err.value)) < 500
    with caplog.at_level(logging.WARNING, logger="fedfms_secure.data"):
        data = load_site(site, image_size=SIZE, skip_bad=True)
    assert data.num_volumes == _n_cases(site) - 1
    assert "case_001" not in data.train.cases + data.val.cases
    assert any("case_001" in r.getMessage() for r in caplog.records)


def test_truncated_label_is_reported(site: Path) -> None:
    label = site / "labelsTr" / "case_000.nii.gz"
    label.write_bytes(label.read_bytes()[:200])
    with pytest.raises(DataError, match=r"labelsTr.case_000\.nii\.gz"):
        load_site(site, image_size=SIZE)


def test_image_without_label(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    (site / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case_002\.nii\.gz has no label"):
        load_site(site, image_size=SIZE)
    with caplog.at_level(logging.WARNING, logger="fedfms_secure.data"):
        data = load_site(site, image_size=SIZE, skip_bad=True)
    assert data.num_volumes == _n_cases(site) - 1
    assert any("case_002" in r.getMessage() for r in caplog.records)


def test_nnunet_image_without_label_names_the_expected_label(tmp_path: Path) -> None:
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    volume = nib.Nifti1Image(np.random.rand(8, 8, 3).astype(np.float32), np.eye(4))
    nib.save(volume, tmp_path / "imagesTr" / "case_7_0000.nii.gz")
    expected = tmp_path / "labelsTr" / "case_7.nii.gz"
    with pytest.raises(DataError, match="has no label") as err:
        load_site(tmp_path, image_size=SIZE)
    assert f"(expected {expected})" in str(err.value)


def test_zero_size_volume_is_named(site: Path) -> None:
    bad = site / "imagesTr" / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 0, 3), np.float32), np.eye(4)), bad)
    with pytest.raises(DataError, match=r"imagesTr.case_001\.nii\.gz holds no voxels"):
        load_site(site, image_size=SIZE)
    assert load_site(site, image_size=SIZE, skip_bad=True).num_volumes == _n_cases(site) - 1
    with pytest.raises(DataError, match="empty volume"):
        normalize_intensity(np.zeros((0, 4), np.float32))


def test_shape_mismatch(site: Path) -> None:
    label = site / "labelsTr" / "case_000.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.uint8), np.eye(4)), label)
    with pytest.raises(DataError, match=r"shape mismatch.*labelsTr.case_000\.nii\.gz"):
        load_site(site, image_size=SIZE)
    assert load_site(site, image_size=SIZE, skip_bad=True).num_volumes == _n_cases(site) - 1


def test_missing_labels_folder(site: Path) -> None:
    shutil.rmtree(site / "labelsTr")
    with pytest.raises(DataError, match="labelsTr"):
        load_site(site, image_size=SIZE)


def test_site_without_usable_slices(tmp_path: Path) -> None:
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    for i in range(2):
        name = f"case_{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.random.rand(8, 8, 3).astype(np.float32), np.eye(4)),
                 tmp_path / "imagesTr" / name)
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.uint8), np.eye(4)),
                 tmp_path / "labelsTr" / name)
    with pytest.raises(DataError, match="no usable training slice"):
        load_site(tmp_path, image_size=SIZE, keep_empty_every=0)
    for i in range(2):
        (tmp_path / "imagesTr" / f"case_{i}.nii.gz").write_bytes(b"junk")
    with pytest.raises(DataError, match="no usable training slice"):
        load_site(tmp_path, image_size=SIZE, skip_bad=True)


def test_label_stored_in_another_orientation(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    label_path = site / "labelsTr" / "case_001.nii.gz"
    label = nib.load(label_path)
    flipped = label.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])  # same grid size, x axis reversed
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), flipped), label_path)
    with pytest.raises(DataError, match=r"orientation mismatch: label .*labelsTr.case_001\.nii\.gz"):
        load_site(site, image_size=SIZE)
    assert load_site(site, image_size=SIZE, skip_bad=True).num_volumes == _n_cases(site) - 1
    # another spacing with the same orientation is used voxel for voxel, with a warning
    shifted = label.affine.copy()
    shifted[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), label_path)
    with caplog.at_level(logging.WARNING, logger="fedfms_secure.data"):
        assert load_site(site, image_size=SIZE).num_volumes == _n_cases(site)
    assert any("case_001" in r.getMessage() and "spacing or origin" in r.getMessage() for r in caplog.records)


def test_corrupt_png_named_and_skippable(tmp_path: Path) -> None:
    from PIL import Image

    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    for i in range(3):
        mask = np.zeros((20, 20), np.uint8)
        mask[5:12, 5:12] = 255
        Image.fromarray((np.random.default_rng(i).random((20, 20)) * 255).astype(np.uint8)).save(
            tmp_path / "imagesTr" / f"p{i}.png")
        Image.fromarray(mask).save(tmp_path / "labelsTr" / f"p{i}.png")
    (tmp_path / "labelsTr" / "p1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    with pytest.raises(DataError, match=r"cannot read .*labelsTr.p1\.png") as err:
        load_site(tmp_path, image_size=SIZE)
    assert "install" not in str(err.value) and "NibabelReader" not in str(err.value)
    data = load_site(tmp_path, image_size=SIZE, skip_bad=True, val_fraction=0.0)
    assert data.num_volumes == 2 and "p1" not in data.train.cases
    assert len(data.skipped) == 1 and "p1.png" in data.skipped[0]
