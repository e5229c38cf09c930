"""Segment new scans with a trained model file: one mask per input, on the input's own grid.

Each input is read and sliced exactly as training reads it
(:func:`~fedfms_secure.data.preprocess.read_image`, :func:`~fedfms_secure.data.preprocess.image_slices`:
same slicing axis, intensity clipping and scaling over the whole image, resize to the model's
square), but every slice is kept. The model's logits of each slice are resized (bilinear) back to
the slice's own size and only then turned into a label map: a pixel is background unless some
class's probability (sigmoid) exceeds 0.5; otherwise it takes the most probable class, written as
that class's label value (``ModelFile.label_values``). With one class this is exactly the
evaluation's threshold, applied on the input grid instead of the model's.

Prompts: a prompt-free model (the default) needs none. A model trained with box prompts got each
class's box from the label in training and evaluation; a new scan has no label, so every class is
prompted with the whole slice, which is the box training gives a class absent from a slice.
Such a model's predictions are therefore not the ones ``evaluate`` scores.

Outputs: NIfTI in, NIfTI out (same file name, shape, voxel grid, affine and header orientation;
the labels as integers); PNG in, PNG out (same size; 8-bit, or 16-bit if a label value exceeds
255). With ``probabilities`` the per-class probabilities go to ``OUT/probabilities/``: a float32
NIfTI with the classes on a 4th axis, or a ``.npy`` array ``[K, H, W]`` for a PNG.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedfms_secure.data.layout import SUFFIXES, image_stem
from fedfms_secure.device import resolve_device
from fedfms_secure.errors import ConfigError, DataError

log = logging.getLogger("fedfms_secure.predict")

TEST_IMAGES, TRAIN_IMAGES = "imagesTs", "imagesTr"
PROBABILITIES_DIR = "probabilities"
THRESHOLD = 0.5
_EXTRA_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# (input file, slices done, slices in the file)
Progress = Callable[[Path, int, int], None]


@dataclass
class Prediction:
    """What :func:`predict_file` wrote for one input."""

    source: Path
    mask: Path
    shape: tuple[int, ...]
    slices: int
    voxels: dict[int, int]  # label value -> how many voxels (pixels) carry it, background excluded
    probabilities: Path | None = None


@dataclass
class PredictOptions:
    """How :func:`predict_path` runs: ``device`` ("auto", "cpu", "cuda", "cuda:N"), slices per
    forward pass, whether to write probabilities and to replace existing outputs."""

    device: str = "auto"
    batch_size: int = 16
    probabilities: bool = False
    overwrite: bool = False
    progress: Progress | None = field(default=None, repr=False)


def find_inputs(path: Path) -> list[Path]:
    """The images to segment: ``path`` itself (a ``.nii.gz``, ``.nii`` or ``.png`` file), the image
    files of a folder, or of an MSD site folder's ``imagesTs/`` (else ``imagesTr/``). Hidden files
    are skipped, and so are nnU-Net's extra channels (``case_0001``) beside a ``case_0000``."""
    path = Path(path)
    if path.is_file():
        if not path.name.lower().endswith(SUFFIXES):
            raise DataError(f"{path} is not a NIfTI (.nii, .nii.gz) or PNG file; pass such a file or a folder of them")
        return [path]
    if not path.is_dir():
        raise DataError(f"input {path} does not exist; pass a NIfTI or PNG file, a folder of them, or a site folder")
    folder = path
    for sub in (TEST_IMAGES, TRAIN_IMAGES):
        if (path / sub).is_dir():
            folder = path / sub
            break
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(SUFFIXES))
    stems = {image_stem(p) for p in files}
    kept = []
    for p in files:
        m = _EXTRA_CHANNEL.match(image_stem(p))
        if m and m["channel"] != "0000" and f"{m['case']}_0000" in stems:
            log.debug("skipping %s: an extra nnU-Net channel (the model reads channel 0000)", p)
            continue
        kept.append(p)
    if not kept:
        raise DataError(f"{folder} holds no NIfTI (.nii, .nii.gz) or PNG file to segment")
    return kept


def predict_path(loaded: Any, path: Path, out_dir: Path, options: PredictOptions | None = None) -> list[Prediction]:
    """Segment every input :func:`find_inputs` finds under ``path`` with ``loaded`` (a
    :class:`~fedfms_secure.train.model_file.LoadedModel`), writing into ``out_dir``.

    Nothing is written if ``out_dir`` is the folder of the inputs, or (without ``overwrite``)
    if an output already exists: both raise :class:`ConfigError` before any model runs.
    """
    options = options or PredictOptions()
    if options.batch_size < 1:
        raise ConfigError(f"batch size {options.batch_size} must be at least 1")
    inputs = find_inputs(path)
    out_dir = Path(out_dir)
    if any(p.parent.resolve() == out_dir.resolve() for p in inputs):
        raise ConfigError(f"--out {out_dir} is the folder of the input images: masks of the same name would "
                          "replace them; choose another folder")
    targets = [out_dir / p.name for p in inputs]
    if options.probabilities:
        targets += [_probabilities_path(out_dir, p) for p in inputs]
    existing = [t for t in targets if t.exists()]
    if existing and not options.overwrite:
        raise ConfigError(f"{len(existing)} output file(s) exist already, e.g. {existing[0]}; pass --overwrite to "
                          "replace them, or choose another --out")
    device = resolve_device(options.device)
    model = loaded.model.to(device).eval()
    if loaded.meta.prompt == "box":
        log.warning("this model was trained with box prompts from the labels; without a label every class is "
                    "prompted with the whole slice, so its masks differ from what `evaluate` scores")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [predict_file(model, loaded.meta, p, out_dir, device=device, batch_size=options.batch_size,
                         probabilities=options.probabilities, progress=options.progress) for p in inputs]


@torch.no_grad()
def predict_file(model: Any, meta: Any, path: Path, out_dir: Path, *, device: torch.device, batch_size: int = 16,
                 probabilities: bool = False, progress: Progress | None = None) -> Prediction:
    """Segment one image file (see the module docstring) and write its mask into ``out_dir``."""
    from fedfms_secure.data.preprocess import image_slices, read_image

    preprocessing = meta.preprocessing()
    image, _ = read_image(path)
    if image.ndim not in (2, 3):
        raise DataError(f"{path} has {image.ndim} dimensions; expected a 2-D picture or a 3-D volume")
    slices = image_slices(image, preprocessing)  # [n, 1, S, S]
    axis = preprocessing.axis if image.ndim == 3 else 0
    plane = image.shape[:axis] + image.shape[axis + 1:] if image.ndim == 3 else image.shape
    n, k = slices.shape[0], meta.num_classes
    values = torch.tensor([0, *meta.label_values], dtype=torch.int64)
    labels = np.zeros((n, *plane), dtype=np.int32)
    probs = np.zeros((n, k, *plane), dtype=np.float32) if probabilities else None
    for start in range(0, n, batch_size):
        batch = slices[start:start + batch_size].to(device)
        logits = model(batch, _whole_image_boxes(batch, k)) if meta.prompt == "box" else model(batch)
        on_grid = torch.sigmoid(F.interpolate(logits.float(), size=tuple(plane), mode="bilinear",
                                              align_corners=False)).cpu()
        best, index = on_grid.max(dim=1)
        labels[start:start + len(batch)] = torch.where(best > THRESHOLD, values[index + 1], 0).numpy()
        if probs is not None:
            probs[start:start + len(batch)] = on_grid.numpy()
        if progress is not None:
            progress(path, min(start + batch_size, n), n)
    mask = labels[0] if image.ndim == 2 else np.moveaxis(labels, 0, axis)
    written = _write_mask(path, out_dir / path.name, mask, max(meta.label_values))
    prob_path = None
    if probs is not None:
        prob_path = _write_probabilities(path, _probabilities_path(out_dir, path), probs, axis, image.ndim)
    counts = {int(v): int((mask == v).sum()) for v in meta.label_values}
    return Prediction(source=path, mask=written, shape=tuple(mask.shape), slices=n, voxels=counts,
                      probabilities=prob_path)


def _whole_image_boxes(batch: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One ``(0, 0, S-1, S-1)`` box per class: training's box for a class absent from a slice."""
    size = batch.shape[-1]
    box = torch.tensor([0.0, 0.0, size - 1.0, size - 1.0], device=batch.device)
    return box.expand(batch.shape[0], num_classes, 4)


def _is_png(path: Path) -> bool:
    return path.name.lower().endswith(".png")


def _probabilities_path(out_dir: Path, source: Path) -> Path:
    name = f"{image_stem(source)}.npy" if _is_png(source) else source.name
    return out_dir / PROBABILITIES_DIR / name


def _write_mask(source: Path, target: Path, mask: np.ndarray, top: int) -> Path:
    if _is_png(source):
        from PIL import Image

        array = mask.astype(np.uint8 if top <= 255 else np.uint16)
        _save_via_tmp(target, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
        return target
    import nibabel as nib

    reference = nib.load(str(source))
    if tuple(reference.shape[:3]) != tuple(mask.shape):
        raise DataError(f"{source}: the mask came out {mask.shape} but the file's grid is {reference.shape}; "
                        "this file's layout is not supported by predict")
    header = reference.header.copy()
    dtype = np.uint8 if top <= 255 else np.int16 if top <= 32767 else np.int32
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    image = type(reference)(mask.astype(dtype), reference.affine, header)
    _save_via_tmp(target, lambda tmp: nib.save(image, str(tmp)))
    return target


def _write_probabilities(source: Path, target: Path, probs: np.ndarray, axis: int, ndim: int) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    if _is_png(source):  # [1, K, H, W] -> [K, H, W]
        _save_via_tmp(target, lambda tmp: np.save(tmp, probs[0]))
        return target
    import nibabel as nib

    reference = nib.load(str(source))
    volume = np.moveaxis(np.moveaxis(probs, 1, -1), 0, axis)  # [n, K, a, b] -> [X, Y, Z, K]
    header = reference.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    image = type(reference)(volume.astype(np.float32), reference.affine, header)
    _save_via_tmp(target, lambda tmp: nib.save(image, str(tmp)))
    return target


def _save_via_tmp(target: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary file of the same suffix, then rename: no half-written output."""
    import os

    name = target.name
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else target.suffix
    tmp = target.with_name(f".{name[: len(name) - len(suffix)]}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = ["PredictOptions", "Prediction", "find_inputs", "predict_file", "predict_path", "resolve_device"]
