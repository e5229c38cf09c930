"""SAM as a prompt-free, batched segmenter: gray images in, mask logits out."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor, nn

from fedfms_secure.errors import ModelError

if TYPE_CHECKING:
    from fedfms_secure.model.registry import SamPreset


class SamSegmenter(nn.Module):
    """Wraps a segment_anything ``Sam`` (with adapters) for training without prompts.

    ``Sam.forward`` runs under ``torch.no_grad`` and the PyPI ``MaskDecoder`` decodes one image
    per call, so this module calls the parts directly: image encoder, the "no mask" dense prompt,
    no sparse prompt, then the decoder's transformer, upscaling and the hypernetwork MLP of the
    first (single-mask) output token, all batched.
    """

    def __init__(self, sam: Sam, preset: SamPreset) -> None:
        super().__init__()
        self.sam = sam
        self.preset = preset

    def forward(self, images: Tensor) -> Tensor:
        """``images`` ``[B, 1, S, S]`` in [0, 1] -> mask logits ``[B, 1, S, S]``.

        Any square size ``S`` is accepted: it is resized to the preset's ``img_size`` for SAM and
        the logits are resized back. Non-square or non-gray input raises :class:`ModelError`.
        """
        if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
            raise ModelError(
                f"expected square gray images [B, 1, S, S] (S = {self.preset.img_size} for preset "
                f"{self.preset.name!r}; other square sizes are resized), got "
                f"{tuple(images.shape)}; resample or pad slices to a square in preprocessing"
            )
        out_size = images.shape[-2:]
        # Training never passes B = 0 (empty Poisson batches take PrivateTrainer.empty_step); kept
        # so a direct call returns [0, 1, S, S] instead of failing in SAM's window reshapes.
        if images.shape[0] == 0:
            return images.new_zeros(images.shape)
        embeddings = self.sam.image_encoder(self._preprocess(images))
        low_res = self._decode(embeddings)
        return F.interpolate(low_res, size=out_size, mode="bilinear", align_corners=False)

    def _preprocess(self, images: Tensor) -> Tensor:
        size = self.preset.img_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        rgb = images.expand(-1, 3, -1, -1) * 255.0
        return (rgb - self.sam.pixel_mean) / self.sam.pixel_std

    def _decode(self, embeddings: Tensor) -> Tensor:
        decoder = self.sam.mask_decoder
        prompt = self.sam.prompt_encoder
        batch, channels, height, width = embeddings.shape
        dense = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(batch, -1, -1)
        hs, src = decoder.transformer(embeddings + dense, prompt.get_dense_pe(), tokens)
        src = src.transpose(1, 2).reshape(batch, channels, height, width)
        upscaled = decoder.output_upscaling(src)
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1, :])
        return torch.einsum("bc,bchw->bhw", hyper, upscaled).unsqueeze(1)


__all__ = ["SamSegmenter"]
