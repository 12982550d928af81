"""Small building blocks shared by the image encoders and the mask decoder."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

_LOW_PRECISION_CACHE: dict[int, tuple] = {}


def cached_cast(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``param`` cast to ``dtype``, kept until the parameter changes in place (training
    bumps its version) or is freed: a single click's decoder would otherwise spend more
    on casting its weights than the low-precision products save."""
    key = (dtype, param._version, param.data_ptr())
    hit = _LOW_PRECISION_CACHE.get(id(param))
    if hit is None:  # first cast of this parameter: its entry goes when it does
        weakref.finalize(param, _LOW_PRECISION_CACHE.pop, id(param), None)
    elif hit[0] == key:
        return hit[1]
    cast = param.detach().to(dtype)
    _LOW_PRECISION_CACHE[id(param)] = (key, cast)
    return cast


def expanded_over_batch(t: torch.Tensor) -> bool:
    """Whether ``t`` is one item expanded over a batch (the same image or dense prompt
    embedding for every prompt): its batch stride is 0."""
    return t.shape[0] > 1 and t.stride(0) == 0


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor (SAM's ``LayerNorm2d``)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] <= 32 and not torch.is_grad_enabled():
            # few channels (the mask prompt's encoder: 4 and 16): passes along the
            # channels-first planes, in float32, are about 4x faster than the fused norm
            # on the channels-last view, whose rows are only C long
            xf = x.float()
            d = xf - xf.mean(1, keepdim=True)
            s = (d * d).mean(1, keepdim=True).add_(self.eps).rsqrt_()
            return d.mul_(s).mul_(self.weight.float()[:, None, None]).add_(self.bias.float()[:, None, None])
        # One fused pass over a channels-last view instead of eight elementwise passes;
        # the same statistics (mean and biased variance over channels).
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class MatMul(nn.Module):
    """``a @ b`` as a module, so that a quantizer can find and replace the matrix products
    of attention and of the mask hypernetworks (it holds no weights)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class MLPBlock(nn.Module):
    """Two linear layers with an activation in between: (..., dim) -> (..., dim)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    #: dtype of the products while the module runs in float32 outside autograd (set in
    #: the decoder by ``MaskDecoder.set_product_dtype``); None: float32. A click's MLP
    #: works on 7 prompt tokens, so its time is the read of its 2 x 2 MB float32 weights:
    #: cached bfloat16 copies halve it.
    product_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lp = self.product_dtype
        if (
            lp is not None
            and x.dtype == torch.float32
            and not torch.is_grad_enabled()
            and type(self.lin1) is nn.Linear
            and type(self.lin2) is nn.Linear
        ):
            h = self.act(F.linear(x.to(lp), cached_cast(self.lin1.weight, lp), cached_cast(self.lin1.bias, lp)))
            return F.linear(h, cached_cast(self.lin2.weight, lp), cached_cast(self.lin2.bias, lp)).float()
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the decoder's hypernetworks and
    IoU head): (..., input_dim) -> (..., output_dim)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim], strict=True))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        if self.sigmoid_output:
            x = torch.sigmoid(x)
        return x


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split (B, H, W, C) into non-overlapping windows, zero-padding bottom/right.

    Returns (B * num_windows, window_size, window_size, C) and the padded (Hp, Wp).
    The padded tokens take part in attention unmasked, exactly as in the reference.
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, ws, ws, C) -> (B, H, W, C)."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :]
    return x.contiguous()
