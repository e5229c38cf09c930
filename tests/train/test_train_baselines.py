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
    assert [s["name"] for s in result["sites"]] == ["site_1", "site_3"]
    for site in result["sites"]:
        loaded = load_site(federation / site["name"], image_size=32, seed=0, keep_empty_every=0)
        assert (site["train_slices"], site["val_slices"]) == (len(loaded.train), len(loaded.val))
        assert 0 < site["epsilon"] <= 8.0
        assert set(FIELDS) <= set(site) and len(site["per_class"]) == 1
    assert result["epsilon"] == max(s["epsilon"] for s in result["sites"])
    assert set(result["mean"]) == {"dice_mean", "dice_std", "iou_mean", "hd95_mean"}
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
    assert main(["evaluate", "--model", str(broken), "--data", str(federation / "site_1")]) == 1
    assert str(broken) in capsys.readouterr().err
