"""Read one image/label pair through MONAI and turn it into 2-D training slices.

Per volume: clip intensity at the 0.5 / 99.5 percentiles and scale to [0, 1]; binarise the label
(``label > 0``); slice along ``axis``; keep every foreground slice and only every
``keep_empty_every``-th empty one (FedFMS keeps one in five); resize to ``image_size`` squared
(bilinear, antialiased, for the image; nearest for the label). A 2-D image (PNG) is one slice.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedfms_secure.data.layout import CasePair
from fedfms_secure.errors import DataError

CLIP_PERCENTILES = (0.5, 99.5)


def load_pair_slices(
    pair: CasePair, *, image_size: int, axis: int, keep_empty_every: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed slices of one case.

    Returns ``(images, labels)``: images float32 ``[n, 1, S, S]`` in [0, 1], labels bool
    ``[n, 1, S, S]``. Raises
    :class:`DataError` naming the file if it is unreadable or empty, or the shapes do not match.
    """
    assert pair.label is not None
    image = _to_single_channel(read_array(pair.image), pair.image, is_label=False)
    label = _to_single_channel(read_array(pair.label), pair.label, is_label=True) > 0
    if image.shape != label.shape:
        raise DataError(
            f"shape mismatch: image {pair.image} is {image.shape} but label {pair.label} is "
            f"{label.shape}; resample the label onto the image grid or remove the pair."
        )
    image = normalize_intensity(image)
    if image.ndim == 2:  # a 2-D picture is a single slice, kept whether empty or not
        image, label = image[None], label[None]
    else:
        image, label = np.moveaxis(image, axis, 0), np.moveaxis(label, axis, 0)
        keep = slices_to_keep(label, keep_empty_every)
        image, label = image[keep], label[keep]
    return resize_slices(image, label, image_size)


def read_array(path: Path) -> np.ndarray:
    """Read an image file through MONAI ``LoadImage`` (channel first) as a numpy array.

    DataError naming ``path`` if it cannot be read or holds no voxel at all.
    """
    loader = _png_loader() if path.name.lower().endswith(".png") else _nifti_loader()
    try:
        data = loader(str(path))
    except Exception as exc:  # readers raise anything from EOFError to nibabel ImageFileError
        raise DataError(
            f"cannot read {path} ({type(exc).__name__}: {exc}); the file is corrupt or not an "
            "image: re-export or re-download it, or remove it (and its pair) from the site."
        ) from exc
    array = np.asarray(data, dtype=np.float32)
    if array.size == 0:
        raise DataError(
            f"{path} holds no voxels (a dimension of size 0); re-export it, or remove it (and its pair) "
            "from the site."
        )
    return array


def normalize_intensity(volume: np.ndarray) -> np.ndarray:
    """Clip at the 0.5 / 99.5 percentiles of the volume and scale to [0, 1] (float32)."""
    if volume.size == 0:
        raise DataError(f"cannot normalize an empty volume (shape {volume.shape}): it holds no voxels")
    volume = np.nan_to_num(volume.astype(np.float32, copy=False))
    lo, hi = np.percentile(volume, CLIP_PERCENTILES)
    if hi - lo <= 1e-8 * max(1.0, abs(hi)):
        return np.zeros_like(volume)
    return np.clip((volume - lo) / (hi - lo), 0.0, 1.0)


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
    """Resize ``[n, H, W]`` slices to ``[n, 1, size, size]``: bilinear image, nearest label."""
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[:, None]
    lab = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[:, None]
    if img.shape[0] == 0:
        return img.new_zeros(0, 1, size, size), lab.new_zeros(0, 1, size, size).bool()
    img = F.interpolate(
        img, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    lab = F.interpolate(lab, size=(size, size), mode="nearest-exact")
    return img.clamp_(0.0, 1.0), lab > 0.5


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
def _nifti_loader() -> Any:
    from monai.transforms import LoadImage  # imported late: monai takes seconds to import

    return LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")


@functools.cache
def _png_loader() -> Any:
    from monai.data import PILReader
    from monai.transforms import LoadImage

    # reverse_indexing=False keeps PNGs as [H, W] (rows first), as they are displayed.
    return LoadImage(
        image_only=True, ensure_channel_first=True, reader=PILReader(reverse_indexing=False)
    )
