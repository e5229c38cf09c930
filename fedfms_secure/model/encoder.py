"""SAM's image encoder with its positional tables routed through small batch-first modules.

segment_anything's ``ImageEncoderViT`` adds ``pos_embed`` (a parameter of the encoder itself) and
its ``Attention`` reads ``rel_pos_h``/``rel_pos_w`` inside the window partition (batch
``B * windows * heads``). Opacus gives per-sample gradients per module, from the module's input
and output gradient, batch first: a parameter owned by a big module makes it re-run that whole
module per sample, and one used inside the partition would get gradients of the wrong batch.
Here each table lives in a module of its own (:class:`AbsolutePosition`, :class:`RelativePosition`)
that sees the true batch first, so FedSAM can train them under DP-SGD at the cost of a tiny
functorch recomputation. The maths is segment_anything's, unchanged.

Checkpoint keys stay the official ones (``image_encoder.pos_embed``,
``image_encoder.blocks.<i>.attn.rel_pos_h``): state-dict hooks rename them on save and load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import (
    Attention,
    ImageEncoderViT,
    get_rel_pos,
    window_partition,
    window_unpartition,
)
from torch import Tensor, nn


def _rename_hooks(module: nn.Module, pairs: dict[str, str]) -> None:
    """Save ``internal`` keys as ``official`` ones and accept ``official`` keys on load."""

    def on_save(mod: nn.Module, state: dict, prefix: str, meta: dict) -> None:
        for internal, official in pairs.items():
            if prefix + internal in state:
                state[prefix + official] = state.pop(prefix + internal)

    def on_load(mod, state, prefix, meta, strict, missing, unexpected, errors) -> None:  # noqa: ANN001
        for internal, official in pairs.items():
            if prefix + official in state:
                state[prefix + internal] = state.pop(prefix + official)

    module.register_state_dict_post_hook(on_save)
    module.register_load_state_dict_pre_hook(on_load)


class AbsolutePosition(nn.Module):
    """``x + pos_embed`` for ``x`` ``[B, H, W, C]``: SAM's absolute positional embedding."""

    def __init__(self, pos_embed: nn.Parameter) -> None:
        super().__init__()
        self.pos_embed = pos_embed

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pos_embed


class RelativePosition(nn.Module):
    """SAM's decomposed relative-position bias, batch first.

    ``q`` is ``[B, N, h, w, d]`` (``N`` = windows x heads of one image); the result is the bias
    ``[B, N, h*w, h*w]`` that ``add_decomposed_rel_pos`` adds to the attention scores.
    """

    def __init__(self, rel_pos_h: nn.Parameter, rel_pos_w: nn.Parameter) -> None:
        super().__init__()
        self.rel_pos_h = rel_pos_h
        self.rel_pos_w = rel_pos_w

    def forward(self, q: Tensor) -> Tensor:
        b, n, h, w, _ = q.shape
        r_h = get_rel_pos(h, h, self.rel_pos_h)
        r_w = get_rel_pos(w, w, self.rel_pos_w)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", q, r_h)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q, r_w)
        bias = rel_h[:, :, :, :, :, None] + rel_w[:, :, :, :, None, :]
        return bias.reshape(b, n, h * w, h * w)


class BatchFirstAttention(nn.Module):
    """segment_anything's (windowed) ``Attention`` with every trainable part batch first.

    ``qkv`` and ``proj`` run on the whole ``[B, H, W, C]`` grid, only the attention product runs
    inside windows, and the relative-position bias comes from :class:`RelativePosition` on ``q``
    viewed as ``[B, windows x heads, ...]``. The result equals ``Attention`` exactly (padding
    included). It takes over the ``Attention``'s own parameter objects.
    """

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.qkv = attn.qkv
        self.proj = attn.proj
        self.use_rel_pos = attn.use_rel_pos
        if attn.use_rel_pos:
            self.rel_pos = RelativePosition(attn.rel_pos_h, attn.rel_pos_w)
            _rename_hooks(self, {"rel_pos.rel_pos_h": "rel_pos_h",
                                 "rel_pos.rel_pos_w": "rel_pos_w"})  # fmt: skip

    def forward(self, x: Tensor, window_size: int) -> Tensor:
        batch, height, width, _ = x.shape
        if window_size > 0:
            pad_h = (window_size - height % window_size) % window_size
            pad_w = (window_size - width % window_size) % window_size
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # as window_partition pads the qkv input
        qkv = self.qkv(x)
        if window_size > 0:
            qkv, pad_hw = window_partition(qkv, window_size)
        b, h, w, three_c = qkv.shape
        heads = self.num_heads
        head_dim = three_c // (3 * heads)  # explicit sizes: "-1" is ambiguous for an empty batch
        qkv = qkv.reshape(b, h * w, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * heads, h * w, head_dim).unbind(0)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            # rows of q are ordered (image, window, head): view them batch first per image
            bias = self.rel_pos(q.reshape(batch, b * heads // max(batch, 1), h, w, head_dim))
            scores = scores + bias.reshape(b * heads, h * w, h * w)
        out = (scores.softmax(dim=-1) @ v).view(b, heads, h, w, head_dim)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, heads * head_dim)
        if window_size > 0:
            out = window_unpartition(out, window_size, pad_hw, (height, width))
        return self.proj(out)


class AdaptedImageEncoder(nn.Module):
    """``ImageEncoderViT`` with ``pos_embed`` in an :class:`AbsolutePosition` module.

    Same submodule names as the original (``patch_embed``, ``blocks``, ``neck``), same forward.
    """

    def __init__(self, encoder: ImageEncoderViT) -> None:
        super().__init__()
        self.img_size = encoder.img_size
        self.patch_embed = encoder.patch_embed
        self.pos = None if encoder.pos_embed is None else AbsolutePosition(encoder.pos_embed)
        self.blocks = encoder.blocks
        self.neck = encoder.neck
        _rename_hooks(self, {"pos.pos_embed": "pos_embed"})

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        if self.pos is not None:
            x = self.pos(x)
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


__all__ = ["AbsolutePosition", "AdaptedImageEncoder", "BatchFirstAttention", "RelativePosition"]
