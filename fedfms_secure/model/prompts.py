"""Labels as per-class targets, and SAM box prompts derived from them.

A model with ``K`` foreground classes predicts ``K`` independent (sigmoid) masks, so classes may
overlap (the optic cup lies inside the optic disc). Labels come either as ``[B, K, S, S]`` binary
masks (one channel per class, overlap allowed) or as one ``[B, 1, S, S]`` map of class indices
``0..K`` (0 = background; class ``k`` is the pixels equal to ``k``). For ``K = 1`` a ``[B, 1, S, S]``
label is the foreground mask itself (values above 0.5).

Boxes are SAM's: the tight bounding box ``(x0, y0, x1, y1)`` of a class's mask in pixel
coordinates of the image, optionally jittered as SAM's training does (each coordinate moves by
Gaussian noise with a standard deviation of ``jitter`` times the box side, at most twice that).
A class that is absent from an image gets the whole image as its box.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedfms_secure.errors import ModelError

DEFAULT_BOX_JITTER = 0.1  # SAM: noise with std 10% of the box side


def label_targets(labels: Tensor, num_classes: int) -> Tensor:
    """``labels`` (see the module docstring) as float targets ``[B, K, S, S]`` in {0, 1}."""
    if labels.dim() != 4:
        raise ModelError(f"labels must be [B, C, S, S], got shape {tuple(labels.shape)}")
    channels = labels.shape[1]
    top = float(labels.max()) if labels.numel() else 0.0
    if channels == 1 and (top > num_classes + 0.5 or (num_classes == 1 and top > 1.0)):
        raise ModelError(
            f"label map holds class {round(top)}, but the model has num_classes={num_classes}; "
            "build the model with build_model(..., num_classes=K) for labels 0..K"
        )
    if channels == num_classes:
        return (labels > 0.5).to(torch.float32) if num_classes > 1 else labels.float()
    if channels == 1:
        index = labels[:, 0].round().long()
        classes = torch.arange(1, num_classes + 1, device=labels.device).view(1, -1, 1, 1)
        return (index.unsqueeze(1) == classes).to(torch.float32)
    raise ModelError(
        f"labels have {channels} channels; a model with num_classes={num_classes} takes a "
        f"[B, {num_classes}, S, S] mask per class or a [B, 1, S, S] map of class indices"
    )


def boxes_from_labels(
    targets: Tensor, *, jitter: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Bounding boxes ``[B, K, 4]`` (x0, y0, x1, y1) of ``targets`` ``[B, K, S, S]``.

    With ``jitter > 0`` each coordinate moves by ``N(0, (jitter * side)^2)`` clipped to two
    standard deviations, as SAM's box prompts are perturbed in training; ``generator`` makes it
    reproducible. Boxes stay inside the image and keep ``x0 <= x1``, ``y0 <= y1``.
    """
    if targets.dim() != 4:
        raise ModelError(f"targets must be [B, K, S, S], got shape {tuple(targets.shape)}")
    b, k, height, width = targets.shape
    fg = targets > 0.5
    rows = fg.any(dim=-1)  # [B, K, H]
    cols = fg.any(dim=-2)  # [B, K, W]
    present = rows.any(dim=-1)

    def first_last(mask: Tensor, size: int) -> tuple[Tensor, Tensor]:
        as_int = mask.to(torch.int8)
        first = as_int.argmax(dim=-1)
        last = size - 1 - as_int.flip(-1).argmax(dim=-1)
        return first, last

    y0, y1 = first_last(rows, height)
    x0, x1 = first_last(cols, width)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1).to(torch.float32)
    full = torch.tensor([0.0, 0.0, width - 1.0, height - 1.0], device=targets.device)
    boxes = torch.where(present.unsqueeze(-1), boxes, full)
    if jitter > 0:
        side = torch.stack(
            [boxes[..., 2] - boxes[..., 0] + 1, boxes[..., 3] - boxes[..., 1] + 1], dim=-1
        ).repeat(1, 1, 2)  # (w, h, w, h)
        noise = torch.randn(boxes.shape, generator=generator).to(boxes.device)
        boxes = boxes + (noise.clamp(-2.0, 2.0) * jitter * side)
        lo = torch.minimum(boxes[..., :2], boxes[..., 2:])
        hi = torch.maximum(boxes[..., :2], boxes[..., 2:])
        limit = torch.tensor([width - 1.0, height - 1.0], device=boxes.device)
        boxes = torch.cat([lo.clamp(min=0).minimum(limit), hi.clamp(min=0).minimum(limit)], -1)
    return boxes


__all__ = ["DEFAULT_BOX_JITTER", "boxes_from_labels", "label_targets"]
