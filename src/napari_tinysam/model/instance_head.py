"""Instance head: foreground and distance maps predicted from the image embedding.

A light convolutional decoder on the image encoder's output (B, 256, s/16, s/16) that
predicts, on the low-resolution mask grid (s/4, s/4), three maps:

0. foreground logit,
1. normalised distance to the object's centre (0 at the centre, 1 at its farthest
   pixel and in the background), as a logit,
2. normalised distance to the boundary (0 at the innermost pixel, 1 at the boundary
   and in the background), as a logit.

Seeds (one per object) are where both distances are small inside the foreground; they
prompt the mask decoder once per object (``mode="auto"`` in everything mode) or grow
into instances by a seeded watershed on their own. Official checkpoints carry no head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Default architecture of the head (saved in the checkpoint config as ``instance_head``).
DEFAULT_HEAD = {"in_chans": 256, "channels": [128, 64, 32]}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.GELU())


class InstanceHead(nn.Module):
    """(B, in_chans, g, g) embedding -> (B, 3, 4g, 4g) logits (foreground, centre
    distance, boundary distance)."""

    def __init__(self, in_chans: int = 256, channels: list[int] | tuple[int, ...] = (128, 64, 32)) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.stem = nn.Sequential(_block(in_chans, c0), _block(c0, c0))
        self.up1 = nn.ConvTranspose2d(c0, c1, 2, stride=2)
        self.mid = _block(c1, c1)
        self.up2 = nn.ConvTranspose2d(c1, c2, 2, stride=2)
        self.fine = _block(c2, c2)
        self.out = nn.Conv2d(c2, 3, 1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        x = self.stem(embedding)
        x = self.mid(self.up1(x))
        x = self.fine(self.up2(x))
        return self.out(x)


def build_instance_head(config: dict[str, Any] | None = None) -> InstanceHead:
    cfg = {**DEFAULT_HEAD, **(config or {})}
    return InstanceHead(int(cfg["in_chans"]), list(cfg["channels"]))
