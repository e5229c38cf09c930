"""Read one image/label pair through MONAI and turn it into 2-D training slices.

Per volume: clip intensity at percentiles (default 0.5 / 99.5) and scale to [0, 1]; map the label
values onto the model's classes (:mod:`fedfms_secure.data.labels`; by default every non-zero value
is foreground); slice along ``axis`` (an axis of the stored voxel array, as the file holds it: no
reorientation); keep every foreground slice and only every ``keep_empty_every``-th empty one
(FedFMS keeps one in five); resize to ``image_size`` squared (bilinear, antialiased, for the image;
nearest for the label). A 2-D image (PNG) is one slice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedfms_secure.data.labels import LabelMap, resolve_label_map
from fedfms_secure.errors import ConfigError, DataError

CLIP_PERCENTILES = (0.5, 99.5)
# Bump when the preprocessing changes what it produces: cached slices of older versions are rebuilt.
PREPROCESS_VERSION = 2
DEFAULT_LABEL_MAP = LabelMap(pairs=None, names=("foreground",))

log = logging.getLogger("fedfms_secure.data")


@dataclass(frozen=True)
class Preprocessing:
    """Every option that changes the slices a file gives (the slice cache's key includes them all)."""

    image_size: int
    axis: int = 2
    keep_empty_every: int = 5
    clip_percentiles: tuple[float, float] = CLIP_PERCENTILES
    label_map: LabelMap = field(default=DEFAULT_LABEL_MAP)

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"image_size={self.image_size} is too small; use at least 8 (SAM uses 1024).")
        if self.axis not in (0, 1, 2):
            raise ConfigError(f"axis={self.axis} must be 0, 1 or 2 (the axis 3-D volumes are sliced along).")
        if self.keep_empty_every < 0:
            raise ConfigError(
                f"keep_empty_every={self.keep_empty_every} must be >= 0 (5 keeps one empty slice in five, "
                "0 drops them all)."
            )
        object.__setattr__(self, "clip_percentiles", check_percentiles(self.clip_percentiles))

    def digest(self) -> str:
        """A hash of every option (and of the preprocessing version)."""
        doc = {
            "version": PREPROCESS_VERSION,
            "image_size": self.image_size,
            "axis": self.axis,
            "keep_empty_every": self.keep_empty_every,
            "clip_percentiles": list(self.clip_percentiles),
            "label_map": None if self.label_map.pairs is None else [list(p) for p in self.label_map.pairs],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON form, for reports and model files."""
        return {
            "image_size": self.image_size,
            "axis": self.axis,
            "keep_empty_every": self.keep_empty_every,
            "clip_percentiles": list(self.clip_percentiles),
            "labels": self.label_map.describe(),
        }


def check_percentiles(value: Any) -> tuple[float, float]:
    """``(low, high)`` with ``0 <= low < high <= 100``, from a pair or a ``"LOW,HIGH"`` string."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            value = tuple(float(p) for p in parts)
        except ValueError:
            raise ConfigError(f"clip percentiles {value!r} must be two numbers LOW,HIGH such as 0.5,99.5") from None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"clip percentiles {value!r} must be two numbers LOW,HIGH such as 0.5,99.5") from None
    if not (0.0 <= low < high <= 100.0) or math.isnan(low) or math.isnan(high):
        raise ConfigError(f"clip percentiles {low:g},{high:g} must satisfy 0 <= LOW < HIGH <= 100 (e.g. 0.5,99.5)")
    return (low, high)


def preprocessing_for(
    site_dir: Path | None,
    *,
    image_size: int,
    axis: int = 2,
    keep_empty_every: int = 5,
    clip_percentiles: Any = CLIP_PERCENTILES,
    labels: Any = None,
) -> Preprocessing:
    """A :class:`Preprocessing` whose label map (a spec, see :mod:`~fedfms_secure.data.labels`) is
    resolved against ``site_dir``'s ``dataset.json``."""
    return Preprocessing(
        image_size=image_size,
        axis=axis,
        keep_empty_every=keep_empty_every,
        clip_percentiles=check_percentiles(clip_percentiles),
        label_map=resolve_label_map(labels, site_dir),
    )


def load_pair_slices(pair: Any, options: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed slices of one case (a :class:`~fedfms_secure.data.layout.CasePair`).

    Returns ``(images, labels)``: images float32 ``[n, 1, S, S]`` in [0, 1], labels uint8
    ``[n, 1, S, S]`` of class indices (0 background). Raises :class:`DataError` naming the file if
    it is unreadable or empty, or if image and label do not match (shape, or orientation).
    """
    assert pair.label is not None
    image, image_affine = read_image(pair.image)
    label_raw, label_affine = read_volume(pair.label)
    label = options.label_map.apply(_to_single_channel(label_raw, pair.label, is_label=True))
    check_pair(pair.image, image.shape, image_affine, pair.label, label.shape, label_affine)
    image = normalize_intensity(image, options.clip_percentiles)
    if image.ndim == 2:  # a 2-D picture is a single slice, kept whether empty or not
        image, label = image[None], label[None]
    else:
        image, label = np.moveaxis(image, options.axis, 0), np.moveaxis(label, options.axis, 0)
        keep = slices_to_keep(label, options.keep_empty_every)
        image, label = image[keep], label[keep]
    return resize_slices(image, label, options.image_size)


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """An image file as training reads it: one intensity channel (grey of an RGB picture, first
    modality of a 4-D volume) as float32 ``[H, W]`` or ``[X, Y, Z]``, and its affine (None for PNG)."""
    raw, affine = read_volume(path)
    return _to_single_channel(raw, path, is_label=False), affine


def image_slices(image: np.ndarray, options: Preprocessing) -> torch.Tensor:
    """Every slice of one image (from :func:`read_image`) as the model sees it in training:
    intensity clipped and scaled over the whole image, sliced along ``options.axis`` (a 2-D
    picture is one slice), resized to ``image_size`` squared. Returns float32 ``[n, 1, S, S]``;
    no slice is dropped (slice ``i`` is index ``i`` along the axis)."""
    image = normalize_intensity(image, options.clip_percentiles)
    image = image[None] if image.ndim == 2 else np.moveaxis(image, options.axis, 0)
    return resize_images(image, options.image_size)


def check_pair(image_path: Path, image_shape: tuple[int, ...], image_affine: np.ndarray | None,
               label_path: Path, label_shape: tuple[int, ...], label_affine: np.ndarray | None) -> str | None:
    """DataError if the spatial shapes or the axis orientations differ; returns a warning text
    (also logged) if the voxel spacing or origin differ beyond rounding, else None."""
    if tuple(image_shape) != tuple(label_shape):
        raise DataError(
            f"shape mismatch: image {image_path} is {tuple(image_shape)} but label {label_path} is "
            f"{tuple(label_shape)}; resample the label onto the image grid or remove the pair."
        )
    if image_affine is None or label_affine is None or len(image_shape) != 3:
        return None
    import nibabel as nib

    image_axes, label_axes = nib.aff2axcodes(image_affine), nib.aff2axcodes(label_affine)
    if image_axes != label_axes:
        raise DataError(
            f"orientation mismatch: label {label_path} is stored {''.join(label_axes)} but image {image_path} "
            f"{''.join(image_axes)}, so their voxels do not line up; resample the label onto the image grid "
            "or remove the pair."
        )
    if not np.allclose(image_affine, label_affine, rtol=1e-4, atol=1e-3):
        message = (f"label {label_path} has another voxel spacing or origin than image {image_path} "
                   "(same shape and orientation: used voxel for voxel); check that they belong together")
        log.warning("%s", message)
        return message
    return None


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """An image file read through MONAI ``LoadImage`` (channel first) as a float32 numpy array,
    and its affine (NIfTI only; None for PNG).

    DataError naming ``path`` if it cannot be read or holds no voxel at all.
    """
    is_png = path.name.lower().endswith(".png")
    loader, reader = _png_loader() if is_png else _nifti_loader()
    try:
        # the reader passed at call time: its own error surfaces, not MONAI's "cannot find a
        # suitable reader ... install the reader libraries" after trying every other reader
        data = loader(str(path), reader=reader)
    except Exception as exc:  # readers raise anything from EOFError to nibabel ImageFileError
        raise DataError(
            f"cannot read {path} ({type(exc).__name__}: {exc}); the file is corrupt or not an "
            "image: re-export or re-download it, or remove it (and its pair) from the site."
        ) from exc
    affine = None
    if not is_png and getattr(data, "affine", None) is not None:
        affine = np.asarray(data.affine, dtype=np.float64)
    try:
        array = np.asarray(data, dtype=np.float32)
    except Exception as exc:  # a truncated payload surfaces here with some readers
        raise DataError(f"cannot read the voxels of {path} ({type(exc).__name__}: {exc}); the file is corrupt: "
                        "re-export it, or remove it (and its pair) from the site.") from exc
    if array.size == 0:
        raise DataError(
            f"{path} holds no voxels (a dimension of size 0); re-export it, or remove it (and its pair) "
            "from the site."
        )
    return array, affine


def read_array(path: Path) -> np.ndarray:
    """:func:`read_volume` without the affine."""
    return read_volume(path)[0]


def normalize_intensity(volume: np.ndarray, percentiles: tuple[float, float] = CLIP_PERCENTILES) -> np.ndarray:
    """Clip at the given percentiles of the volume and scale to [0, 1] (float32)."""
    if volume.size == 0:
        raise DataError(f"cannot normalize an empty volume (shape {volume.shape}): it holds no voxels")
    volume = np.nan_to_num(volume.astype(np.float32, copy=False))
    lo, hi = np.percentile(volume, percentiles)
    if hi - lo <= 1e-8 * max(1.0, abs(hi)):
        return np.zeros_like(volume)
    return np.clip((volume - lo) / (hi - lo), 0.0, 1.0).astype(np.float32, copy=False)


def slices_to_keep(label: np.ndarray, keep_empty_every: int) -> np.ndarray:
    """Mask over the first axis: all foreground slices, every k-th empty one (k=0: none)."""
    foreground = label.reshape(label.shape[0], -1).any(axis=1)
    empty_rank = np.cumsum(~foreground) - 1  # 0, 1, 2, ... over the empty slices
    if keep_empty_every <= 0:
        return foreground
    return foreground | (~foreground & (empty_rank % keep_empty_every == 0))


def resize_slices(
    image: np.ndarray, label: np.ndarray, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``[n, H, W]`` slices to ``[n, 1, size, size]``: bilinear image, nearest label
    (class indices, uint8)."""
    img = resize_images(image, size)
    lab = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[:, None]
    if lab.shape[0] == 0:
        return img, lab.new_zeros(0, 1, size, size).to(torch.uint8)
    lab = F.interpolate(lab, size=(size, size), mode="nearest-exact")
    return img, lab.round_().to(torch.uint8)


def resize_images(image: np.ndarray, size: int) -> torch.Tensor:
    """Resize ``[n, H, W]`` intensity slices to ``[n, 1, size, size]`` (bilinear, antialiased,
    clamped to [0, 1])."""
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[:, None]
    if img.shape[0] == 0:
        return img.new_zeros(0, 1, size, size)
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return img.clamp_(0.0, 1.0)


def _to_single_channel(array: np.ndarray, path: Path, *, is_label: bool) -> np.ndarray:
    """Drop the channel axis that ``EnsureChannelFirst`` added; keep channel 0 of multi-channel."""
    if array.ndim not in (3, 4):
        raise DataError(
            f"{path} has {array.ndim - 1} spatial dimensions; expected a 2-D picture or a 3-D "
            "volume."
        )
    if array.shape[0] == 1:
        return array[0]
    if is_label:
        if array.ndim == 3 and array.shape[0] in (3, 4):  # an RGB(A) mask picture
            return array[:3].max(axis=0)
        raise DataError(
            f"label {path} has {array.shape[0]} channels; expected a single-channel label map."
        )
    if array.ndim == 3 and array.shape[0] in (3, 4):  # an RGB(A) picture -> grey
        return array[:3].mean(axis=0)
    return array[0]  # a 4-D MSD volume (e.g. several MR sequences): first modality


@functools.cache
def _nifti_loader() -> tuple[Any, Any]:
    """MONAI ``LoadImage`` and the ``NibabelReader`` it is called with."""
    from monai.data import NibabelReader
    from monai.transforms import LoadImage  # imported late: monai takes seconds to import

    reader = NibabelReader()
    return LoadImage(image_only=True, ensure_channel_first=True, reader=reader), reader


@functools.cache
def _png_loader() -> tuple[Any, Any]:
    """MONAI ``LoadImage`` and the ``PILReader`` it is called with."""
    from monai.data import PILReader
    from monai.transforms import LoadImage

    # reverse_indexing=False keeps PNGs as [H, W] (rows first), as they are displayed.
    reader = PILReader(reverse_indexing=False)
    return LoadImage(image_only=True, ensure_channel_first=True, reader=reader), reader
