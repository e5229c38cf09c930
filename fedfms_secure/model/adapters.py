"""Medical SAM Adapter (Wu et al., "Medical SAM Adapter", 2023) for SAM's image encoder.

Every image-encoder ``Block`` becomes an :class:`MSABlock` that keeps the block's own submodules
under their original names (so official SAM checkpoints load unchanged) and adds two adapters:

* a *space adapter* on the attention output, after ``window_unpartition`` (outside the window
  partition, so every trainable module sees the true batch dimension, as Opacus requires), and
* an *MLP adapter* in parallel to the MLP, scaled by 0.5:
  ``x = x + mlp(norm2(x)) + 0.5 * mlp_adapter(norm2(x))``.

Attention is :class:`~fedfms_secure.model.encoder.BatchFirstAttention`: ``qkv``, ``proj`` and the
relative-position tables see batch ``B`` rather than ``B * windows``, which makes their Opacus
per-sample gradients correct when they train (FedSAM); the result equals segment_anything's
windowed ``Attention`` exactly (padding included).
"""

from __future__ import annotations

from segment_anything.modeling.image_encoder import Attention, Block
from torch import Tensor, nn

from fedfms_secure.errors import ModelError
from fedfms_secure.model.encoder import BatchFirstAttention

MLP_ADAPTER_SCALE = 0.5


class Adapter(nn.Module):
    """Bottleneck adapter ``x + up(GELU(down(x)))``; without ``x +`` if ``skip_connect`` is off.

    ``up`` starts at zero, so an injected adapter is the identity (or zero) until it trains and
    the adapted model starts exactly at the pretrained SAM.
    """

    def __init__(self, dim: int, ratio: float = 0.25, skip_connect: bool = True) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        if hidden < 1:
            raise ModelError(
                f"adapter_ratio {ratio} leaves no hidden unit for width {dim}; use a larger "
                "adapter_ratio (e.g. 0.25)"
            )
        self.skip_connect = skip_connect
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        # tokens as (batch, tokens, channels): Opacus' ghost clipping computes the norms of a
        # Linear's per-sample gradients for 2-D and 3-D inputs only (the result is the same)
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        out = self.up(self.act(self.down(tokens))).reshape(x.shape[:-1] + (-1,))
        return x + out if self.skip_connect else out


class MSABlock(nn.Module):
    """A segment_anything ``Block`` with a space adapter and a parallel MLP adapter."""

    def __init__(self, block: Block, ratio: float = 0.25) -> None:
        super().__init__()
        dim = block.norm1.normalized_shape[0]
        # Same attribute names as Block: checkpoint keys stay "blocks.<i>.attn.qkv.weight" etc.
        self.norm1 = block.norm1
        self.attn = (block.attn if isinstance(block.attn, BatchFirstAttention)
                     else BatchFirstAttention(block.attn))  # fmt: skip
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.window_size = block.window_size
        self.space_adapter = Adapter(dim, ratio, skip_connect=True)
        self.mlp_adapter = Adapter(dim, ratio, skip_connect=False)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.attn(self.norm1(x), self.window_size)
        x = shortcut + self.space_adapter(x)
        xn = self.norm2(x)
        return x + self.mlp(xn) + MLP_ADAPTER_SCALE * self.mlp_adapter(xn)


def inject_adapters(blocks: nn.ModuleList, ratio: float) -> None:
    """Replace every ``Block`` in ``blocks`` (in place) by an :class:`MSABlock`."""
    for i, block in enumerate(blocks):
        if not isinstance(block, MSABlock):
            blocks[i] = MSABlock(block, ratio)


def batch_first_attention(attn: Attention | BatchFirstAttention, x: Tensor, window_size: int) -> Tensor:
    """segment_anything's (windowed) attention with ``qkv``/``proj`` outside the partition."""
    if not isinstance(attn, BatchFirstAttention):
        attn = BatchFirstAttention(attn)  # shares the parameter objects
    return attn(x, window_size)


def adapter_parameter_names(module: nn.Module) -> set[str]:
    """Names (relative to ``module``) of every parameter that belongs to an :class:`Adapter`."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        if isinstance(sub, Adapter):
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters())
    return names


__all__ = [
    "MLP_ADAPTER_SCALE",
    "Adapter",
    "MSABlock",
    "adapter_parameter_names",
    "batch_first_attention",
    "inject_adapters",
]
