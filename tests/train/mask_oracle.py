"""A model stand-in for evaluation tests: it answers with the masks it was given."""

from __future__ import annotations

import torch
from torch import nn


class MaskOracle(nn.Module):
    """Returns +/-10 logits from a fixed mask list, in dataset order (batch by batch)."""

    num_classes = 1

    def __init__(self, masks: torch.Tensor) -> None:
        super().__init__()
        self.masks, self.pos = masks, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.masks[self.pos : self.pos + len(images)] * 20 - 10
        self.pos += len(images)
        return out
