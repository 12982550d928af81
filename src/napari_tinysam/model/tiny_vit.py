"""TinyViT image encoder: the TinySAM / MobileSAM ``vit_t`` backbone.

Attribute names reproduce the official state-dict keys (``image_encoder.patch_embed.seq.*``,
``image_encoder.layers.N.blocks.M.*``, ``image_encoder.neck.*``, and the unused
classification ``head`` / ``norm_head``), so official checkpoints load unchanged.

Unlike the reference this encoder takes any input whose sides are multiples of 16: the
stage resolutions are derived from the input at run time, never fixed at construction.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MatMul, window_partition, window_unpartition


class ConvBN(nn.Module):
    """Convolution without bias followed by BatchNorm (keys ``c.*`` and ``bn.*``).

    In eval mode the BatchNorm is folded into the convolution weights on every call; the
    fold costs a few microseconds and can never go stale when weights change.
    """

    def __init__(self, in_ch: int, out_ch: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_ch, out_ch, ks, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.bn(self.c(x))
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
        weight = self.c.weight * scale[:, None, None, None]
        bias = self.bn.bias - self.bn.running_mean * scale
        return F.conv2d(x, weight, bias, self.c.stride, self.c.padding, groups=self.c.groups)


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """GELU of a fresh intermediate, in place when autograd is off (inference).

    The stage-0 maps are tens of megabytes: a new output for every activation costs more
    in fresh pages than the GELU itself, and torch's kernel is about twice as fast over a
    channels-last map seen in its memory order (docs/benchmarks.md). With autograd on, an
    out-of-place GELU in the same order keeps its input for the backward pass and gives
    the same values, so results never depend on whether autograd was on."""
    memory_order = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if torch.is_grad_enabled():  # the same kernel over the same order: the same values
        return F.gelu(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if memory_order else F.gelu(x)
    torch.ops.aten.gelu_(x.permute(0, 2, 3, 1) if memory_order else x)
    return x


class GELU(nn.Module):
    """``nn.GELU`` through :func:`gelu_` (no parameters: official state-dict keys unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_(x)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions: (B, 3, H, W) -> (B, dim, H/4, W/4)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, 3, 2, 1),
            GELU(),
            ConvBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project): NCHW -> NCHW."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gelu_(self.conv1(x))
        y = gelu_(self.conv2(y))
        y = self.conv3(y)
        return gelu_(x + y if torch.is_grad_enabled() else y.add_(x))


class PatchMerging(nn.Module):
    """Downsampling between stages: (B, dim, H, W) -> (B, out_dim, H/stride, W/stride)."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gelu_(self.conv1(x))
        x = gelu_(self.conv2(x))
        return self.conv3(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks then an optional downsample. NCHW -> NCHW."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


def _attention_bias_index(window_size: int) -> tuple[torch.Tensor, int]:
    """Index (N, N) into the table of per-offset biases, N = window_size**2, and the table
    length. Offsets are (|dy|, |dx|), numbered in order of first appearance as in TinyViT."""
    points = list(itertools.product(range(window_size), range(window_size)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            if off not in offsets:
                offsets[off] = len(offsets)
            idxs.append(offsets[off])
    n = len(points)
    return torch.tensor(idxs, dtype=torch.long).view(n, n), len(offsets)


class Attention(nn.Module):
    """Multi-head self-attention inside one window with learned relative biases.

    (B, N, C) -> (B, N, C), N = window_size**2. The bias table is gathered on every
    call, so it can never go stale (the reference caches it in ``train(False)``, which
    leaves a model put in eval mode before loading its weights with zero biases).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * self.key_dim * num_heads)
        self.proj = nn.Linear(self.key_dim * num_heads, dim)
        idxs, n_offsets = _attention_bias_index(window_size)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, n_offsets))
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)
        self.qk = MatMul()  # q @ k^T
        self.av = MatMul()  # softmax(...) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        # The qkv features are laid out per head as [q | k | v] (TinyViT's layout).
        qkv = self.qkv(x).view(b, n, self.num_heads, 3 * self.key_dim).transpose(1, 2)
        q, k, v = qkv.split(self.key_dim, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        # Plain attention: on the CPU, SDPA with a float mask spends more time checking
        # the mask for -inf rows than computing these small (N <= 196) windows.
        attn = self.qk(q, k.transpose(-2, -1))
        attn = attn.mul_(self.key_dim**-0.5).add_(bias).softmax(-1)
        out = self.av(attn, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    """LayerNorm then two linear layers with GELU: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise local convolution, MLP: (B, H, W, C) -> same."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        pad = local_conv_size // 2
        self.local_conv = ConvBN(dim, dim, local_conv_size, 1, pad, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        if h == ws and w == ws:
            y = self.attn(x.reshape(b, h * w, c)).view(b, h, w, c)
        else:
            # The reference pads the raw tokens with zeros before the attention's
            # LayerNorm; the padded tokens are attended to, unmasked. Kept as is.
            windows, pad_hw = window_partition(x, ws)
            y = self.attn(windows.view(-1, ws * ws, c)).view(-1, ws, ws, c)
            y = window_unpartition(y, ws, pad_hw, (h, w))
        x = x + y
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """Stages 1..3: TinyViT blocks on (B, H, W, C), then an optional downsample. NCHW in/out."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size) for _ in range(depth)]
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT-5M as used by TinySAM: (B, 3, S, S) normalised image -> (B, 256, S/16, S/16).

    ``img_size`` is the square input the model is used at (1024 for official weights);
    the network itself accepts any side that is a multiple of 16.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        downsample_strides: Sequence[int] = (2, 2, 1),
        num_classes: int = 1000,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        n = len(embed_dims)
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        for i in range(n):
            down = PatchMerging(embed_dims[i], embed_dims[i + 1], downsample_strides[i]) if i < n - 1 else None
            if i == 0:
                layer: nn.Module = ConvLayer(embed_dims[0], depths[0], mbconv_expand_ratio, down)
            else:
                layer = BasicLayer(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    local_conv_size,
                    down,
                )
            self.layers.append(layer)
        # Classification head of the ImageNet-pretrained backbone: unused by SAM but present
        # in every official checkpoint, so it is kept for strict loading.
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"input sides must be multiples of 16, got {tuple(x.shape[-2:])}")
        # channels-last makes the oneDNN convolutions several times faster on the CPU
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)
