"""The one place where SAM is wired: presets, the builder and adapter injection.

``build_model`` constructs segment_anything's own ``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder`` and ``TwoWayTransformer`` exactly as ``segment_anything.build_sam._build_sam``
does, but with the sizes of a :class:`SamPreset`, routes the encoder's positional tables through
batch-first modules (:mod:`fedfms_secure.model.encoder`), injects Medical SAM Adapters, and loads
an official checkpoint or the weights shipped for the small preset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
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
from fedfms_secure.model.encoder import AdaptedImageEncoder
from fedfms_secure.model.segmenter import SamSegmenter

log = logging.getLogger("fedfms_secure.model")

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


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Presets that ship pretrained weights in the package (made by benchmarks/pretrain_<name>.py).
SHIPPED_WEIGHTS: dict[str, str] = {"tiny": "tiny_pretrained.pt"}


def shipped_weights(preset: str) -> Path | None:
    """Path of the weights file that ships for ``preset`` (None if none is planned)."""
    name = SHIPPED_WEIGHTS.get(preset)
    return None if name is None else WEIGHTS_DIR / name


def build_model(
    preset: str = "tiny",
    *,
    seed: int = 0,
    adapter_ratio: float = 0.25,
    checkpoint: str | Path | None = None,
    pretrained: bool | None = None,
    num_classes: int = 1,
    prompt: str = "none",
    img_size: int | None = None,
) -> SamSegmenter:
    """Build SAM with Medical SAM Adapters in every image-encoder block.

    Initialisation is seeded in a forked RNG, so the same ``seed`` gives bit-identical parameters
    on every site and the caller's global RNG is left untouched. Then SAM's weights (never the
    adapters, which keep their seeded initialisation) come from:

    * ``checkpoint``: an official SAM ``.pth`` (e.g. ``sam_vit_b_01ec64.pth``) or a file from
      :func:`~fedfms_secure.model.checkpoint.save_sam_checkpoint`;
    * else, with ``pretrained`` (default: True for presets that ship weights, i.e. ``tiny``), the
      weights shipped in the package; if that file is missing a warning is logged and the
      seeded random initialisation stays. ``pretrained=False`` keeps the seeded initialisation.

    ``img_size`` overrides the preset's input size (a multiple of its patch size); weights made
    for another size are resized on load (bicubic positional embedding, resized relative-position
    tables). ``num_classes`` foreground classes use SAM's mask tokens 0..K-1; ``prompt`` is
    ``"none"`` (prompt-free, the default) or ``"box"`` (a box per class derived from the label).
    """
    spec = get_preset(preset)
    if img_size is not None:
        if img_size < spec.patch_size or img_size % spec.patch_size:
            raise ModelError(
                f"img_size {img_size} is not a positive multiple of preset {preset!r}'s patch "
                f"size {spec.patch_size}; use e.g. {spec.patch_size * max(1, img_size // spec.patch_size)}"
            )
        spec = replace(spec, img_size=img_size)
    if not 0.0 < adapter_ratio <= 4.0:
        raise ModelError(f"adapter_ratio {adapter_ratio} is out of range; use e.g. 0.25")
    weights = shipped_weights(preset)
    if pretrained and checkpoint is not None:
        raise ModelError("pass either checkpoint=... or pretrained=True, not both")
    if pretrained and weights is None:
        raise ModelError(
            f"no pretrained weights ship for preset {preset!r}; pass checkpoint= with the path "
            f"of the official SAM file (e.g. sam_{preset}_*.pth), or pretrained=False"
        )
    if pretrained is None:
        pretrained = checkpoint is None and weights is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(spec)
        sam.image_encoder = AdaptedImageEncoder(sam.image_encoder)
        inject_adapters(sam.image_encoder.blocks, adapter_ratio)
    model = SamSegmenter(sam, spec, num_classes=num_classes, prompt=prompt)
    if checkpoint is None and pretrained:
        assert weights is not None
        if weights.is_file():
            checkpoint = weights
        else:
            log.warning(
                "pretrained weights %s are missing: preset %r starts from its seeded random "
                "initialisation (seed %d); reinstall the package or run benchmarks/pretrain_%s.py",
                weights, preset, seed, preset,
            )
    elif checkpoint is None:
        log.warning("preset %r starts from its seeded random initialisation (seed %d), not from "
                    "pretrained weights", preset, seed)  # fmt: skip
    if checkpoint is not None:
        from fedfms_secure.model.checkpoint import load_sam_checkpoint

        load_sam_checkpoint(model, checkpoint)
    return model


__all__ = ["PRESETS", "SAM_PIXEL_MEAN", "SAM_PIXEL_STD", "SHIPPED_WEIGHTS", "WEIGHTS_DIR",
           "SamPreset", "build_model", "build_sam", "get_preset", "shipped_weights"]  # fmt: skip
