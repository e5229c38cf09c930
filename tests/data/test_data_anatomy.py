"""The real-anatomy federation (`data anatomy`): MSD layout read by the loader, tissue labels,
scanner-like site shifts that survive preprocessing, determinism, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedfms_secure.cli import main
from fedfms_secure.data import find_sites, load_site
from fedfms_secure.data.anatomy import anatomy_federation, parse_classes, template_files
from fedfms_secure.errors import ConfigError, DataError

SMALL = dict(size=32, slices=8)


@pytest.fixture(scope="module")
def anatomy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("anatomy")
    assert main(["data", "anatomy", "--out", str(out), "--sites", "3", "--cases", "3", "--size", "48",
                 "--slices", "12", "--seed", "1"]) == 0
    return out


def test_template_comes_from_the_installed_nilearn_wheel() -> None:
    files = template_files()
    assert set(files) == {"t1", "wm", "gm"}
    for path in files.values():
        assert "nilearn" in path.parts and path.is_file()
        assert nib.load(path).shape == (197, 233, 189)


def test_cli_writes_a_layout_that_inspect_and_the_loader_accept(anatomy: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["data", "inspect", str(anatomy), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in report["sites"]] == ["site_1", "site_2", "site_3"]
    for site in report["sites"]:
        assert site["volumes"] == 3 and not site["problems"]
        assert site["train_slices"] > 0 and site["val_slices"] > 0
        assert site["label_values"] == [0, 1]
        assert 0.05 < site["foreground_fraction"] < 0.6  # white matter: a real share of each slice
    for site in find_sites(anatomy):
        meta = json.loads((site / "dataset.json").read_text())
        assert meta["labels"] == {"0": "background", "1": "white matter"}
        assert meta["numTraining"] == 3 == len(list((site / "imagesTr").glob("*.nii.gz")))
        image = nib.load(site / "imagesTr" / "case_000.nii.gz")
        assert image.shape == (48, 48, 12)
        assert image.header.get_zooms()[2] == pytest.approx(meta["scanner"]["slice_mm"], rel=1e-5)


def test_labels_are_white_matter_of_a_t1(anatomy: Path) -> None:
    """On a T1, white matter is the brightest tissue: labelled voxels outshine the rest of the head."""
    for site in find_sites(anatomy):
        for case in sorted((site / "labelsTr").glob("*.nii.gz")):
            label = np.asarray(nib.load(case).dataobj)
            image = nib.load(site / "imagesTr" / case.name).get_fdata()
            assert label.any(axis=(0, 1)).sum() >= label.shape[2] - 2, "white matter in (almost) every slice"
            head = image > np.percentile(image, 40)
            assert image[label > 0].mean() > image[head & (label == 0)].mean()


def test_patients_differ_and_sites_differ_after_preprocessing(anatomy: Path) -> None:
    sites = find_sites(anatomy)
    labels = [np.asarray(nib.load(p).dataobj) for p in sorted((sites[0] / "labelsTr").glob("*.nii.gz"))]
    assert not np.array_equal(labels[0], labels[1]), "each patient has its own deformation"
    scanners = [json.loads((s / "dataset.json").read_text())["scanner"] for s in sites]
    for key in ("gamma", "noise", "bias", "blur", "slice_mm"):
        assert len({round(s[key], 6) for s in scanners}) == 3, key
    stats = []
    for site in sites:
        data = load_site(site, image_size=48, val_fraction=0.0, keep_empty_every=0)
        images, mask = data.train.images.float(), data.train.labels.bool()
        # white matter's brightness against the rest of the brain, after the loader's scaling
        brain = images > 0.1
        stats.append((float(images[brain].mean()), float(images[mask].mean() - images[brain & ~mask].mean())))
    means, steps = zip(*stats)
    assert max(means) - min(means) > 0.03 or max(steps) - min(steps) > 0.03, stats


def test_two_classes(tmp_path: Path) -> None:
    site = anatomy_federation(tmp_path, sites=1, cases=2, classes="wm,gm", seed=0, **SMALL)[0]
    meta = json.loads((site / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "white matter", "2": "grey matter"}
    label = np.asarray(nib.load(site / "labelsTr" / "case_000.nii.gz").dataobj)
    assert set(np.unique(label)) == {0, 1, 2}
    data = load_site(site, image_size=32, val_fraction=0.0, labels='{"1": 1, "2": 2}')
    assert data.label_map.num_classes == 2


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = anatomy_federation(tmp_path / "a", sites=2, cases=2, seed=5, **SMALL)
    b = anatomy_federation(tmp_path / "b", sites=2, cases=2, seed=5, **SMALL)
    c = anatomy_federation(tmp_path / "c", sites=2, cases=2, seed=6, **SMALL)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 * (2 * 2 + 1)
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    first = "imagesTr/case_000.nii.gz"
    assert (a[0] / first).read_bytes() != (c[0] / first).read_bytes()
    assert [p.name for p in a] == [p.name for p in b] == ["site_1", "site_2"]


def test_rerun_replaces_own_output_never_a_foreign_folder(tmp_path: Path) -> None:
    anatomy_federation(tmp_path, sites=3, cases=1, **SMALL)
    anatomy_federation(tmp_path, sites=2, cases=1, **SMALL)
    assert [p.name for p in find_sites(tmp_path)] == ["site_1", "site_2"]
    foreign = tmp_path / "other"
    (foreign / "site_1").mkdir(parents=True)
    with pytest.raises(DataError, match="not written by `data anatomy`"):
        anatomy_federation(foreign, sites=1, cases=1, **SMALL)
    assert not any((foreign / "site_1").iterdir())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sites": 0}, "--sites"), ({"cases": 0}, "--cases"), ({"size": 8}, "--size"), ({"slices": 2}, "--slices"),
    ({"classes": "csf"}, "unknown tissue"), ({"classes": "wm,wm"}, "twice"), ({"classes": ""}, "one or more"),
])
def test_bad_arguments_say_what_to_give(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        anatomy_federation(tmp_path, **kwargs)
    assert not (tmp_path / "site_1").exists()


def test_parse_classes() -> None:
    assert parse_classes("WM, gm") == ("wm", "gm")
    assert parse_classes(["gm"]) == ("gm",)
