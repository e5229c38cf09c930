"""A trained model as one self-contained file: its weights and everything prediction needs.

Format 2 (written by this version) is a ``torch.save`` dict of plain values and tensors::

    {"format": 2, "fedfms_secure_version": "0.1.0",
     "preset": "tiny", "img_size": 64, "mode": "fedmsa", "seed": 0, "pretrained": True,
     "num_classes": K, "prompt": "none" | "box",
     "class_names": [name of class 1..K], "label_values": [label value written for class 1..K],
     "data": {"image_size", "axis", "keep_empty_every", "clip_percentiles",
              "labels": {"classes": {"1": name}, "map": "non-zero" | {"value": class}}},
     "label_spec": the label spec the model was trained with (str, dict or None),
     "communicated": [names of the parameters the federation trained and exchanged],
     "state_dict": {parameter or buffer name: tensor}   (every weight of the model, on the CPU),
     "source": "federated" | "central" | "local", "info": {...}}

``label_values[k-1]`` is the smallest label value the class map sends to class ``k`` (1 for the
default "every non-zero value is foreground"). Format 1 (earlier versions) held only the
communicated parameters as one flat ``vector`` and rebuilt the rest from the preset, the seed and
the weights that ship with the package; it is still read when that suffices.

A site writes the final global model to ``STATE/final_model.pt``; ``train central|local --out``
write theirs. :func:`load_model` (also ``fedfms_secure.load_model``) gives the model ready for
inference with its :class:`ModelFile` header. Files are read with ``torch.load(weights_only=True)``:
no code in them runs. Every problem raises :class:`~fedfms_secure.errors.ModelError` naming the
file and what is wrong (missing, damaged, foreign, too new, incomplete).
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from fedfms_secure.atomic import write_atomic
from fedfms_secure.errors import ModelError

MODEL_FILE_FORMAT = 2
READABLE_FORMATS = (1, 2)
FINAL_MODEL = "final_model.pt"
_WHERE = (f"a site writes STATE/{FINAL_MODEL} after the last round, and `train central|local --out DIR` "
          "writes DIR/*_model.pt")
_HEADER_KEYS = ("preset", "img_size", "mode", "seed", "pretrained", "num_classes", "prompt", "data")


@dataclass(frozen=True)
class ModelFile:
    """What a model file says about its model (everything but the weights)."""

    path: Path
    format: int
    version: str | None  # the fedfms-secure version that wrote it (None: format 1 did not record it)
    preset: str
    img_size: int
    mode: str
    seed: int
    pretrained: bool
    num_classes: int
    prompt: str
    names: tuple[str, ...]  # the communicated parameters
    data: dict[str, Any]  # preprocessing settings (see the module docstring)
    label_spec: Any
    class_names: tuple[str, ...]
    label_values: tuple[int, ...]
    source: str
    info: dict[str, Any]

    def preprocessing(self) -> Any:
        """The :class:`~fedfms_secure.data.preprocess.Preprocessing` the model was trained with
        (its class map as recorded, so no site folder is needed)."""
        from fedfms_secure.data.labels import LabelMap
        from fedfms_secure.data.preprocess import CLIP_PERCENTILES, Preprocessing

        pairs = _label_pairs(self.data)
        return Preprocessing(
            image_size=self.img_size, axis=int(self.data.get("axis", 2)),
            keep_empty_every=int(self.data.get("keep_empty_every", 5)),
            clip_percentiles=tuple(self.data.get("clip_percentiles", CLIP_PERCENTILES)),
            label_map=LabelMap(pairs=pairs, names=self.class_names),
        )


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on ``device``) and its :class:`ModelFile` header."""

    model: Any  # fedfms_secure.model.segmenter.SamSegmenter
    meta: ModelFile

    def __iter__(self) -> Iterator[Any]:  # ``model, meta = load_model(path)``
        return iter((self.model, self.meta))


def save_model_file(
    path: Path,
    model: Any,
    names: Sequence[str],
    *,
    mode: str,
    seed: int,
    pretrained: bool,
    data: dict[str, Any],
    label_spec: Any,
    source: str,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (all its weights, ``names`` marked as the communicated parameters) and what
    prediction needs, atomically, in format :data:`MODEL_FILE_FORMAT`."""
    from fedfms_secure import __version__

    path = Path(path)
    # parameters by their state-dict keys (the positional tables are saved under SAM's official names)
    key_of = {id(value): key for key, value in model.state_dict(keep_vars=True).items()}
    params = dict(model.named_parameters())
    names = [key_of.get(id(params[n]), n) if n in params else n for n in names]
    state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
    missing = [n for n in names if n not in state]
    if missing:
        raise ModelError(f"cannot save {path}: the model has no parameter(s) {missing[:3]}")
    labels = data.get("labels") or {}
    classes = labels.get("classes") or {}
    class_names = [str(classes.get(str(k), f"class {k}")) for k in range(1, int(model.num_classes) + 1)]
    doc = {
        "format": MODEL_FILE_FORMAT,
        "fedfms_secure_version": __version__,
        "preset": model.preset.name,
        "img_size": int(model.preset.img_size),
        "mode": mode,
        "seed": int(seed),
        "pretrained": bool(pretrained),
        "num_classes": int(model.num_classes),
        "prompt": model.prompt,
        "class_names": class_names,
        "label_values": _label_values(data, int(model.num_classes)),
        "data": data,
        "label_spec": label_spec,
        "communicated": names,
        "state_dict": state,
        "source": source,
        "info": info or {},
    }
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path


def read_model_file(path: Path) -> tuple[ModelFile, np.ndarray]:
    """The header and the communicated parameters (one float32 vector, in ``names`` order) of a
    model file of any readable format; :class:`ModelError` naming the file and the problem."""
    path = Path(path)
    doc = _read_doc(path)
    header = _header(path, doc)
    if header.format == 1:
        return header, doc["vector"].to(torch.float32).numpy()
    state = doc["state_dict"]
    if not header.names:
        return header, np.zeros(0, dtype=np.float32)
    return header, torch.cat([state[n].reshape(-1).to(torch.float32) for n in header.names]).numpy()


def load_model(path: Path | str, *, device: str | torch.device = "cpu") -> LoadedModel:
    """The model a file holds, rebuilt, loaded, in eval mode on ``device``, with its header.

    Raises :class:`ModelError` if the file is missing, damaged (e.g. truncated), not a
    fedfms-secure model file, written by a newer version, or lacks what rebuilding needs.
    """
    path = Path(path)
    doc = _read_doc(path)
    header = _header(path, doc)
    model = _load_v1(path, header, doc) if header.format == 1 else _load_v2(path, header, doc)
    model.eval()
    return LoadedModel(model=model.to(device), meta=header)


def load_model_file(path: Path) -> tuple[Any, ModelFile]:
    """``(model, header)`` of :func:`load_model` on the CPU."""
    loaded = load_model(path)
    return loaded.model, loaded.meta


def _read_doc(path: Path) -> dict[str, Any]:
    """The dict a model file holds, or a ModelError saying whether it is missing, damaged or foreign."""
    if not path.exists():
        raise ModelError(f"model file {path} does not exist; {_WHERE}")
    if not path.is_file():
        raise ModelError(f"model file {path} is not a file; pass the .pt file itself ({_WHERE})")
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head:
        raise ModelError(f"model file {path} is empty (0 bytes): it was cut off while being written or "
                         "copied; copy it again from where it was made")
    if head != b"PK\x03\x04":
        what = ("a PyTorch file in the legacy (non-zip) format" if head[:1] == b"\x80"
                else f"not a PyTorch file (it starts with {head!r})")
        raise ModelError(f"{path} is {what}, not a fedfms-secure model file; {_WHERE}")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"model file {path} is damaged: its zip archive has no end (truncated while being "
                         "written or copied); copy it again from where it was made")
    _check_crc(path)  # torch.load does not check the members' CRCs: a flipped byte would load silently
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"{path} holds Python objects other than tensors and plain values, which a safe load "
                         f"refuses ({str(exc).splitlines()[0]}); it is not a fedfms-secure model file; "
                         f"{_WHERE}") from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt zip member surfaces as RuntimeError, EOFError, ...
        raise ModelError(f"model file {path} is damaged and cannot be read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); copy it again from where it was "
                         "made") from exc
    if not isinstance(doc, dict):
        raise ModelError(f"{path} holds a {type(doc).__name__}, not a fedfms-secure model file; {_WHERE}")
    if "format" not in doc:
        if doc and all(isinstance(v, torch.Tensor) for v in doc.values()):
            raise ModelError(f"{path} is a bare state dict ({len(doc)} tensors, e.g. {next(iter(doc))!r}), not a "
                             "fedfms-secure model file; a SAM checkpoint is loaded with "
                             f"build_model(checkpoint=...); {_WHERE}")
        keys = ", ".join(repr(k) for k in list(doc)[:5])
        raise ModelError(f"{path} is not a fedfms-secure model file (no 'format' entry; it holds {keys}); {_WHERE}")
    version = doc["format"]
    if isinstance(version, int) and not isinstance(version, bool) and version > MODEL_FILE_FORMAT:
        from fedfms_secure import __version__

        raise ModelError(f"{path} is a model file of format {version}, written by fedfms-secure "
                         f"{doc.get('fedfms_secure_version', '(newer)')}; this version ({__version__}) reads "
                         f"formats {READABLE_FORMATS[0]}-{READABLE_FORMATS[-1]}: upgrade fedfms-secure")
    if version not in READABLE_FORMATS or isinstance(version, bool):
        raise ModelError(f"{path} has an unknown model file format {version!r}; it was not written by "
                         f"fedfms-secure ({_WHERE})")
    return doc


def _check_crc(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ModelError(f"model file {path} is damaged ({type(exc).__name__}: {exc}); copy it again from where "
                         "it was made") from exc
    if bad is not None:
        raise ModelError(f"model file {path} is damaged: its member {bad} fails its checksum; copy it again "
                         "from where it was made")


def _header(path: Path, doc: dict[str, Any]) -> ModelFile:
    version = int(doc["format"])
    needed = _HEADER_KEYS + (("names", "vector") if version == 1 else ("communicated", "state_dict"))
    missing = [key for key in needed if key not in doc]
    if missing:
        what = "an old model file (format 1)" if version == 1 else f"a model file of format {version}"
        raise ModelError(f"{path} is {what} that lacks {', '.join(missing)}, which rebuilding the model needs; "
                         "write it again (run the training or the federation again)")
    try:
        data = dict(doc["data"])
        num_classes = int(doc["num_classes"])
        classes = (data.get("labels") or {}).get("classes") or {}
        names = doc.get("class_names") or [classes.get(str(k), f"class {k}") for k in range(1, num_classes + 1)]
        values = doc.get("label_values") or _label_values(data, num_classes)
        header = ModelFile(
            path=path, format=version, version=doc.get("fedfms_secure_version"), preset=str(doc["preset"]),
            img_size=int(doc["img_size"]), mode=str(doc["mode"]), seed=int(doc["seed"]),
            pretrained=bool(doc["pretrained"]), num_classes=num_classes, prompt=str(doc["prompt"]),
            names=tuple(str(n) for n in doc["names" if version == 1 else "communicated"]), data=data,
            label_spec=doc.get("label_spec"), class_names=tuple(str(n) for n in names),
            label_values=tuple(int(v) for v in values), source=str(doc.get("source", "")),
            info=dict(doc.get("info") or {}),
        )
        if len(header.class_names) != num_classes or len(header.label_values) != num_classes:
            raise ValueError(f"{len(header.label_values)} label values for {num_classes} classes")
        if version == 1 and not (isinstance(doc["vector"], torch.Tensor) and doc["vector"].dim() == 1):
            raise TypeError("'vector' is not a 1-D tensor")
        if version == 2 and not (isinstance(doc["state_dict"], dict)
                                 and all(isinstance(t, torch.Tensor) for t in doc["state_dict"].values())):
            raise TypeError("'state_dict' is not a dict of tensors")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"model file {path} is incomplete or malformed ({type(exc).__name__}: {exc}); write it "
                         "again") from exc
    if version == 2:
        absent = [n for n in header.names if n not in doc["state_dict"]]
        if absent:
            raise ModelError(f"model file {path} lacks the weights of {absent[:3]}; write it again")
    return header


def _build(header: ModelFile, *, pretrained: bool | None) -> Any:
    from fedfms_secure.model.registry import build_model, get_preset

    img_size = None if header.img_size == get_preset(header.preset).img_size else header.img_size
    return build_model(header.preset, seed=header.seed, pretrained=pretrained, num_classes=header.num_classes,
                       prompt=header.prompt, img_size=img_size)


def _load_v2(path: Path, header: ModelFile, doc: dict[str, Any]) -> Any:
    # every weight comes from the file: the builder's warning about a random start does not apply
    with _quiet("fedfms_secure.model"):
        model = _build(header, pretrained=False)
    state = doc["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        parts = [f"{label} {items[:3]}" for label, items in
                 (("missing", missing), ("unexpected", extra), ("of another shape", wrong)) if items]
        raise ModelError(f"model file {path} does not fit preset {header.preset!r} ({'; '.join(parts)}); it was "
                         f"written by fedfms-secure {header.version or '(unknown)'} with another model layout")
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelError(f"model file {path} holds NaN or infinite weights in {bad[:3]}; refusing to use it")
    model.load_state_dict(state, strict=True)
    return model


def _load_v1(path: Path, header: ModelFile, doc: dict[str, Any]) -> Any:
    from fedfms_secure.model.modes import apply_mode
    from fedfms_secure.model.registry import shipped_weights
    from fedfms_secure.model.vector import load_vector

    weights = shipped_weights(header.preset)
    if header.pretrained and weights is not None and not weights.is_file():
        raise ModelError(f"{path} is an old model file (format 1): it holds only the trained parameters and needs "
                         f"the weights shipped for preset {header.preset!r} ({weights}), which are missing; "
                         "reinstall fedfms-secure")
    model = _build(header, pretrained=None if header.pretrained else False)
    names = apply_mode(model, header.mode)
    if tuple(names) != header.names:
        raise ModelError(f"old model file {path} names other parameters than preset {header.preset!r} in mode "
                         f"{header.mode!r} communicates; it was written by another version")
    load_vector(model, names, doc["vector"].to(torch.float32).numpy())
    return model


def _label_pairs(data: dict[str, Any]) -> tuple[tuple[int, int], ...] | None:
    mapping = (data.get("labels") or {}).get("map", "non-zero")
    if mapping == "non-zero" or mapping is None:
        return None
    return tuple(sorted((int(v), int(c)) for v, c in dict(mapping).items()))


def _label_values(data: dict[str, Any], num_classes: int) -> list[int]:
    """Per class 1..K, the smallest label value the class map sends there (1 for "non-zero")."""
    pairs = _label_pairs(data)
    if pairs is None:
        return [1] * num_classes if num_classes == 1 else list(range(1, num_classes + 1))
    values = []
    for cls in range(1, num_classes + 1):
        members = [v for v, c in pairs if c == cls]
        if not members:
            raise ValueError(f"the class map sends no label value to class {cls}")
        values.append(min(members))
    return values


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


__all__ = ["FINAL_MODEL", "MODEL_FILE_FORMAT", "READABLE_FORMATS", "LoadedModel", "ModelFile", "load_model",
           "load_model_file", "read_model_file", "save_model_file"]
