"""Label maps: specs, names from dataset.json (MSD and nnU-Net v2 forms), and the loaded classes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedfms_secure.data import load_site, num_classes_of, resolve_label_map
from fedfms_secure.errors import ConfigError, DataError

SIZE = 16


def test_specs_map_values_to_classes() -> None:
    label = np.array([[0, 1, 2], [3, 2.0001, 255]])
    default = resolve_label_map(None)
    assert default.num_classes == 1 and default.apply(label).tolist() == [[0, 1, 1], [1, 1, 1]]
    merged = resolve_label_map("1,2")
    assert merged.apply(label).tolist() == [[0, 1, 1], [0, 1, 0]]
    assert merged.names == ("label 1+label 2",)
    multi = resolve_label_map('{"1": 1, "2": 1, "3": 2}')
    assert multi.num_classes == 2 and multi.apply(label).tolist() == [[0, 1, 1], [2, 1, 0]]
    assert resolve_label_map({"255": 1}).apply(label).tolist() == [[0, 0, 0], [0, 0, 1]]
    assert [num_classes_of(s) for s in (None, "", "2", '{"1": 1, "4": 3, "5": 2}')] == [1, 1, 1, 3]


def test_a_map_in_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"1": 2, "2": 1}))
    assert resolve_label_map(str(path)).apply(np.array([1, 2])).tolist() == [2, 1]
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_label_map(str(tmp_path / "missing.json"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ('{"1": 1, "2": 3}', r"uses classes \[1, 3\] but not \[2\]"),
        ('{"1": 5}', "not a class; classes are integers 0..4"),
        ('{"1": true}', "not a class"),
        ('{"1": 0}', "maps every value to background"),
        ("{1: 1}", "not valid JSON"),
        ("1,,2", "empty entry"),
        ("[1, 2]", None),
        ('{"-1": 1}', "negative"),
    ],
)
def test_malformed_specs_say_what_to_write(spec: str, message: str | None) -> None:
    with pytest.raises((ConfigError, DataError), match=message):
        resolve_label_map(spec)


def _site(tmp_path: Path, labels_doc: dict | None) -> Path:
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir(parents=True)
    label = np.zeros((12, 12, 4), np.uint8)
    label[2:6, 2:6, 1:3] = 1
    label[7:10, 7:10, 1:3] = 2
    label[3:5, 8:11, 2] = 3
    rng = np.random.default_rng(0)
    for i in range(2):
        nib.save(nib.Nifti1Image(rng.random((12, 12, 4)).astype(np.float32), np.eye(4)), tmp_path / "imagesTr" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "labelsTr" / f"c{i}.nii.gz")
    if labels_doc is not None:
        (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels_doc}))
    return tmp_path


def test_names_from_msd_and_nnunet_dataset_json(tmp_path: Path) -> None:
    msd = _site(tmp_path / "msd", {"0": "background", "1": "Liver", "2": "tumour", "3": "vessel"})
    nnunet = _site(tmp_path / "nnunet", {"background": 0, "liver": 1, "tumour": 2, "vessel": 3, "region": [1, 2]})
    for site in (msd, nnunet):
        by_name = resolve_label_map('{"liver": 1, "TUMOUR": 1, "vessel": 2}', site)
        assert by_name.pairs == ((1, 1), (2, 1), (3, 2))
        assert [n.lower() for n in by_name.names] == ["liver+tumour", "vessel"]
        assert resolve_label_map("liver,tumour", site).pairs == ((1, 1), (2, 1))
        with pytest.raises(DataError, match=r"'spleen' is not defined in .*dataset.json.*'tumour' \(2\)"):
            resolve_label_map("spleen", site)
    single = _site(tmp_path / "single", {"0": "background", "1": "prostate"})
    assert resolve_label_map(None, single).names == ("prostate",)
    assert resolve_label_map(None, msd).names == ("foreground",)  # several labels merged
    with pytest.raises(DataError, match="no label names"):
        resolve_label_map("liver", _site(tmp_path / "bare", None))
    (single / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"single.dataset\.json is not valid JSON"):
        resolve_label_map(None, single)


def test_loaded_labels_hold_class_indices(tmp_path: Path) -> None:
    site = _site(tmp_path / "s", {"0": "background", "1": "liver", "2": "tumour", "3": "vessel"})
    kw = dict(image_size=SIZE, val_fraction=0.0, keep_empty_every=0)

    def values(data) -> set[float]:
        return set(torch.stack([data.train[i][1] for i in range(len(data.train))]).unique().tolist())

    assert values(load_site(site, **kw)) == {0.0, 1.0}
    multi = load_site(site, labels='{"liver": 1, "tumour": 2, "vessel": 2}', **kw)
    assert values(multi) == {0.0, 1.0, 2.0} and multi.class_names == ["liver", "tumour+vessel"]
    # only the tumour is foreground: slices are kept by *mapped* foreground, and pixels match
    tumour = load_site(site, labels="2", image_size=12, val_fraction=0.0, keep_empty_every=0)
    assert len(tumour.train) == 2 * 2  # slices 1 and 2 of both volumes
    masks = tumour.train.labels[:, 0].bool()
    assert int(masks.sum()) == 2 * 2 * 9 and bool(masks[:, 7:10, 7:10].all())
    with pytest.raises(DataError, match="no usable training slice"):
        load_site(site, labels="7", **kw)


def test_a_map_that_selects_no_stored_value_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from PIL import Image

    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    for i in range(2):
        mask = np.zeros((20, 20), np.uint8)
        mask[4:12, 4:12] = 255  # masks as image editors save them
        Image.fromarray((np.random.default_rng(i).random((20, 20)) * 255).astype(np.uint8)).save(
            tmp_path / "imagesTr" / f"p{i}.png")
        Image.fromarray(mask).save(tmp_path / "labelsTr" / f"p{i}.png")
    with caplog.at_level(logging.WARNING, logger="fedfms_secure.data"):
        load_site(tmp_path, image_size=16)  # default map: non-zero is foreground
    assert not any("no slice has a foreground voxel" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="fedfms_secure.data"):
        data = load_site(tmp_path, image_size=16, labels='{"1": 1, "2": 2}')
    assert not bool(data.train.labels.any())
    assert any("no slice has a foreground voxel" in r.getMessage() and str(tmp_path) in r.getMessage()
               for r in caplog.records)
