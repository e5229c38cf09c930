"""Which patient each slice belongs to: volumes, grouped PNG files, the split by patient."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedfms_secure.data import load_site, synth_federation
from fedfms_secure.errors import DataError
from fedfms_secure.privacy.planning import plan_records
from fedfms_secure.privacy.units import records

SIZE = 24


def _png_site(root: Path, patients: int, per_patient: int) -> Path:
    """``patients`` x ``per_patient`` pictures named p<k>_s<j>.png, each with a foreground band."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for k in range(patients):
        for j in range(per_patient):
            mask = np.zeros((32, 32), np.uint8)
            mask[: 8 + j, :] = 1
            name = f"p{k}_s{j}.png"
            Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(root / "imagesTr" / name)
            Image.fromarray(mask).save(root / "labelsTr" / name)
    return root


def test_a_volume_is_one_patient_and_records_count_patients(tmp_path: Path) -> None:
    (site,) = synth_federation(tmp_path, sites=1, seed=0, shape=(32, 32, 8), volumes=(6, 6))
    data = load_site(site, image_size=SIZE, val_fraction=0.25)
    assert data.train.patients == data.train.cases
    assert records(data.train, "patient") == len(set(data.train.cases)) < len(data.train)
    assert records(data.train, "slice") == len(data.train)
    plan = plan_records(data.train, unit="patient", batch_size=32)
    # the expected number of patients per step is capped at the patients there are
    assert plan.records == plan.expected_per_step == len(set(data.train.cases)) and plan.sample_rate == 1.0
    plan = plan_records(data.train, unit="patient", batch_size=2)
    assert plan.sample_rate == pytest.approx(2 / plan.records)


def test_png_files_are_grouped_by_a_pattern_and_split_by_patient(tmp_path: Path) -> None:
    site = _png_site(tmp_path / "s", patients=8, per_patient=3)
    data = load_site(site, image_size=SIZE, val_fraction=0.25, patient_pattern=r"^(?P<patient>p\d+)_")
    train_patients, val_patients = set(data.train.patients), set(data.val.patients)
    assert len(train_patients) == 6 and len(val_patients) == 2 and not train_patients & val_patients
    assert len(data.train) == 18 and records(data.train, "patient") == 6
    assert all(case.startswith(patient + "_") for case, patient in zip(data.train.cases, data.train.patients))


def test_png_files_are_grouped_by_dataset_json(tmp_path: Path) -> None:
    site = _png_site(tmp_path / "s", patients=4, per_patient=2)
    training = [{"image": f"./imagesTr/p{k}_s{j}.png", "label": f"./labelsTr/p{k}_s{j}.png", "patient": f"P{k}"}
                for k in range(4) for j in range(2)]
    (site / "dataset.json").write_text(json.dumps({"training": training}))
    data = load_site(site, image_size=SIZE, val_fraction=0.0)
    assert sorted(set(data.train.patients)) == ["P0", "P1", "P2", "P3"] and len(data.train) == 8


def test_without_grouping_each_file_is_its_own_patient_and_the_log_says_so(tmp_path: Path, caplog) -> None:
    site = _png_site(tmp_path / "s", patients=3, per_patient=2)
    with caplog.at_level(logging.INFO, logger="fedfms_secure.data"):
        data = load_site(site, image_size=SIZE, val_fraction=0.0)
    assert records(data.train, "patient") == 6
    assert "each 2-D file is its own patient" in caplog.text and "--patient-pattern" in caplog.text


def test_a_pattern_that_misses_a_file_says_which(tmp_path: Path) -> None:
    site = _png_site(tmp_path / "s", patients=2, per_patient=1)
    (site / "imagesTr" / "p0_s0.png").rename(site / "imagesTr" / "other.png")
    (site / "labelsTr" / "p0_s0.png").rename(site / "labelsTr" / "other.png")
    with pytest.raises(DataError, match="does not match the file name 'other.png'"):
        load_site(site, image_size=SIZE, patient_pattern=r"^(p\d+)_")
    with pytest.raises(DataError, match="is not a regular expression"):
        load_site(site, image_size=SIZE, patient_pattern=r"(")
