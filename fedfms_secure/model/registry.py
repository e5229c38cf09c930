"""The one place where SAM is wired: presets, the builder and adapter injection.

``build_model`` constructs segment_anything's own ``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder`` and ``TwoWayTransformer`` exactly as ``segment_anything.build_sam._build_sam``
does, but with the sizes of a :class:`SamPreset`, then injects Medical SAM Adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from fedfms_secure.errors import ModelError
from fedfms_secure.model.adapters import inject_adapters
from fedfms_secure.model.segmenter import SamSegmenter

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamPreset:
    """The shapes of one SAM variant.

    ``decoder_dim`` is SAM's ``transformer_dim``; SAM requires it to equal ``prompt_embed_dim``
    (the image encoder's ``out_chans``), so it is derived rather than stored.
    """

    name: str
    img_size: int
    patch_size: int
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    window_size: int
    prompt_embed_dim: int
    decoder_depth: int
    decoder_mlp_dim: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0
    mask_in_chans: int = 16
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3

    @property
    def decoder_dim(self) -> int:
        """Channel width of the mask decoder's transformer (SAM: equal to ``prompt_embed_dim``)."""
        return self.prompt_embed_dim

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (``img_size // patch_size``)."""
        return self.img_size // self.patch_size


def _official(name: str, dim: int, depth: int, heads: int, glob: tuple[int, ...]) -> SamPreset:
    return SamPreset(
        name=name, img_size=1024, patch_size=16, encoder_embed_dim=dim, encoder_depth=depth,
        encoder_num_heads=heads, encoder_global_attn_indexes=glob, window_size=14,
        prompt_embed_dim=256, decoder_depth=2, decoder_mlp_dim=2048, decoder_num_heads=8,
    )  # fmt: skip


PRESETS: dict[str, SamPreset] = {
    # Small enough for DP-SGD on 2 CPU cores: 64x64 input, 8x8 token grid, 3 blocks (two windowed
    # with 4x4 windows, one global), 32-wide prompt encoder and decoder.
    "tiny": SamPreset(
        name="tiny", img_size=64, patch_size=8, encoder_embed_dim=64, encoder_depth=3,
        encoder_num_heads=4, encoder_global_attn_indexes=(2,), window_size=4,
        prompt_embed_dim=32, decoder_depth=2, decoder_mlp_dim=64, decoder_num_heads=4,
        mask_in_chans=4, iou_head_hidden_dim=32,
    ),  # fmt: skip
    "vit_b": _official("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": _official("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": _official("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
}


def get_preset(preset: str) -> SamPreset:
    """The :class:`SamPreset` called ``preset``; unknown names raise :class:`ModelError`."""
    try:
        return PRESETS[preset]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ModelError(f"unknown model preset {preset!r}; choose one of: {known}") from None


def build_sam(preset: SamPreset) -> Sam:
    """A plain segment_anything ``Sam`` with the shapes of ``preset`` (no adapters)."""
    grid = preset.embedding_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=preset.encoder_depth,
            embed_dim=preset.encoder_embed_dim,
            img_size=preset.img_size,
            mlp_ratio=preset.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=preset.encoder_num_heads,
            patch_size=preset.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=preset.encoder_global_attn_indexes,
            window_size=preset.window_size,
            out_chans=preset.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=preset.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(preset.img_size, preset.img_size),
            mask_in_chans=preset.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=preset.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=preset.decoder_depth,
                embedding_dim=preset.decoder_dim,
                mlp_dim=preset.decoder_mlp_dim,
                num_heads=preset.decoder_num_heads,
            ),
            transformer_dim=preset.decoder_dim,
            iou_head_depth=preset.iou_head_depth,
            iou_head_hidden_dim=preset.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


def build_model(
    preset: str = "tiny",
    *,
    seed: int = 0,
    adapter_ratio: float = 0.25,
    checkpoint: str | Path | None = None,
) -> SamSegmenter:
    """Build SAM with Medical SAM Adapters in every image-encoder block.

    Initialisation is seeded in a forked RNG, so the same ``seed`` gives bit-identical parameters
    on every site and the caller's global RNG is left untouched. ``checkpoint`` (optional) is an
    official SAM ``.pth`` for the same preset; it overwrites the SAM weights, not the adapters.
    """
    spec = get_preset(preset)
    if not 0.0 < adapter_ratio <= 4.0:
        raise ModelError(f"adapter_ratio {adapter_ratio} is out of range; use e.g. 0.25")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(spec)
        inject_adapters(sam.image_encoder.blocks, adapter_ratio)
    model = SamSegmenter(sam, spec)
    if checkpoint is not None:
        from fedfms_secure.model.checkpoint import load_sam_checkpoint

        load_sam_checkpoint(model, checkpoint)
    return model


__all__ = ["PRESETS", "SAM_PIXEL_MEAN", "SAM_PIXEL_STD", "SamPreset", "build_model", "build_sam",
           "get_preset"]  # fmt: skip
