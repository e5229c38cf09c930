"""SAM as a batched segmenter: gray images in, one mask logit map per class out.

Prompt-free (as in FedFMS) by default; optionally box-prompted (as SAM is trained), and with
``K`` foreground classes (one of SAM's mask tokens per class, e.g. optic disc and cup).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor, nn

from fedfms_secure.errors import ModelError

if TYPE_CHECKING:
    from fedfms_secure.model.registry import SamPreset

PROMPTS: tuple[str, ...] = ("none", "box")


class SamSegmenter(nn.Module):
    """Wraps a segment_anything ``Sam`` (with adapters) for batched training and inference.

    ``Sam.forward`` runs under ``torch.no_grad`` and the PyPI ``MaskDecoder`` decodes one image
    per call, so this module calls the parts directly and batches them: the image encoder, the
    "no mask" dense prompt, optional box corners as sparse prompt, then the decoder's transformer,
    upscaling, the hypernetwork MLP of each class's mask token and the IoU head.

    Every embedding is read through its module with batch-shaped indices (``iou_token``,
    ``mask_tokens``, ``no_mask_embed``, the box-corner ``point_embeddings``), never through
    ``.weight``, so Opacus gives each of them a per-sample gradient.

    Class ``k`` (0-based) uses mask token ``k``: ``num_classes`` is at most SAM's number of mask
    tokens (4). ``prompt`` says how training and evaluation call the model: ``"none"`` (no
    prompt) or ``"box"`` (a box per class derived from the label, see
    :mod:`fedfms_secure.model.prompts`).
    """

    def __init__(
        self, sam: Sam, preset: SamPreset, num_classes: int = 1, prompt: str = "none"
    ) -> None:
        super().__init__()
        tokens = sam.mask_decoder.num_mask_tokens
        if not 1 <= num_classes <= tokens:
            raise ModelError(
                f"num_classes={num_classes} is out of range: SAM's decoder has {tokens} mask "
                f"tokens, one per class; use 1..{tokens}"
            )
        if prompt not in PROMPTS:
            raise ModelError(f"unknown prompt {prompt!r}; choose one of: {', '.join(PROMPTS)}")
        self.sam = sam
        self.preset = preset
        self.num_classes = num_classes
        self.prompt = prompt

    def forward(
        self, images: Tensor, boxes: Tensor | None = None, *, with_iou: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``images`` ``[B, 1, S, S]`` in [0, 1] -> mask logits ``[B, K, S, S]``.

        ``boxes`` (optional) is ``[B, K, 4]`` (or ``[B, 4]`` for ``K = 1``): one ``(x0, y0, x1,
        y1)`` box per class in pixel coordinates of ``images``. With ``with_iou`` the result is
        ``(logits, iou)`` with SAM's predicted IoU ``[B, K]`` of each mask.

        Any square size ``S`` is accepted: it is resized to the preset's ``img_size`` for SAM and
        the logits are resized back. Non-square or non-gray input raises :class:`ModelError`.
        """
        if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
            raise ModelError(
                f"expected square gray images [B, 1, S, S] (S = {self.preset.img_size} for preset "
                f"{self.preset.name!r}; other square sizes are resized), got "
                f"{tuple(images.shape)}; resample or pad slices to a square in preprocessing"
            )
        batch, size = images.shape[0], images.shape[-1]
        if boxes is None and self.prompt == "box":
            raise ModelError(
                "this model was built with prompt='box': pass boxes=[B, K, 4] (e.g. "
                "fedfms_secure.model.prompts.boxes_from_labels) or build it with prompt='none'"
            )
        if boxes is not None:
            boxes = self._check_boxes(boxes, batch) * (self.preset.img_size / size)
        # Training never passes B = 0 (empty Poisson batches take PrivateTrainer.empty_step); kept
        # so a direct call returns [0, K, S, S] instead of failing in SAM's window reshapes.
        if batch == 0:
            logits = images.new_zeros((0, self.num_classes, size, size))
            return (logits, images.new_zeros((0, self.num_classes))) if with_iou else logits
        embeddings = self.sam.image_encoder(self._preprocess(images))
        low_res, iou = self._decode(embeddings, boxes)
        logits = F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)
        return (logits, iou) if with_iou else logits

    def _check_boxes(self, boxes: Tensor, batch: int) -> Tensor:
        if boxes.dim() == 2 and self.num_classes == 1:
            boxes = boxes.unsqueeze(1)
        if boxes.shape != (batch, self.num_classes, 4):
            raise ModelError(
                f"boxes must be [B, K, 4] = [{batch}, {self.num_classes}, 4] (x0, y0, x1, y1 per "
                f"class, in pixels of the input images), got {tuple(boxes.shape)}"
            )
        return boxes.to(torch.float32)

    def _preprocess(self, images: Tensor) -> Tensor:
        """Resize to ``img_size``, gray to RGB in [0, 255], then SAM's pixel mean/std."""
        size = self.preset.img_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        rgb = images.expand(-1, 3, -1, -1) * 255.0
        return (rgb - self.sam.pixel_mean) / self.sam.pixel_std

    def _tokens(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Output tokens ``[B, 1 + mask tokens, C]`` and the dense "no mask" prompt ``[B, C, 1, 1]``."""
        decoder, prompt = self.sam.mask_decoder, self.sam.prompt_encoder
        zeros = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # contiguous: Opacus' ghost clipping views the ids of an embedding as one column
        mask_ids = torch.arange(decoder.num_mask_tokens, device=device).expand(batch, -1).contiguous()
        tokens = torch.cat([decoder.iou_token(zeros), decoder.mask_tokens(mask_ids)], dim=1)
        dense = prompt.no_mask_embed(zeros).reshape(batch, -1, 1, 1)
        return tokens, dense

    def _box_tokens(self, boxes: Tensor) -> Tensor:
        """SAM's box embedding ``[B, 2, C]`` of boxes ``[B, 4]`` in ``img_size`` pixels."""
        prompt = self.sam.prompt_encoder
        corners = prompt.pe_layer.forward_with_coords(
            boxes.reshape(-1, 2, 2) + 0.5, (self.preset.img_size, self.preset.img_size)
        )
        zeros = torch.zeros(len(boxes), 1, dtype=torch.long, device=boxes.device)
        kinds = torch.cat([prompt.point_embeddings[2](zeros), prompt.point_embeddings[3](zeros)], 1)
        return corners + kinds

    def _decode(self, embeddings: Tensor, boxes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Low-resolution logits ``[B, K, 4h, 4w]`` and predicted IoU ``[B, K]``.

        Without boxes one decoder pass gives every class (token ``k`` -> class ``k``). With boxes
        there is one pass per class, each with that class's box: every pass keeps batch ``B``
        (Opacus needs the batch dimension to be the images).
        """
        batch = embeddings.shape[0]
        tokens, dense = self._tokens(batch, embeddings.device)
        if boxes is None:
            return self._run_decoder(embeddings + dense, tokens, range(self.num_classes))
        masks, ious = [], []
        for k in range(self.num_classes):
            sequence = torch.cat([tokens, self._box_tokens(boxes[:, k])], dim=1)
            mask, iou = self._run_decoder(embeddings + dense, sequence, [k])
            masks.append(mask)
            ious.append(iou)
        return torch.cat(masks, dim=1), torch.cat(ious, dim=1)

    def _run_decoder(self, src: Tensor, tokens: Tensor, classes) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        decoder = self.sam.mask_decoder
        batch, channels, height, width = src.shape
        hs, src = decoder.transformer(src, self.sam.prompt_encoder.get_dense_pe(), tokens)
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(batch, channels, height,
                                                                        width))  # fmt: skip
        masks = [
            torch.einsum("bc,bchw->bhw", decoder.output_hypernetworks_mlps[k](hs[:, 1 + k]),
                         upscaled)  # fmt: skip
            for k in classes
        ]
        # The IoU head learns to score the masks without steering the features they come from.
        iou = decoder.iou_prediction_head(hs[:, 0].detach())
        index = torch.tensor(list(classes), device=iou.device)
        return torch.stack(masks, dim=1), iou.index_select(1, index)


__all__ = ["PROMPTS", "SamSegmenter"]
