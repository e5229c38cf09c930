"""`fedfms-secure data inspect`: numbers per site, and every problem named with its file."""

from __future__ import annotations

import json
import nibabel as nib
import numpy as np

from fedfms_secure.cli import main
from fedfms_secure.data import load_site, synth_federation


def test_inspect_counts_match_the_loader_and_names_each_problem(tmp_path, capsys):
    sites = synth_federation(tmp_path / "fed", sites=3, seed=0, shape=(32, 32, 8))
    broken = max(sites, key=lambda s: len(list((s / "imagesTr").glob("*.nii.gz"))))
    clean_site = next(s for s in sites if s != broken)
    cases = sorted((broken / "imagesTr").glob("*.nii.gz"))
    (broken / "labelsTr" / cases[0].name).unlink()  # an image without its label
    (broken / "imagesTr" / cases[1].name).write_bytes(b"not a nifti file")  # corrupt
    wrong = nib.load(broken / "labelsTr" / cases[2].name)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), dtype=np.uint8), wrong.affine), broken / "labelsTr" / cases[2].name)
    empty = nib.load(broken / "labelsTr" / cases[3].name)
    nib.save(nib.Nifti1Image(np.zeros(empty.shape, dtype=np.uint8), empty.affine), broken / "labelsTr" / cases[3].name)

    assert main(["data", "inspect", str(tmp_path / "fed"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {site["name"]: site for site in report["sites"]}
    assert sorted(by_name) == ["site_1", "site_2", "site_3"]
    clean, bad = by_name[clean_site.name], by_name[broken.name]
    assert bad["volumes"] >= 5
    loaded = load_site(clean_site, image_size=64, seed=0)
    assert (clean["train_slices"], clean["val_slices"]) == (len(loaded.train), len(loaded.val))
    assert clean["problems"] == [] and clean["image_shapes"] == {"32 x 32 x 8": clean["volumes"]}
    assert clean["label_values"] == [0.0, 1.0] and 0 < clean["foreground_fraction"] < 0.5
    by_file = {p["file"]: p["problem"] for p in bad["problems"]}
    assert "no label" in by_file[str(broken / "imagesTr" / cases[0].name)]
    assert str(broken / "imagesTr" / cases[1].name) in by_file
    assert "differs from the image's" in by_file[str(broken / "labelsTr" / cases[2].name)]
    assert "resample the label" in by_file[str(broken / "labelsTr" / cases[2].name)]  # what to do next
    assert "empty" in by_file[str(broken / "labelsTr" / cases[3].name)]
    assert bad["readable_volumes"] == bad["volumes"] - 3

    assert main(["data", "inspect", str(clean_site)]) == 0  # a single site folder, as text
    assert capsys.readouterr().out.startswith(f"{clean_site.name}: ")


def test_inspect_of_a_folder_without_sites_says_what_layout_is_expected(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "inspect", str(tmp_path / "empty")]) == 1
    assert "imagesTr" in capsys.readouterr().err


def test_inspect_flags_a_site_without_validation_and_a_site_without_labels_once(tmp_path, capsys):
    one = tmp_path / "fed" / "one_volume"
    for sub in ("imagesTr", "labelsTr"):
        (one / sub).mkdir(parents=True)
    label = np.zeros((16, 16, 6), np.uint8)
    label[4:10, 4:10, 2:4] = 1
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 6)).astype(np.float32), np.eye(4)),
             one / "imagesTr" / "a.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), one / "labelsTr" / "a.nii.gz")
    (tmp_path / "fed" / "no_labels" / "imagesTr").mkdir(parents=True)

    assert main(["data", "inspect", str(tmp_path / "fed"), "--json"]) == 1  # no_labels cannot be trained on
    captured = capsys.readouterr()
    assert "site no_labels cannot be trained on" in captured.err
    assert "site one_volume cannot" not in captured.err  # a site without validation slices still trains
    by_name = {site["name"]: site for site in json.loads(captured.out)["sites"]}
    single = by_name["one_volume"]
    assert (single["volumes"], single["train_slices"], single["val_slices"]) == (1, 3, 0)
    assert [p["file"] for p in single["problems"]] == [str(one)]
    assert "no validation slice" in single["problems"][0]["problem"]
    assert "add volumes" in single["problems"][0]["problem"]
    # a folder that cannot be listed is one problem, not the same message twice
    problems = by_name["no_labels"]["problems"]
    assert len(problems) == 1 and "labelsTr" in problems[0]["problem"]
