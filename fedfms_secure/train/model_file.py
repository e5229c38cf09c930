"""A trained model as one file: the communicated parameters and what is needed to rebuild the rest.

Everything outside the communicated vector is public and rebuilt from the preset, the seed and
whether the preset starts pretrained (as every site builds theta_0), so the file holds only::

    {"format": 1, "preset", "img_size", "mode", "seed", "pretrained", "num_classes", "prompt",
     "names": [communicated parameter names], "vector": float32 tensor,
     "data": {preprocessing: image_size, axis, keep_empty_every, clip_percentiles, labels},
     "label_spec": the label spec the model was trained with (str, dict or None),
     "source": "federated" | "central" | "local", "info": {...}}

A site writes the final global model to ``STATE/final_model.pt``; ``train central|local --out``
write theirs; ``fedfms-secure evaluate --model FILE --data SITE_DIR`` scores any of them. Files are
read with ``torch.load(weights_only=True)``: no code in them runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fedfms_secure.atomic import write_atomic_with
from fedfms_secure.errors import ModelError

MODEL_FILE_FORMAT = 1
FINAL_MODEL = "final_model.pt"


@dataclass(frozen=True)
class ModelFile:
    """The header of a model file (without the vector)."""

    path: Path
    preset: str
    img_size: int
    mode: str
    seed: int
    pretrained: bool
    num_classes: int
    prompt: str
    names: tuple[str, ...]
    data: dict[str, Any]
    label_spec: Any
    source: str
    info: dict[str, Any]


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
    """Write ``model``'s parameters ``names`` (its communicated vector) and its recipe, atomically."""
    from fedfms_secure.model.vector import flatten

    path = Path(path)
    vector = torch.from_numpy(flatten(model, list(names)).astype(np.float32))
    doc = {
        "format": MODEL_FILE_FORMAT,
        "preset": model.preset.name,
        "img_size": int(model.preset.img_size),
        "mode": mode,
        "seed": int(seed),
        "pretrained": bool(pretrained),
        "num_classes": int(model.num_classes),
        "prompt": model.prompt,
        "names": list(names),
        "vector": vector,
        "data": data,
        "label_spec": label_spec,
        "source": source,
        "info": info or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_with(path, lambda handle: torch.save(doc, handle))
    return path


def read_model_file(path: Path) -> tuple[ModelFile, np.ndarray]:
    """The header and the vector of a model file; :class:`ModelError` naming the file if it is
    missing, corrupt or not a model file of this version."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; a site writes STATE/{FINAL_MODEL} after the last "
                         "round, and `train central|local --out DIR` writes DIR/*_model.pt")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle refused by weights_only, ...
        raise ModelError(f"model file {path} cannot be read ({type(exc).__name__}: {exc}); it is corrupt or "
                         "not a fedfms-secure model file") from exc
    if not isinstance(doc, dict) or doc.get("format") != MODEL_FILE_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ModelError(f"{path} is not a fedfms-secure model file of format {MODEL_FILE_FORMAT} (got {got!r})")
    try:
        header = ModelFile(
            path=path, preset=str(doc["preset"]), img_size=int(doc["img_size"]), mode=str(doc["mode"]),
            seed=int(doc["seed"]), pretrained=bool(doc["pretrained"]), num_classes=int(doc["num_classes"]),
            prompt=str(doc["prompt"]), names=tuple(str(n) for n in doc["names"]), data=dict(doc["data"]),
            label_spec=doc.get("label_spec"), source=str(doc.get("source", "")), info=dict(doc.get("info") or {}),
        )
        vector = doc["vector"]
        if not isinstance(vector, torch.Tensor) or vector.dim() != 1:
            raise TypeError("vector is not a 1-D tensor")
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model file {path} is incomplete ({type(exc).__name__}: {exc})") from exc
    return header, vector.to(torch.float32).numpy()


def load_model_file(path: Path) -> tuple[Any, ModelFile]:
    """The model a file describes, rebuilt and loaded: ``(SamSegmenter, header)``."""
    from fedfms_secure.model.modes import apply_mode
    from fedfms_secure.model.registry import build_model, get_preset
    from fedfms_secure.model.vector import load_vector

    header, vector = read_model_file(path)
    img_size = None if header.img_size == get_preset(header.preset).img_size else header.img_size
    model = build_model(header.preset, seed=header.seed, pretrained=None if header.pretrained else False,
                        num_classes=header.num_classes, prompt=header.prompt, img_size=img_size)
    names = apply_mode(model, header.mode)
    if tuple(names) != header.names:
        raise ModelError(f"model file {path} names other parameters than preset {header.preset!r} in mode "
                         f"{header.mode!r} communicates; it was written by another version")
    load_vector(model, names, vector)
    model.eval()
    return model, header


__all__ = ["FINAL_MODEL", "MODEL_FILE_FORMAT", "ModelFile", "load_model_file", "read_model_file",
           "save_model_file"]
