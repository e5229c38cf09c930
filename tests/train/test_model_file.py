"""The model file: what format 2 holds, format 1 still read, and clear errors for files that are
missing, damaged, foreign, too new or incomplete."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

import fedfms_secure
from fedfms_secure import load_model
from fedfms_secure.data.labels import LabelMap
from fedfms_secure.data.preprocess import Preprocessing
from fedfms_secure.errors import ModelError
from fedfms_secure.model.modes import apply_mode
from fedfms_secure.model.registry import build_model
from fedfms_secure.model.vector import flatten
from fedfms_secure.train.model_file import read_model_file, save_model_file

DATA = Preprocessing(image_size=64, axis=1, keep_empty_every=3, clip_percentiles=(1.0, 99.0),
                     label_map=LabelMap(pairs=((1, 1), (2, 1), (4, 2)), names=("liver+tumour", "vessel"))).describe()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, list[str]]:
    model = build_model("tiny", seed=3, num_classes=2)
    names = apply_mode(model, "fedmsa")
    with torch.no_grad():  # weights that no rebuild from the preset and seed would give
        for name, param in model.named_parameters():
            if name in names:
                param.add_(0.01 * torch.randn_like(param))
    path = save_model_file(tmp_path_factory.mktemp("m") / "model.pt", model, names, mode="fedmsa", seed=3,
                           pretrained=True, data=DATA, label_spec='{"1": 1, "2": 1, "4": 2}', source="federated",
                           info={"rounds": 2})
    return path, model.eval(), names


def test_format_2_holds_named_weights_and_what_prediction_needs(saved) -> None:
    path, model, names = saved
    doc = torch.load(path, weights_only=True)
    assert doc["format"] == 2 and doc["fedfms_secure_version"] == fedfms_secure.__version__
    assert set(doc["state_dict"]) == set(model.state_dict()) and doc["communicated"] == names
    assert doc["label_values"] == [1, 4] and doc["class_names"] == ["liver+tumour", "vessel"]
    loaded = load_model(path)
    meta = loaded.meta
    assert (meta.preset, meta.img_size, meta.mode, meta.num_classes, meta.prompt) == ("tiny", 64, "fedmsa", 2, "none")
    options = meta.preprocessing()
    assert (options.axis, options.keep_empty_every, options.clip_percentiles) == (1, 3, (1.0, 99.0))
    assert options.label_map.apply(np.array([0, 1, 2, 3, 4])).tolist() == [0, 1, 1, 0, 2]
    assert not loaded.model.training
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    header, vector = read_model_file(path)
    np.testing.assert_array_equal(vector, flatten(model, names))
    model_again, meta_again = load_model(path)  # unpacks as (model, meta)
    assert meta_again == meta


def _format_1(path: Path, model: torch.nn.Module, names: list[str], **drop: bool) -> Path:
    """A file as earlier versions wrote it: the communicated vector and the recipe."""
    doc = {"format": 1, "preset": "tiny", "img_size": 64, "mode": "fedmsa", "seed": 3, "pretrained": True,
           "num_classes": 2, "prompt": "none", "names": list(names),
           "vector": torch.from_numpy(flatten(model, names)), "data": DATA, "label_spec": None,
           "source": "central", "info": {}}
    for key in drop:
        del doc[key]
    torch.save(doc, path)
    return path


def test_an_old_flat_vector_file_still_loads_when_it_suffices(saved, tmp_path: Path) -> None:
    _, model, names = saved
    loaded = load_model(_format_1(tmp_path / "old.pt", model, names))
    assert loaded.meta.format == 1 and loaded.meta.version is None and loaded.meta.label_values == (1, 4)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    with pytest.raises(ModelError, match=r"old model file \(format 1\) that lacks seed"):
        load_model(_format_1(tmp_path / "no_seed.pt", model, names, seed=True))


def test_missing_damaged_and_foreign_files_are_named(saved, tmp_path: Path) -> None:
    path, model, _ = saved
    whole = path.read_bytes()
    cases: dict[str, tuple[bytes | object, str]] = {
        "absent.pt": (None, "does not exist"),
        "empty.pt": (b"", "is empty"),
        "truncated.pt": (whole[: len(whole) // 2], "damaged: its zip archive has no end"),
        "notes.pt": (b"these are not weights\n", "not a PyTorch file"),
        "pickle.pt": (b"\x80\x02}q\x00.", "legacy"),
    }
    for name, (content, message) in cases.items():
        target = tmp_path / name
        if content is not None:
            target.write_bytes(content)
        with pytest.raises(ModelError, match=message) as caught:
            load_model(target)
        assert str(target) in str(caught.value)
    corrupt = bytearray(whole)
    middle = len(corrupt) // 2
    corrupt[middle:middle + 4096] = bytes(4096)  # a damaged member, the archive's end intact
    (tmp_path / "corrupt.pt").write_bytes(bytes(corrupt))
    with pytest.raises(ModelError, match="damaged"):
        load_model(tmp_path / "corrupt.pt")

    torch.save(model.state_dict(), tmp_path / "state.pt")
    with pytest.raises(ModelError, match="bare state dict"):
        load_model(tmp_path / "state.pt")
    torch.save({"format": 7, "fedfms_secure_version": "9.0"}, tmp_path / "future.pt")
    with pytest.raises(ModelError, match="format 7, written by fedfms-secure 9.0.*upgrade"):
        load_model(tmp_path / "future.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="no 'format' entry"):
        load_model(tmp_path / "other.pt")
    torch.save(argparse.Namespace(weights=1), tmp_path / "objects.pt")
    with pytest.raises(ModelError, match="safe load refuses"):
        load_model(tmp_path / "objects.pt")


def test_a_file_that_does_not_fit_its_preset_is_refused(saved, tmp_path: Path) -> None:
    path, _, _ = saved
    doc = torch.load(path, weights_only=True)
    dropped = next(iter(doc["state_dict"]))
    del doc["state_dict"][dropped]
    torch.save(doc, tmp_path / "short.pt")
    with pytest.raises(ModelError, match=f"missing .*{dropped}"):
        load_model(tmp_path / "short.pt")
    doc = torch.load(path, weights_only=True)
    key = doc["communicated"][0]
    doc["state_dict"][key] = torch.full_like(doc["state_dict"][key], float("nan"))
    torch.save(doc, tmp_path / "nan.pt")
    with pytest.raises(ModelError, match="NaN"):
        load_model(tmp_path / "nan.pt")


def test_a_fedsam_model_at_another_size_saves_and_loads(tmp_path: Path) -> None:
    # FedSAM communicates the positional tables, whose state-dict keys are SAM's official names
    model = build_model("tiny", seed=3, img_size=32)
    names = apply_mode(model, "fedsam")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names:
                param.add_(0.01 * torch.randn_like(param))
    path = save_model_file(tmp_path / "model.pt", model, names, mode="fedsam", seed=3, pretrained=True, data=DATA,
                           label_spec=None, source="federated")
    doc = torch.load(path, weights_only=True)
    assert "sam.image_encoder.pos_embed" in doc["communicated"] and len(doc["communicated"]) == len(names)
    loaded = load_model(path)
    assert loaded.meta.img_size == 32
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), model.eval()(x))
    np.testing.assert_array_equal(read_model_file(path)[1], flatten(model, names))
