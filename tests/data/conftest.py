"""Shared fixtures for the data tests: a small synthetic federation written once per session, and
an MSD-style task written directly with nibabel (conventions our generator does not use)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedfms_secure.data import synth_federation

SMALL_SHAPE = (32, 32, 12)


@pytest.fixture(scope="session")
def small_federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synthetic sites (read-only: tests that modify files copy a site first)."""
    return synth_federation(tmp_path_factory.mktemp("fed"), sites=3, seed=7, shape=SMALL_SHAPE)


# An MSD "Task03_Liver"-like task cut into three sites. Unlike synth_federation: int16 CT values in
# Hounsfield units, labels {0, 1 liver, 2 tumour}, another size for every case, non-unit spacing
# and oblique / flipped affines, MSD's dataset.json ("labels" by value, a "training" list), the
# AppleDouble "._*" files the MSD tarballs carry, and nnU-Net's "_0000" channel suffix at one site.
MSD_SHAPES = {
    "site_a": [(40, 36, 10), (44, 40, 12), (36, 36, 9)],
    "site_b": [(48, 40, 11), (40, 44, 10), (38, 34, 12), (42, 42, 8)],
    "site_c": [(36, 40, 10), (40, 38, 9)],
}
MSD_LABELS = {"0": "background", "1": "liver", "2": "tumour"}


def _oblique_affine(spacing: tuple[float, float, float], angle_deg: float, origin: tuple[float, float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-spacing[0], -spacing[1], spacing[2]])  # LPS-like flips, as CT stores
    affine[:3, 3] = origin
    return affine


def _liver_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    nx, ny, nz = shape
    body = ((x - nx / 2) / (0.45 * nx)) ** 2 + ((y - ny / 2) / (0.45 * ny)) ** 2 < 1
    cx, cy = rng.uniform(0.4, 0.6) * nx, rng.uniform(0.4, 0.6) * ny
    liver = ((x - cx) / (0.25 * nx)) ** 2 + ((y - cy) / (0.2 * ny)) ** 2 + ((z - nz / 2) / (0.3 * nz)) ** 2 < 1
    tumour = ((x - cx) / 3.0) ** 2 + ((y - cy) / 3.0) ** 2 + ((z - nz / 2) / 1.5) ** 2 < 1
    label = np.zeros(shape, np.uint8)
    label[liver] = 1
    label[tumour & liver] = 2
    hu = np.full(shape, -1000.0)  # air
    hu[body] = -80.0  # fat
    hu[liver] = 55.0
    hu[tumour & liver] = 110.0
    hu += rng.normal(0.0, 15.0, shape)
    return np.clip(hu, -1024, 3071).astype(np.int16), label


def write_msd_task(root: Path, seed: int = 0) -> list[Path]:
    """Write ``root/site_a``, ``site_b`` (nnU-Net ``_0000`` suffix) and ``site_c``; returns them."""
    rng = np.random.default_rng(seed)
    sites = []
    case = 0
    for k, (site, shapes) in enumerate(MSD_SHAPES.items()):
        folder = root / site
        (folder / "imagesTr").mkdir(parents=True)
        (folder / "labelsTr").mkdir()
        training = []
        for shape in shapes:
            name = f"liver_{case:03d}"
            case += 1
            image, label = _liver_case(rng, shape)
            affine = _oblique_affine((0.7 + 0.1 * k, 0.7 + 0.1 * k, 2.5), angle_deg=10.0 * k,
                                     origin=(120.0, 95.0 - k, -300.0 + 20 * case))
            img = nib.Nifti1Image(image, affine)
            img.set_data_dtype(np.int16)
            lab = nib.Nifti1Image(label, affine)
            lab.set_data_dtype(np.uint8)
            image_name = f"{name}_0000.nii.gz" if site == "site_b" else f"{name}.nii.gz"
            nib.save(img, folder / "imagesTr" / image_name)
            nib.save(lab, folder / "labelsTr" / f"{name}.nii.gz")
            (folder / "imagesTr" / f"._{image_name}").write_bytes(b"\x00\x05\x16\x07AppleDouble")
            training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
        doc = {
            "name": "LiverLike", "description": "test fixture in the MSD Task03_Liver format",
            "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": MSD_LABELS,
            "numTraining": len(shapes), "numTest": 0, "training": training, "test": [],
        }
        (folder / "dataset.json").write_text(json.dumps(doc, indent=4))
        sites.append(folder)
    return sites


@pytest.fixture(scope="session")
def msd_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the three MSD-style sites (read-only: copy before modifying)."""
    root = tmp_path_factory.mktemp("msd")
    write_msd_task(root)
    return root


@pytest.fixture
def msd_copy(msd_task: Path, tmp_path: Path) -> Path:
    """A writable copy of the MSD-style task."""
    return Path(shutil.copytree(msd_task, tmp_path / "msd"))
