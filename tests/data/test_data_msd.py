"""An MSD-format task the project did not write (see conftest.write_msd_task), cut into three
sites: `data inspect` is exact on it, `train central` and the demo run on it, leave-one-site-out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedfms_secure.cli import main
from fedfms_secure.data.split import draw_split
from fedfms_secure.train.model_file import read_model_file

from conftest import MSD_SHAPES

LABELS = '{"1": 1, "2": 2}'


def _labels(site: Path) -> dict[str, np.ndarray]:
    """Case name -> label voxels, read with nibabel alone."""
    return {p.name[: -len(".nii.gz")]: np.asarray(nib.load(p).dataobj) for p in sorted((site / "labelsTr").glob("*.nii.gz"))}


def _slices(label: np.ndarray, keep_empty_every: int = 5, axis: int = 2) -> int:
    fg = np.moveaxis(label > 0, axis, 0).reshape(label.shape[axis], -1).any(axis=1)
    return int(fg.sum()) + math.ceil(int((~fg).sum()) / keep_empty_every)


def _expected(site: Path) -> dict:
    labels = _labels(site)
    split = draw_split(list(labels), val_fraction=0.25, seed=0)
    total = sum(v.size for v in labels.values())
    shapes: dict[str, int] = {}
    for path in sorted((site / "imagesTr").glob("liver_*.nii.gz")):
        key = " x ".join(map(str, nib.load(path).shape))
        shapes[key] = shapes.get(key, 0) + 1
    return {
        "volumes": len(labels),
        "readable_volumes": len(labels),
        "train_slices": sum(_slices(labels[n]) for n in split.train),
        "val_slices": sum(_slices(labels[n]) for n in split.val),
        "image_shapes": shapes,
        "label_values": sorted({float(v) for lab in labels.values() for v in np.unique(lab)}),
        "classes": ["liver", "tumour"],
        "foreground_fraction": sum(int((v > 0).sum()) for v in labels.values()) / total,
        "class_fractions": {"liver": sum(int((v == 1).sum()) for v in labels.values()) / total,
                            "tumour": sum(int((v == 2).sum()) for v in labels.values()) / total},
        "problems": [],
    }


def test_inspect_is_exact_on_an_msd_task(msd_task: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "inspect", str(msd_task), "--json", "--labels", LABELS]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in report["sites"]] == list(MSD_SHAPES)
    for site in report["sites"]:
        expected = _expected(msd_task / site["name"])
        assert {k: site[k] for k in expected} == expected, site["name"]
        assert expected["label_values"] == [0.0, 1.0, 2.0]
        assert sum(expected["image_shapes"].values()) == len(MSD_SHAPES[site["name"]])
    # the default label map merges liver and tumour into one class, named from dataset.json's
    assert main(["data", "inspect", str(msd_task / "site_b"), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)["sites"][0]
    assert merged["classes"] == ["foreground"]
    assert merged["foreground_fraction"] == _expected(msd_task / "site_b")["foreground_fraction"]


def test_inspect_flags_what_dataset_json_claims_but_the_folder_lacks(msd_copy: Path, capsys) -> None:
    site = msd_copy / "site_a"
    victim = sorted((site / "imagesTr").glob("liver_*.nii.gz"))[0]
    victim.unlink()
    assert main(["data", "inspect", str(site), "--json"]) == 0
    problems = {p["file"]: p["problem"] for p in json.loads(capsys.readouterr().out)["sites"][0]["problems"]}
    assert "listed in dataset.json" in problems[str(site / "imagesTr" / victim.name)]
    assert "numTraining is 3" in problems[str(site / "dataset.json")]
    # the orphaned label is no case (only images make cases), so nothing else is flagged
    assert len(problems) == 2


def test_train_central_with_a_held_out_site_and_evaluate_its_model(msd_task: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "central"
    assert main(["train", "central", "--data", str(msd_task), "--holdout", "site_c", "--epochs", "1", "--image-size", "32",
                 "--labels", LABELS, "--out", str(out), "--cache", str(tmp_path / "cache"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "central" and result["epsilon"] is None
    assert [s["name"] for s in result["sites"]] == ["site_a", "site_b"]
    for site in result["sites"]:
        expected = _expected(msd_task / site["name"])
        assert (site["train_slices"], site["val_slices"]) == (expected["train_slices"], expected["val_slices"])
        assert [c["name"] for c in site["per_class"]] == ["liver", "tumour"]
        assert 0.0 <= site["dice_mean"] <= 1.0 and 0.0 <= site["iou_mean"] <= site["dice_mean"] + 1e-9
    held = result["holdout"]
    assert held["name"] == "site_c" and held["train_slices"] == 0
    assert held["val_slices"] == sum(_slices(v) for v in _labels(msd_task / "site_c").values())
    assert json.loads((out / "central.json").read_text())["holdout"] == held
    header, vector = read_model_file(out / "central_model.pt")
    assert header.num_classes == 2 and header.source == "central" and vector.size == len(vector)

    assert main(["evaluate", "--model", str(out / "central_model.pt"), "--data", str(msd_task / "site_c"), "--json",
                 "--split", "all", "--per-image"]) == 0
    scored = json.loads(capsys.readouterr().out)["sites"][0]
    assert scored["slices"] == held["val_slices"] == len(scored["images"])
    assert {image["case"] for image in scored["images"]} == set(_labels(msd_task / "site_c"))
    dice = [np.nanmean([np.nan if v is None else v for v in image["dice"]]) for image in scored["images"]
            if any(v is not None for v in image["dice"])]
    assert scored["dice_mean"] == pytest.approx(float(np.mean(dice)))
    assert all(len(image["hd95"]) == 2 for image in scored["images"])
    for key in ("dice_mean", "dice_std", "iou_mean", "iou_std", "hd95_mean", "hd95_std"):
        assert scored[key] == pytest.approx(held[key], nan_ok=True), key
    for mine, theirs in zip(scored["per_class"], held["per_class"], strict=True):
        assert mine == pytest.approx(theirs, nan_ok=True)


def test_demo_on_the_msd_task_never_trains_the_held_out_site(msd_task: Path, tmp_path: Path) -> None:
    """The one federated test of the data layer (real daemons, ~50 s on 2 cores): an MSD task the
    project did not write, two classes, leave-one-site-out."""
    from fedfms_secure.demo import DemoOptions, run_demo
    from fedfms_secure.commands.train import evaluate_model_file

    out = tmp_path / "demo"
    report = run_demo(DemoOptions(out=out, clients=2, rounds=1, local_epochs=1, epsilon=math.inf, data=msd_task,
                                  holdout="site_c", labels=LABELS, timeout=600))
    assert report["sites"] == ["site_a", "site_b"]
    assert not (out / "run" / "site_c").exists() and not (out / "logs" / "site_c.log").exists()
    assert not (out / "run" / "bundles" / "site_c").exists()
    final = report["final"]
    assert sorted(final["sites"]) == ["site_a", "site_b"]
    for field in ("dice_mean", "dice_std", "iou_mean", "hd95_mean", "hd95_std"):
        values = [final["sites"][s][field] for s in ("site_a", "site_b")]
        if all(v is not None for v in values):
            assert final["mean"][field] == pytest.approx(sum(values) / 2)
    held = report["holdout"]
    assert held["name"] == "site_c"
    assert held["slices"] == sum(_slices(v) for v in _labels(msd_task / "site_c").values())
    assert json.loads((out / "report.json").read_text())["holdout"]["slices"] == held["slices"]
    # both sites decrypted the same final global model; the held-out score is that model's
    a, va = read_model_file(out / "run" / "site_a" / "final_model.pt")
    _, vb = read_model_file(out / "run" / "site_b" / "final_model.pt")
    assert a.num_classes == 2 and a.source == "federated"
    np.testing.assert_allclose(va, vb, atol=1e-6)
    again = evaluate_model_file(out / "run" / "site_b" / "final_model.pt", msd_task / "site_c")
    assert again["sites"][0]["dice_mean"] == pytest.approx(held["dice_mean"], abs=1e-4, nan_ok=True)
