"""Simulated W8A8 quantization: the quantizers (uniform and twin uniform), the ``Q*``
layers that run exact int8 numerics with float kernels, and :func:`prepare`, which swaps a
float model's layers for them."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Sam
from ..model.common import MatMul
from ..model.tiny_vit import ConvBN, MBConv, Mlp, PatchEmbed, PatchMerging, TinyViT
from ..model.transformer import Attention as DecoderAttention

# torch's quantized-tensor kernels are the fastest quantizers on the CPU; their creation
# functions warn about a future deprecation on every call.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")

BITS = 8
QMIN, QMAX = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1
LEVELS = 2 ** (BITS - 1)  # s = alpha * max / 2^(b-1)
GELU_MIN = 0.1700  # |min GELU(x)| = 0.16997...


# -- primitives -------------------------------------------------------------------------
def quantize(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric 8-bit quantization: integers in [-128, 127] (as int8), rounding half to
    even; the same integers as :func:`fake_quant` and the int8 kernels' inputs."""
    scale = torch.as_tensor(scale)
    if scale.numel() == 1 and x.dtype == torch.float32:
        u8 = torch.quantize_per_tensor(x.detach(), float(scale), 128, torch.quint8).int_repr()
        return (u8.to(torch.int16) - 128).to(torch.int8)
    return torch.clamp(torch.round(x / scale), QMIN, QMAX).to(torch.int8)


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize then dequantize (``scale`` broadcasts against ``x``). Per-tensor scales use
    the quantized-tensor kernel (one pass, rounding ``x * (1/s)`` half to even exactly as
    the int8 kernels' input quantization does); other shapes the plain formula."""
    scale = torch.as_tensor(scale)
    if scale.numel() == 1 and x.dtype == torch.float32:
        # uint8 with zero point 128, exactly as the int8 kernels' inputs are quantized (the
        # zero point enters before rounding, which can move a value by one level)
        return torch.quantize_per_tensor(x, float(scale), 128, torch.quint8).dequantize()
    y = x / scale  # in place from here: three passes fewer than the textbook formula
    return y.round_().clamp_(QMIN, QMAX).mul_(scale)


def twin_softmax_quant(x: torch.Tensor, s1: torch.Tensor | float) -> torch.Tensor:
    """Twin uniform quantization of post-softmax values in [0, 1]: small values on the
    fine grid ``s1`` (range [0, 128 s1)), the rest on the fixed grid 1/128; one bit
    says which, seven bits hold the level."""
    step = torch.where(x < LEVELS * s1, torch.as_tensor(s1, dtype=x.dtype), 1.0 / LEVELS)
    y = x / step
    return y.round_().clamp_(0, LEVELS - 1).mul_(step)


def gelu_negative_scale(s2: torch.Tensor) -> torch.Tensor:
    """Scale of the negative range of a twin-uniform post-GELU quantizer: s2 / 2^m with the
    largest m whose 128 levels still cover GELU's minimum (hardware-friendly power of 2)."""
    m = torch.floor(torch.log2(LEVELS * s2 / GELU_MIN)).clamp_min(0)
    return s2 / 2**m


def twin_gelu_quant(x: torch.Tensor, s2: torch.Tensor | float) -> torch.Tensor:
    """Twin uniform quantization of post-GELU values: negatives (>= -0.17) on a fine grid,
    positives on ``s2``."""
    s2 = torch.as_tensor(s2, dtype=x.dtype)
    step = torch.where(x < 0, gelu_negative_scale(s2), s2)
    y = x / step  # negatives round to [-128, 0], positives to [0, 127]
    return y.round_().clamp_(-LEVELS, LEVELS - 1).mul_(step)


class ActQuant(nn.Module):
    """Quantizer of one activation input. ``kind``: ``uniform``, ``softmax`` or ``gelu``
    (twin uniform). ``scale`` has the granularity's shape (``()`` per tensor, ``(1, h, 1, 1)``
    per head); an unset scale (all zeros) passes values through (calibration)."""

    def __init__(self, kind: str = "uniform", shape: Sequence[int] = ()) -> None:
        super().__init__()
        if kind not in ("uniform", "softmax", "gelu"):
            raise ValueError(f"unknown activation quantizer {kind!r}")
        self.kind = kind
        self.register_buffer("scale", torch.zeros(tuple(shape)))

    active = False  # set once the scale is, so that calibrated models skip the check

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            if not bool((self.scale > 0).all()):
                return x
            self.active = True
        return apply_act(x, self.kind, self.scale)


def apply_act(x: torch.Tensor, kind: str, scale: torch.Tensor) -> torch.Tensor:
    if kind == "softmax":
        return twin_softmax_quant(x, scale)
    if kind == "gelu":
        return twin_gelu_quant(x, scale)
    return fake_quant(x, scale)


# -- simulated quantized layers ---------------------------------------------------------
class QLinear(nn.Module):
    """Linear layer with an 8-bit input and 8-bit weights (one scale per layer)."""

    def __init__(self, linear: nn.Linear, act_kind: str = "uniform") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.act = ActQuant(act_kind)
        self.register_buffer("w_scale", torch.zeros(()))

    frozen = False  # weights already on their 8-bit grid (after calibration or loading)

    def weight_q(self) -> torch.Tensor:
        if self.frozen or float(self.w_scale) <= 0:
            return self.weight
        return fake_quant(self.weight, self.w_scale)

    def freeze(self) -> None:
        """Store the quantized weights once instead of quantizing them on every call."""
        self.weight.data = self.weight_q()
        self.frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x), self.weight_q(), self.bias)


class QConv(nn.Module):
    """Conv2d or ConvTranspose2d with an 8-bit input and per-output-channel 8-bit weights."""

    def __init__(
        self,
        conv: nn.Conv2d | nn.ConvTranspose2d,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        act_kind: str = "uniform",
    ) -> None:
        super().__init__()
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        self.stride, self.padding, self.groups = conv.stride, conv.padding, conv.groups
        w = conv.weight if weight is None else weight
        b = conv.bias if bias is None and weight is None else bias
        self.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        self.bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)
        self.act = ActQuant(act_kind)
        self.register_buffer("w_scale", torch.zeros(self.out_channels))

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups if self.transposed else self.weight.shape[0]

    @property
    def depthwise(self) -> bool:
        return not self.transposed and self.groups > 1 and self.groups == self.weight.shape[0]

    def _w_view(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(1, -1, 1, 1) if self.transposed else s.view(-1, 1, 1, 1)

    frozen = False

    def weight_q(self) -> torch.Tensor:
        if self.frozen or not bool((self.w_scale > 0).all()):
            return self.weight
        return fake_quant(self.weight, self._w_view(self.w_scale))

    def freeze(self) -> None:
        self.weight.data = self.weight_q()
        self.frozen = True

    def conv(self, x: torch.Tensor, w: torch.Tensor, padding=None) -> torch.Tensor:
        pad = self.padding if padding is None else padding
        if self.transposed:
            return F.conv_transpose2d(x, w, self.bias, self.stride, pad, groups=self.groups)
        return F.conv2d(x, w, self.bias, self.stride, pad, groups=self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(x), self.weight_q())


class QMatMul(nn.Module):
    """``a @ b`` with both operands 8-bit; per-head scales for 4D (B, heads, n, d) operands,
    per tensor otherwise."""

    def __init__(self, kind_a: str = "uniform", kind_b: str = "uniform", heads: int = 0) -> None:
        super().__init__()
        shape = (1, heads, 1, 1) if heads else ()
        self.act_a = ActQuant(kind_a, shape)
        self.act_b = ActQuant(kind_b, shape)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.act_a(a), self.act_b(b))


QUANT_TYPES = (QLinear, QConv, QMatMul)


# -- preparing a model ------------------------------------------------------------------
def _folded_conv(m: ConvBN) -> tuple[nn.Conv2d, torch.Tensor, torch.Tensor]:
    scale = m.bn.weight * torch.rsqrt(m.bn.running_var + m.bn.eps)
    weight = m.c.weight * scale[:, None, None, None]
    bias = m.bn.bias - m.bn.running_mean * scale
    return m.c, weight.detach(), bias.detach()


def _post_gelu_inputs(model: Sam) -> set[str]:
    """Names of the layers whose input is the output of a GELU (twin-uniform candidates)."""
    names: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, Mlp):
            names.add(f"{name}.fc2")
        elif isinstance(m, (MBConv, PatchMerging)):
            names.update({f"{name}.conv2", f"{name}.conv3"})
        elif isinstance(m, PatchEmbed):
            names.add(f"{name}.seq.2")
    enc = model.image_encoder
    if isinstance(enc, TinyViT):
        # stage 0: every MBConv ends in GELU, so the next block and the downsample see GELU
        stage0 = enc.layers[0]
        for i in range(1, len(stage0.blocks)):
            names.add(f"image_encoder.layers.0.blocks.{i}.conv1")
        if stage0.downsample is not None:
            names.add("image_encoder.layers.0.downsample.conv1")
    names.add("mask_decoder.output_upscaling.3")
    return names


TWIN_MODES = ("all", "auto", "none")


def prepare(model: Sam, twin: str = "auto") -> Sam:
    """A copy of ``model`` with every quantizable layer replaced by its simulated 8-bit
    counterpart (scales unset: it computes in float until calibrated). BatchNorm is folded
    into the preceding convolution; decoder attention uses the textbook form so that its
    ``q @ k^T`` and ``attn @ v`` products exist to be quantized.

    ``twin``: which post-softmax / post-GELU inputs get twin-uniform quantizers: ``all``
    (the paper's scheme), ``none``, or ``auto``: the matrix products' (attention weights,
    the hypernetwork product's image features) and the decoder's transposed convolution's;
    linear layers and dense convolutions keep one scale so that int8 kernels can run them,
    and depthwise convolutions too: their twin quantizer cost a quarter of the int8
    encoder's time on the CPU (192 vs 165 ms per 512 embedding) for no measurable accuracy.
    """
    if twin not in TWIN_MODES:
        raise ValueError(f"twin must be one of {TWIN_MODES}, got {twin!r}")
    q = copy.deepcopy(model).eval()
    gelu_inputs = _post_gelu_inputs(q) if twin != "none" else set()
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for name, m in q.named_modules():
        for child_name, child in m.named_children():
            full = f"{name}.{child_name}" if name else child_name
            kind = "gelu" if full in gelu_inputs else "uniform"
            if isinstance(child, (ConvBN, nn.Conv2d, nn.ConvTranspose2d)):
                new = QConv(*_folded_conv(child)) if isinstance(child, ConvBN) else QConv(child)
                if twin == "all" or (twin == "auto" and new.transposed):
                    new.act.kind = kind
                replacements.append((m, child_name, new))
            elif isinstance(child, nn.Linear):
                if "image_encoder.head" in full:
                    continue  # the unused classification head
                replacements.append((m, child_name, QLinear(child, kind if twin == "all" else "uniform")))
            elif type(child) is MatMul:
                heads = getattr(m, "num_heads", 0)
                tw = twin != "none"
                if child_name == "av":
                    qm = QMatMul("softmax" if tw else "uniform", "uniform", heads)
                elif child_name == "hyper_product":
                    qm = QMatMul("uniform", "gelu" if tw else "uniform", 0)
                else:
                    qm = QMatMul("uniform", "uniform", heads)
                replacements.append((m, child_name, qm))
    for parent, child_name, new in replacements:
        setattr(parent, child_name, new)
    for m in q.modules():
        if isinstance(m, DecoderAttention):
            m.reassociate = False
    q.quantization = {"bits": BITS, "twin": twin}
    q.requires_grad_(False)
    return q


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)]
