"""`fedfms-secure predict` with a tiny model trained here on synthetic NIfTI volumes: masks on the
input's own grid (shape, affine), the score `evaluate` gives, PNG, label values of a class map."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedfms_secure import load_model
from fedfms_secure.cli import main
from fedfms_secure.commands.train import evaluate_model_file
from fedfms_secure.data import synth_federation
from fedfms_secure.data.labels import LabelMap
from fedfms_secure.data.preprocess import Preprocessing
from fedfms_secure.errors import ConfigError
from fedfms_secure.train.baselines import BaselineOptions, train_central
from fedfms_secure.train.model_file import save_model_file
from fedfms_secure.train.predict import PredictOptions, find_inputs, predict_path, resolve_device

SHAPE = (72, 56, 8)  # non-square slices, larger than the tiny preset's 64 px grid


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A central model trained for a few epochs (Dice well above 0), and one case of the site
    re-saved with a rotated, shifted, anisotropic affine as a site of its own."""
    root = tmp_path_factory.mktemp("predict")
    synth_federation(root / "fed", sites=1, seed=3, shape=SHAPE)
    out = root / "out"
    result = train_central(root / "fed", BaselineOptions(epochs=15, learning_rate=3e-3, out=out))
    assert result["sites"][0]["dice_mean"] > 0.2  # a model that segments, so the comparisons below mean something
    source = root / "fed" / "site_1"
    case = sorted((source / "imagesTr").iterdir())[0].name
    site = root / "case_site"
    turn = np.deg2rad(20)
    affine = np.array([[0.8 * np.cos(turn), -0.8 * np.sin(turn), 0.0, -31.5],
                       [0.8 * np.sin(turn), 0.8 * np.cos(turn), 0.0, 12.25],
                       [0.0, 0.0, 3.0, -7.0],
                       [0.0, 0.0, 0.0, 1.0]])
    for folder in ("imagesTr", "labelsTr"):
        (site / folder).mkdir(parents=True)
        data = np.asarray(nib.load(str(source / folder / case)).dataobj)
        nib.save(nib.Nifti1Image(data, affine), str(site / folder / case))
    shutil.copy(source / "dataset.json", site / "dataset.json")
    return {"model": out / "central_model.pt", "site": site, "case": site / "imagesTr" / case,
            "label": site / "labelsTr" / case, "fed": root / "fed", "splits": out / "splits", "logged": result}


def _dice(pred: np.ndarray, label: np.ndarray) -> float:
    total = pred.sum() + label.sum()
    return float(2 * (pred & label).sum() / total)


def test_nifti_mask_has_the_input_shape_affine_and_labels(trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "masks"
    assert main(["predict", "--model", str(trained["model"]), "--input", str(trained["case"]), "--out", str(out),
                 "--device", "cpu", "--batch-size", "4", "--json"]) == 0
    source, mask = nib.load(str(trained["case"])), nib.load(str(out / trained["case"].name))
    assert mask.shape == source.shape == SHAPE
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-6)
    assert mask.header.get_sform(coded=True)[1] == source.header.get_sform(coded=True)[1]
    np.testing.assert_allclose(mask.header.get_zooms(), source.header.get_zooms(), rtol=1e-6)
    values = np.asarray(mask.dataobj)
    assert mask.get_data_dtype() == np.uint8 and set(np.unique(values)) == {0, 1}


def test_predicted_mask_scores_as_evaluate_does(trained: dict[str, Any], tmp_path: Path) -> None:
    """Dice of predict's mask against the label, per slice on the input grid, matches `evaluate`'s
    per-slice Dice on the model's 64 px grid. They differ only by resampling: evaluate resizes the
    label to 64 px (nearest) and thresholds 64 px logits; predict resizes the logits to 72 x 56 and
    thresholds there. That moves boundary pixels only: about one pixel of a ~15 px wide organ's
    outline, i.e. a few hundredths of Dice per slice, less on the mean."""
    result = evaluate_model_file(trained["model"], trained["site"], split="all", per_image=True)
    evaluated = [image["dice"][0] for image in result["sites"][0]["images"] if image["dice"][0] is not None]
    [prediction] = predict_path(load_model(trained["model"]), trained["case"], tmp_path / "m",
                                PredictOptions(device="cpu"))
    mask = np.asarray(nib.load(str(prediction.mask)).dataobj) > 0
    label = np.asarray(nib.load(str(trained["label"])).dataobj) > 0
    on_input = [_dice(mask[..., z], label[..., z]) for z in range(SHAPE[2]) if label[..., z].any()]
    assert len(on_input) == len(evaluated) >= 2
    assert np.mean(evaluated) > 0.2
    assert abs(np.mean(on_input) - np.mean(evaluated)) < 0.03
    np.testing.assert_allclose(on_input, evaluated, atol=0.08)


def test_png_in_png_out(trained: dict[str, Any], tmp_path: Path) -> None:
    volume = np.asarray(nib.load(str(trained["case"])).dataobj, dtype=np.float32)
    picture = volume[..., SHAPE[2] // 2]  # 72 rows x 56 columns
    folder = tmp_path / "pngs"
    folder.mkdir()
    grey = (255 * (picture - picture.min()) / np.ptp(picture)).astype(np.uint8)
    Image.fromarray(grey).save(folder / "slice.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(folder / "rgb.png")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(trained["model"]), "--input", str(folder), "--out", str(out),
                 "--probabilities"]) == 0
    for name in ("slice", "rgb"):
        mask = Image.open(out / f"{name}.png")
        assert mask.size == (56, 72) and mask.mode == "L"
        values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 1} and values.any()
        probabilities = np.load(out / "probabilities" / f"{name}.npy")
        assert probabilities.shape == (1, 72, 56)
        np.testing.assert_array_equal(probabilities[0] > 0.5, values == 1)


def test_a_multi_class_model_writes_the_mapped_label_values(trained: dict[str, Any], tmp_path: Path) -> None:
    """Two classes mapped from label values 1 and 3. Class 2 reuses class 1's mask token with its
    hypernetwork negated, so its logit is minus class 1's: every pixel is foreground, value 1 where
    class 1 is the more probable (probability above 0.5), else 3."""
    one = load_model(trained["model"]).model
    from fedfms_secure.model.registry import build_model

    two = build_model("tiny", pretrained=False, num_classes=2)
    two.load_state_dict(one.state_dict())
    decoder = two.sam.mask_decoder
    with torch.no_grad():
        decoder.mask_tokens.weight[1] = decoder.mask_tokens.weight[0]
        decoder.output_hypernetworks_mlps[1].load_state_dict(decoder.output_hypernetworks_mlps[0].state_dict())
        last = decoder.output_hypernetworks_mlps[1].layers[-1]
        last.weight.neg_()
        last.bias.neg_()
    classes = LabelMap(pairs=((1, 1), (3, 2)), names=("organ", "rest"))
    path = save_model_file(tmp_path / "two.pt", two, [], mode="fedmsa", seed=0, pretrained=False,
                           data=Preprocessing(image_size=64, label_map=classes).describe(),
                           label_spec='{"1": 1, "3": 2}', source="central")
    loaded = load_model(path)
    assert loaded.meta.label_values == (1, 3) and loaded.meta.class_names == ("organ", "rest")
    [multi] = predict_path(loaded, trained["case"], tmp_path / "two", PredictOptions(device="cpu", probabilities=True))
    values = np.asarray(nib.load(str(multi.mask)).dataobj)
    assert set(np.unique(values)) == {1, 3}
    probabilities = nib.load(str(multi.probabilities))
    assert probabilities.shape == (*SHAPE, 2)
    np.testing.assert_allclose(probabilities.affine, nib.load(str(trained["case"])).affine, atol=1e-6)
    p = np.asarray(probabilities.dataobj)
    np.testing.assert_allclose(p[..., 0] + p[..., 1], 1.0, atol=1e-5)
    foreground = p[..., 0] > 0.5
    np.testing.assert_array_equal(values == 1, foreground)
    assert multi.voxels == {1: int(foreground.sum()), 3: int((~foreground).sum())}


def test_inputs_devices_and_outputs_that_would_lose_data(trained: dict[str, Any], tmp_path: Path, capsys) -> None:
    site = tmp_path / "site"
    (site / "imagesTr").mkdir(parents=True)
    (site / "imagesTs").mkdir()
    shutil.copy(trained["case"], site / "imagesTr" / "a.nii.gz")
    shutil.copy(trained["case"], site / "imagesTs" / "b_0000.nii.gz")
    shutil.copy(trained["case"], site / "imagesTs" / "b_0001.nii.gz")  # an extra nnU-Net channel
    (site / "imagesTs" / ".hidden.nii.gz").write_bytes(b"")
    assert find_inputs(site) == [site / "imagesTs" / "b_0000.nii.gz"]
    shutil.rmtree(site / "imagesTs")
    assert find_inputs(site) == [site / "imagesTr" / "a.nii.gz"]
    with pytest.raises(ConfigError, match="cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda:1")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")

    model = str(trained["model"])
    assert main(["predict", "--model", model, "--input", str(site / "imagesTr"), "--out",
                 str(site / "imagesTr")]) == 1
    assert "folder of the input images" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["predict", "--model", model, "--input", str(site), "--out", str(out)]) == 0
    assert "a.nii.gz" in capsys.readouterr().out
    first = (out / "a.nii.gz").read_bytes()
    assert main(["predict", "--model", model, "--input", str(site), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err and (out / "a.nii.gz").read_bytes() == first
    assert main(["predict", "--model", model, "--input", str(site), "--out", str(out), "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == {"organ": 1}
    assert main(["predict", "--model", model, "--input", str(tmp_path / "nothing"), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_split_reproduces_the_logged_validation_dice(trained: dict[str, Any], capsys) -> None:
    logged = trained["logged"]["sites"][0]  # the validation scores training reported
    site, model = trained["fed"] / "site_1", str(trained["model"])
    assert main(["evaluate", "--model", model, "--data", str(site)]) == 1
    assert "--state" in capsys.readouterr().err
    split_file = str(trained["splits"] / "site_1.json")
    counts = {}
    for split in ("val", "train", "all"):
        extra = [] if split == "all" else ["--split-file", split_file]
        assert main(["evaluate", "--model", model, "--data", str(site), "--split", split, *extra, "--json"]) == 0
        scored = json.loads(capsys.readouterr().out)
        assert scored["split"] == split
        counts[split] = scored["sites"][0]["slices"]
        if split == "val":
            assert scored["sites"][0]["dice_mean"] == pytest.approx(logged["dice_mean"], abs=1e-9)
            assert counts["val"] == logged["val_slices"]
    assert counts["train"] == logged["train_slices"] and counts["all"] == counts["train"] + counts["val"]
    state = trained["splits"].parent / "no_state"  # a folder without split.json
    assert main(["evaluate", "--model", model, "--data", str(site), "--state", str(state)]) == 1
    assert "split.json does not exist" in capsys.readouterr().err


def test_a_box_prompted_model_sliced_along_another_axis(trained: dict[str, Any], tmp_path: Path, caplog) -> None:
    """A box model gets the whole slice as its box (there is no label) and says so; a model sliced
    along axis 0 gives a mask on the input grid all the same, probabilities with the class last."""
    from fedfms_secure.model.registry import build_model

    boxed = build_model("tiny", prompt="box")
    path = save_model_file(tmp_path / "box.pt", boxed, [], mode="fedmsa", seed=0, pretrained=True,
                           data=Preprocessing(image_size=64, axis=0).describe(), label_spec=None, source="central")
    loaded = load_model(path)
    assert loaded.meta.prompt == "box" and loaded.meta.preprocessing().axis == 0
    [result] = predict_path(loaded, trained["case"], tmp_path / "out", PredictOptions(probabilities=True))
    assert "whole slice" in caplog.text
    assert result.slices == SHAPE[0] and result.shape == SHAPE
    mask = nib.load(str(result.mask))
    probabilities = np.asarray(nib.load(str(result.probabilities)).dataobj)
    assert mask.shape == SHAPE and probabilities.shape == (*SHAPE, 1)
    np.testing.assert_array_equal(np.asarray(mask.dataobj) == 1, probabilities[..., 0] > 0.5)
    # slice 3 along axis 0 is the input's (Y, Z) plane at x = 3, prompted with the whole 64 px square
    from fedfms_secure.data.preprocess import image_slices, read_image

    slices = image_slices(read_image(trained["case"])[0], loaded.meta.preprocessing())
    with torch.no_grad():
        logits = loaded.model(slices[3:4], torch.tensor([[[0.0, 0.0, 63.0, 63.0]]]))
    expected = torch.sigmoid(torch.nn.functional.interpolate(logits, size=SHAPE[1:], mode="bilinear",
                                                             align_corners=False))[0, 0]
    np.testing.assert_allclose(probabilities[3, :, :, 0], expected.numpy(), atol=1e-4)
