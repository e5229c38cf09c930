"""`fedfms-secure train central|local` and `evaluate` on a tiny synthetic federation (1 epoch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedfms_secure.cli import main
from fedfms_secure.data import load_site, synth_federation
from fedfms_secure.train.baselines import BaselineOptions
from fedfms_secure.errors import ConfigError

FIELDS = ("dice_mean", "dice_std", "iou_mean", "iou_std", "hd95_mean", "hd95_std")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fed")
    synth_federation(root, sites=3, seed=5, shape=(32, 32, 8))
    return root


def test_train_local_with_dp_and_a_held_out_site(federation: Path, capsys) -> None:
    assert main(["train", "local", "--data", str(federation), "--holdout", "site_2", "--epochs", "1",
                 "--epsilon", "8", "--image-size", "32", "--keep-empty-every", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "local" and result["options"]["epsilon"] == 8.0
    assert result["unit"] == "patient" and result["options"]["privacy_unit"] == "patient"
    assert [s["name"] for s in result["sites"]] == ["site_1", "site_3"]
    for site in result["sites"]:
        loaded = load_site(federation / site["name"], image_size=32, seed=0, keep_empty_every=0)
        assert (site["train_slices"], site["val_slices"]) == (len(loaded.train), len(loaded.val))
        assert site["train_patients"] == len(set(loaded.train.cases)) < site["train_slices"]
        assert 0 < site["epsilon"] <= 8.0
        assert set(FIELDS) <= set(site) and len(site["per_class"]) == 1
    assert result["epsilon"] == max(s["epsilon"] for s in result["sites"])
    assert set(result["mean"]) == set(FIELDS)  # mean and standard deviation over images of every metric
    held = result["holdout"]
    assert held["name"] == "site_2" and held["train_slices"] == 0
    everything = load_site(federation / "site_2", image_size=32, val_fraction=0.0, keep_empty_every=0)
    assert held["val_slices"] == len(everything.train)
    assert result["seconds"] > 0


def test_train_central_text_output_and_bad_files(federation: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "fed"
    for site in ("site_1", "site_3"):
        shutil.copytree(federation / site, data / site)
    bad = data / "site_3" / "imagesTr" / "case_001.nii.gz"
    bad.write_bytes(b"not a volume")
    assert main(["train", "central", "--data", str(data), "--epochs", "1"]) == 1
    assert str(bad) in capsys.readouterr().err
    assert main(["train", "central", "--data", str(data), "--epochs", "1", "--skip-bad", "--image-size", "32",
                 "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["site", "Dice", "IoU", "HD95", "(px)"]
    assert "site_1" in out and "site_3" in out and "mean (images)" in out and "no DP" in out
    saved = json.loads((tmp_path / "o" / "central.json").read_text())
    n3 = load_site(data / "site_3", image_size=32, skip_bad=True)
    assert saved["sites"][1]["train_slices"] == len(n3.train)
    assert sorted(p.name for p in (tmp_path / "o" / "splits").iterdir()) == ["site_1.json", "site_3.json"]


def test_wrong_holdout_and_options_are_named(federation: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "central", "--data", str(federation), "--holdout", "site_9", "--epochs", "1"]) == 1
    assert "site_9" in (err := capsys.readouterr().err) and "site_1, site_2, site_3" in err
    with pytest.raises(ConfigError, match="gap"):
        BaselineOptions(labels='{"1": 2}')
    with pytest.raises(ConfigError, match="LOW < HIGH"):
        BaselineOptions(clip_percentiles=(99, 1))
    broken = tmp_path / "model.pt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    assert main(["evaluate", "--model", str(broken), "--data", str(federation / "site_1"), "--split", "all"]) == 1
    assert str(broken) in capsys.readouterr().err


def _mixed_federation(root: Path) -> Path:
    """Three sites of three-class label maps (values 0..3): NIfTI volumes, PNG pictures, and a site
    of a single volume (so no validation split)."""
    import nibabel as nib
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def case(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        grid = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
        image, label = rng.normal(100.0, 10.0, shape), np.zeros(shape, np.uint8)
        for value, (cx, cy) in enumerate(((8, 8), (8, 22), (22, 15)), start=1):
            disc = (grid[0] - cx) ** 2 + (grid[1] - cy) ** 2 < 25
            if len(shape) == 3:
                disc &= (grid[2] >= 1) & (grid[2] < shape[2] - 1)
            label[disc], image[disc] = value, 100.0 + 60 * value
        return image, label

    for site, n in (("a_nifti", 3), ("b_png", 3), ("c_one", 1)):
        for sub in ("imagesTr", "labelsTr"):
            (root / site / sub).mkdir(parents=True)
        for i in range(n):
            if site == "b_png":
                image, label = case((30, 30))
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / site / "imagesTr" / f"p{i}.png")
                Image.fromarray(label).save(root / site / "labelsTr" / f"p{i}.png")
            else:
                image, label = case((30, 30, 5))
                affine = np.diag([0.8, 0.8, 3.0, 1.0])
                nib.save(nib.Nifti1Image(image.astype(np.int16), affine), root / site / "imagesTr" / f"v{i}.nii.gz")
                nib.save(nib.Nifti1Image(label, affine), root / site / "labelsTr" / f"v{i}.nii.gz")
    return root


def test_three_classes_over_nifti_png_and_a_one_volume_site(tmp_path: Path, capsys) -> None:
    data = _mixed_federation(tmp_path / "mixed")
    labels = '{"1": 1, "2": 2, "3": 3}'
    out = tmp_path / "o"
    assert main(["train", "central", "--data", str(data), "--epochs", "1", "--image-size", "32", "--labels", labels,
                 "--out", str(out), "--json"]) == 0
    printed = capsys.readouterr().out

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    result = json.loads(printed, parse_constant=strict)  # NaN would not parse in jq or a browser
    assert json.loads((out / "central.json").read_text(), parse_constant=strict) == result
    rows = {row["name"]: row for row in result["sites"]}
    assert sorted(rows) == ["a_nifti", "b_png", "c_one"]
    assert (rows["b_png"]["train_slices"], rows["b_png"]["val_slices"]) == (2, 1)  # one slice per picture
    assert rows["c_one"]["train_slices"] == 4 and rows["c_one"]["val_slices"] == 0  # 3 with labels + 1 empty
    for row in rows.values():
        assert [c["name"] for c in row["per_class"]] == ["label 1", "label 2", "label 3"]
    assert all(rows["c_one"][key] is None for key in FIELDS)  # nothing to score: null, not NaN
    for name in ("a_nifti", "b_png"):
        assert all(0.0 <= rows[name]["per_class"][k]["dice_mean"] <= 1.0 for k in range(3))
    assert all(result["mean"][key] is not None for key in FIELDS)

    assert main(["evaluate", "--model", str(out / "central_model.pt"), "--data", str(data / "c_one"), "--split", "all",
                 "--json"]) == 0
    scored = json.loads(capsys.readouterr().out, parse_constant=strict)["sites"][0]
    assert scored["slices"] == 4 and len(scored["per_class"]) == 3
    assert main(["train", "central", "--data", str(data), "--epochs", "1", "--image-size", "32", "--labels", labels,
                 "--holdout", "a_nifti"]) == 0
    table = capsys.readouterr().out.splitlines()
    mean_row = next(line for line in table if line.startswith("mean (images)"))
    assert mean_row.count("±") == 3  # Dice, IoU and HD95 each with their standard deviation over images
    assert next(line for line in table if line.startswith("c_one")).split()[1:] == ["-", "-", "-"]
    assert any(line.startswith("held out: a_nifti") for line in table)
