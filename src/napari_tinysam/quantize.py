"""Post-training quantization to 8 bits (W8A8) adapted to promptable segmentation, after
TinySAM's Q-TinySAM (Shu et al.), which follows PTQ4ViT's twin uniform quantization and
Hessian-guided scale search.

What is quantized: the inputs and weights of every convolution, transposed convolution,
linear layer and matrix product (attention ``q @ k^T`` and ``attn @ v`` in encoder and
decoder, and the decoder's hypernetwork @ image-feature product). Symmetric uniform
quantization, ``q = clamp(round(x / s), -128, 127)``. Scale granularity: per output channel
for (transposed) convolutions, per head for matrix products, per layer for linear layers.
Post-softmax and post-GELU activations may use two ranges (twin uniform).

Scales are found by alternating grid search: ``s = alpha * max|x| / 2^(b-1)`` with 100
values of alpha in [0.01, 1.2], three rounds alternating between the two operands of each
layer, minimising either the plain squared error of the layer's output or the Hessian-guided
one (the squared error weighted by the squared gradient of the task loss with respect to
that output).

Two ways to run a quantized model: simulated quantization (``Q*`` modules: exact int8
numerics with float kernels, for accuracy) and :func:`use_int8_kernels`, which swaps every
linear layer and dense convolution with a uniform input quantizer for oneDNN's int8 kernels
(u8 x s8 -> s32 accumulation, float output; the same numbers as the simulation up to
float rounding of the output). Depthwise convolutions, transposed convolutions, matrix
products and layers with twin-uniform inputs stay simulated: oneDNN has no batched int8
matmul, its int8 depthwise convolution is no faster than the float one once the input is
quantized, and a twin-uniform tensor has two scales where an int8 kernel takes one.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import Sam, build_sam
from .model.build import CheckpointError, write_checkpoint
from .model.common import MatMul
from .model.tiny_vit import ConvBN, MBConv, Mlp, PatchEmbed, PatchMerging, TinyViT
from .model.transformer import Attention as DecoderAttention

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

    def __init__(self, conv: nn.Conv2d | nn.ConvTranspose2d, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, act_kind: str = "uniform") -> None:
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


# -- calibration data -------------------------------------------------------------------
@dataclass
class _Capture:
    """Sampled inputs, float outputs and output gradients of one layer."""

    inputs: list[list[torch.Tensor]]
    outputs: list[torch.Tensor]
    grads: dict[int, torch.Tensor]  # by sample index (backward visits calls in reverse)


class _Recorder:
    """Forward hooks that keep a random subsample of every quantizable layer's inputs and
    float outputs, and tensor hooks that keep the matching output gradients."""

    def __init__(self, model: nn.Module, max_rows: int, crop: int, seed: int) -> None:
        self.captures: dict[str, _Capture] = {}
        self.max_rows, self.crop = max_rows, crop
        self.gen = torch.Generator().manual_seed(seed)
        self.handles = []
        for name, m in quant_layers(model):
            self.captures[name] = _Capture([], [], {})
            self.handles.append(m.register_forward_hook(self._hook(name, m)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _pick(self, n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen)[: min(n, k)]

    def _hook(self, name: str, m: nn.Module) -> Callable:
        cap = self.captures[name]

        def hook(module, args, out):
            if isinstance(m, QLinear):
                x = args[0].reshape(-1, args[0].shape[-1])
                idx = self._pick(x.shape[0], self.max_rows)
                sel = lambda t: t.reshape(-1, t.shape[-1])[idx]  # noqa: E731
                cap.inputs.append([x[idx].detach()])
            elif isinstance(m, QMatMul):
                a, b = args
                per_item = max(a[0].numel(), b[0].numel(), out[0].numel())
                idx = self._pick(out.shape[0], max(1, self.max_rows * 256 // per_item))
                sel = lambda t: t[idx]  # noqa: E731
                cap.inputs.append([_take(a, idx).detach(), _take(b, idx).detach()])
            else:  # QConv: a spatial crop of the output and the input that produces it
                idx = self._pick(out.shape[0], 2)  # decoder convolutions see every prompt
                x = args[0][idx]
                y0, x0, ys, xs = self._crop_window(m, out.shape[-2:])
                # clone: a window is a view that would keep the whole feature map alive
                cap.inputs.append([_conv_input_crop(m, x, y0, x0, ys, xs).detach().clone()])
                sel = lambda t: t[idx][..., y0 : y0 + ys, x0 : x0 + xs].clone()  # noqa: E731
            k = len(cap.outputs)
            cap.outputs.append(sel(out).detach())
            if out.requires_grad:
                out.register_hook(lambda g: cap.grads.__setitem__(k, sel(g).detach()))

        return hook

    def _crop_window(self, m: QConv, hw) -> tuple[int, int, int, int]:
        h, w = int(hw[0]), int(hw[1])
        c = self.crop * (2 if m.transposed else 1)
        ys, xs = min(h, c), min(w, c)
        if m.transposed:  # keep the crop aligned to the stride
            s = m.stride[0]
            y0 = int(torch.randint(0, (h - ys) // s + 1, (1,), generator=self.gen)) * s
            x0 = int(torch.randint(0, (w - xs) // s + 1, (1,), generator=self.gen)) * s
        else:
            y0 = int(torch.randint(0, h - ys + 1, (1,), generator=self.gen))
            x0 = int(torch.randint(0, w - xs + 1, (1,), generator=self.gen))
        return y0, x0, ys, xs


def _consolidate(cap: _Capture, budget: int, gen: torch.Generator) -> _Capture:
    """Concatenate samples of equal trailing shapes along the batch axis, so that each
    candidate scale costs a few large kernel calls rather than many small ones, and keep a
    random subset of at most ``budget`` elements of the largest operand."""
    groups: dict[tuple, list[int]] = {}
    for i, (ins, out) in enumerate(zip(cap.inputs, cap.outputs)):
        key = tuple(tuple(t.shape[1:]) for t in ins) + (tuple(out.shape[1:]),)
        groups.setdefault(key, []).append(i)
    merged = _Capture([], [], {})
    for idx in groups.values():
        n_in = len(cap.inputs[idx[0]])
        merged.inputs.append([torch.cat([cap.inputs[i][k] for i in idx])
                              for k in range(n_in)])
        merged.outputs.append(torch.cat([cap.outputs[i] for i in idx]))
        if all(i in cap.grads for i in idx):
            merged.grads[len(merged.outputs) - 1] = torch.cat([cap.grads[i] for i in idx])
    for j, out in enumerate(merged.outputs):
        per_item = max(t[0].numel() for t in [*merged.inputs[j], out])
        keep = max(1, budget // per_item)
        if out.shape[0] > keep:
            sub = torch.randperm(out.shape[0], generator=gen)[:keep]
            merged.inputs[j] = [t[sub] for t in merged.inputs[j]]
            merged.outputs[j] = out[sub]
            if j in merged.grads:
                merged.grads[j] = merged.grads[j][sub]
    return merged


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The sampled batch items of an operand; one shared by every prompt (batch 1) is
    broadcast to the sample's size."""
    return t.expand(len(idx), *t.shape[1:]) if t.shape[0] == 1 else t[idx]


def _conv_input_crop(m: QConv, x: torch.Tensor, y0: int, x0: int, ys: int, xs: int) -> torch.Tensor:
    """The input window (zero-padded as the layer pads) from which a padding-free
    convolution computes exactly the output window [y0, y0+ys) x [x0, x0+xs)."""
    if m.transposed:  # kernel == stride, no overlap: output window / stride
        s = m.stride[0]
        return x[..., y0 // s : (y0 + ys) // s, x0 // s : (x0 + xs) // s]
    k = m.weight.shape[-1]
    s, p = m.stride[0], m.padding[0]
    xp = F.pad(x, (p, p, p, p)) if p else x
    return xp[..., y0 * s : y0 * s + (ys - 1) * s + k, x0 * s : x0 * s + (xs - 1) * s + k]


# -- scale search -----------------------------------------------------------------------
def candidate_alphas(n: int = 100, low: float = 0.01, high: float = 1.2) -> torch.Tensor:
    return torch.linspace(low, high, n)


def _group_reduce(err: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Sum an elementwise error over everything but ``dim`` (None: to a scalar)."""
    if dim is None:
        return err.sum()
    return err.transpose(0, dim).reshape(err.shape[dim], -1).sum(1)


@dataclass
class _Operand:
    """One searchable scale of a layer: its per-group maxima, the output dim its groups map
    to (None: per tensor), and how to write a scale into the layer."""

    amax: torch.Tensor
    out_dim: int | None
    set_scale: Callable[[torch.Tensor], None]


def _operands(m: nn.Module, samples: _Capture) -> tuple[list[_Operand], Callable]:
    """The searchable scales of layer ``m`` and ``make_eval(j)``: a function computing the
    layer's quantized outputs on every captured sample while only operand ``j`` changes
    (the other operand is quantized once, outside the candidate loop)."""
    if isinstance(m, QMatMul):
        acts = (m.act_a, m.act_b)
        ops = []
        for i, act in enumerate(acts):
            per_head = act.scale.dim() == 4
            amax = _act_amax(act.kind, [p[i] for p in samples.inputs], per_head)
            ops.append(_Operand(amax, 1 if per_head else None,
                                (lambda a: lambda s: a.scale.copy_(s.view_as(a.scale)))(act)))

        def make_eval(j: int) -> Callable[[], list[torch.Tensor]]:
            other = 1 - j
            frozen = [acts[other](p[other]) for p in samples.inputs]
            if j == 0:
                return lambda: [torch.matmul(m.act_a(p[0]), f) for p, f in zip(samples.inputs, frozen)]
            return lambda: [torch.matmul(f, m.act_b(p[1])) for p, f in zip(samples.inputs, frozen)]

        return ops, make_eval

    xs = [s[0] for s in samples.inputs]
    if isinstance(m, QLinear):
        w_ops = _Operand(m.weight.abs().amax().reshape(()), None, lambda s: m.w_scale.copy_(s))
        apply = lambda x, w: F.linear(x, w, m.bias)  # noqa: E731
    else:
        dims = (0, 2, 3) if m.transposed else (1, 2, 3)
        w_ops = _Operand(m.weight.abs().amax(dim=dims), 1, lambda s: m.w_scale.copy_(s))
        pad = m.padding if m.transposed else 0  # the captured inputs are padded already
        apply = lambda x, w: m.conv(x, w, padding=pad)  # noqa: E731
    ops = [w_ops, _Operand(_act_amax(m.act.kind, xs), None, lambda s: m.act.scale.copy_(s))]

    def make_eval(j: int) -> Callable[[], list[torch.Tensor]]:
        if j == 0:
            xq = [m.act(x) for x in xs]
            return lambda: [apply(x, m.weight_q()) for x in xq]
        wq = m.weight_q()
        return lambda: [apply(m.act(x), wq) for x in xs]

    return ops, make_eval


def _act_amax(kind: str, xs: list[torch.Tensor], per_head: bool = False) -> torch.Tensor:
    if kind == "softmax":
        return torch.ones(xs[0].shape[1]) if per_head else torch.ones(())
    if per_head:
        return torch.stack([x.abs().transpose(0, 1).reshape(x.shape[1], -1).amax(1) for x in xs]).amax(0)
    return torch.stack([x.abs().amax() for x in xs]).amax()


def search_scales(
    m: nn.Module,
    samples: _Capture,
    distance: str = "l2",
    alphas: torch.Tensor | None = None,
    rounds: int = 3,
) -> float:
    """Alternating grid search of the scales of layer ``m`` on its captured samples
    (in place). Returns the final distance relative to that of no quantization's output
    energy (a diagnostic)."""
    alphas = candidate_alphas() if alphas is None else alphas
    ops, make_eval = _operands(m, samples)
    ys = samples.outputs
    if distance == "hessian":
        if len(samples.grads) != len(ys):
            raise RuntimeError("Hessian-guided search needs output gradients of every sample")
        ws = [samples.grads[i].square() for i in range(len(ys))]
        if not any(bool(w.any()) for w in ws):  # the output does not reach the loss
            ws = [None] * len(ys)
    elif distance in ("l2", "mse"):
        ws = [None] * len(ys)
    else:
        raise ValueError(f"unknown distance {distance!r}: use 'hessian' or 'l2'")

    def err(run: Callable, dim: int | None) -> torch.Tensor:
        total = None
        for out, y, w in zip(run(), ys, ws):
            e = (out - y).square()
            if w is not None:
                e = e * w
            r = _group_reduce(e, dim)
            total = r if total is None else total + r
        return total

    for op in ops:  # start from the max scales
        op.set_scale(op.amax / LEVELS)
    for _ in range(rounds):
        for j, op in enumerate(ops):
            run = make_eval(j)
            best_err = torch.full(op.amax.shape, float("inf"))
            best = op.amax / LEVELS
            for a in alphas:
                s = (a * op.amax / LEVELS).clamp_min(1e-12)
                op.set_scale(s)
                e = err(run, op.out_dim)
                better = e < best_err
                best_err = torch.where(better, e, best_err)
                best = torch.where(better, s, best)
            op.set_scale(best)
    final = float(err(make_eval(0), None))
    energy = sum(float(((y.square() * w) if w is not None else y.square()).sum()) for y, w in zip(ys, ws))
    return final / max(energy, 1e-30)


# -- calibration ------------------------------------------------------------------------
def _task_loss(logits: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """The loss whose gradient weights the Hessian-guided distance. At the float model the
    KL between float and quantized outputs has zero gradient, so (as PTQ4ViT does with
    class labels) the float model's own decisions serve as targets: binary cross-entropy of
    every mask logit against the float mask, and cross-entropy of the IoU head against the
    float model's choice of mask."""
    target = (logits.detach() > 0).float()
    mask_term = F.binary_cross_entropy_with_logits(logits, target, reduction="mean")
    iou_term = F.cross_entropy(iou, iou.detach().argmax(1))
    return mask_term + 0.1 * iou_term


def calibration_prompts(
    labels: np.ndarray | None, shape: tuple[int, int], n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts like in training, in original-image pixels: a random point inside each of up
    to ``n`` objects and their boxes (jittered by up to 10% of their size); without labels,
    random points and random boxes."""
    h, w = shape
    if labels is not None and labels.max() > 0:
        ids = np.unique(labels[labels > 0])
        ids = rng.choice(ids, min(n, len(ids)), replace=False)
        pts, boxes = [], []
        for i in ids:
            ys, xs = np.nonzero(labels == i)
            k = rng.integers(len(ys))
            pts.append([xs[k], ys[k]])
            x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
            jit = rng.uniform(-0.1, 0.1, 4) * np.tile([x1 - x0 + 1, y1 - y0 + 1], 2)
            boxes.append(np.clip([x0 + jit[0], y0 + jit[1], x1 + jit[2], y1 + jit[3]], 0, np.tile([w - 1, h - 1], 2)))
        return np.asarray(pts, np.float32), np.asarray(boxes, np.float32)
    pts = rng.uniform([0, 0], [w - 1, h - 1], (n, 2)).astype(np.float32)
    c = rng.uniform([0, 0], [w - 1, h - 1], (n, 2))
    half = rng.uniform(8, max(9, min(h, w) / 8), (n, 2))
    boxes = np.clip(np.concatenate([c - half, c + half], 1), 0, np.tile([w - 1, h - 1], 2)).astype(np.float32)
    return pts, boxes


def record_calibration(
    qmodel: Sam,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None] | None = None,
    prompts_per_image: int = 16,
    max_rows: int = 512,
    crop: int = 16,
    seed: int = 0,
) -> dict[str, _Capture]:
    """Run the (not yet calibrated, hence float) prepared model on calibration images and
    prompts, keeping samples of every layer's inputs, outputs and output gradients."""
    from .predictor import preprocess_shape, resize_longest_side, to_uint8_rgb

    labels = labels or [None] * len(images)
    rng = np.random.default_rng(seed)
    # the sample budget is per layer over all images, so that calibration cost does not
    # grow with the number of images
    n = max(1, len(images))
    rec = _Recorder(qmodel, max(16, max_rows // n), max(4, round(crop * math.sqrt(2 / max(n, 2)))), seed)
    # gradients must reach every layer's output, also those that only see prompt tokens
    qmodel.requires_grad_(True)
    try:
        for img, lab in zip(images, labels):
            rgb = to_uint8_rgb(img)
            resized = resize_longest_side(rgb, qmodel.img_size, qmodel.max_upscale)
            x = torch.from_numpy(np.array(resized, copy=True)).permute(2, 0, 1)[None].float()
            x.requires_grad_(True)
            with torch.enable_grad():
                emb = qmodel.embed(x)
                h, w = rgb.shape[:2]
                nh, nw = preprocess_shape(h, w, qmodel.img_size, qmodel.max_upscale)
                scale = torch.tensor([nw / w, nh / h])
                pts, boxes = calibration_prompts(lab, (h, w), prompts_per_image, rng)
                p = torch.from_numpy(pts) * scale
                b = torch.from_numpy(boxes).view(-1, 2, 2).mul(scale).view(-1, 4)
                lp, ip = qmodel.decode(emb, points=(p[:, None], torch.ones(len(p), 1)))
                lb, ib = qmodel.decode(emb, boxes=b)
                # a second round as in interactive use: the chosen mask fed back as input
                best = ip[:, 1:].argmax(1) + 1
                prev = lp[torch.arange(len(p)), best][:, None].detach().requires_grad_(True)
                lm, im = qmodel.decode(emb, points=(p[:, None], torch.ones(len(p), 1)), mask_input=prev)
                loss = _task_loss(lp, ip) + _task_loss(lb, ib) + _task_loss(lm, im)
                if qmodel.has_instance_head:  # quantized like the rest: its layers need samples
                    loss = loss + qmodel.instance_maps(emb).square().mean()
                loss.backward()
    finally:
        rec.remove()
        qmodel.requires_grad_(False)
        qmodel.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(seed)
    return {name: _consolidate(cap, max_rows * 512, gen) for name, cap in rec.captures.items()}


def calibrate(
    qmodel: Sam,
    captures: dict[str, _Capture],
    distance: str = "l2",
    rounds: int = 3,
    n_alphas: int = 100,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, float]:
    """Search the scales of every layer of a prepared model (in place) from recorded
    calibration data; returns each layer's relative output error."""
    alphas = candidate_alphas(n_alphas)
    report = {}
    layers = quant_layers(qmodel)
    with torch.no_grad():
        for i, (name, m) in enumerate(layers):
            if not captures[name].outputs:
                raise RuntimeError(f"calibration never ran layer {name}")
            report[name] = search_scales(m, captures[name], distance, alphas, rounds)
            if isinstance(m, (QLinear, QConv)):
                m.freeze()
            if progress is not None:
                progress(i + 1, len(layers), name)
    return report


def quantize_model(
    model: Sam,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None] | None = None,
    distance: str = "l2",
    twin: str = "auto",
    prompts_per_image: int = 16,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> Sam:
    """Prepare, record calibration data and search every scale: a simulated W8A8 model."""
    q = prepare(model, twin=twin)
    q.set_precision("fp32")  # calibrated and run in float32 around its integer products
    captures = record_calibration(q, images, labels, prompts_per_image, seed=seed)
    calibrate(q, captures, distance, progress=progress)
    q.quantization.update(distance=distance, calibration_images=len(images))
    return q


# -- real int8 execution ----------------------------------------------------------------
def int8_kernels_available() -> bool:
    """Whether this PyTorch build has oneDNN's int8 linear and convolution kernels."""
    try:
        return hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qconv2d_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _quantize_u8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric int8 quantization stored as uint8 with zero point 128 (the form oneDNN's
    u8 x s8 kernels take): the same integers as ``quantize``, shifted by 128."""
    return torch.quantize_per_tensor(x, scale, 128, torch.quint8).int_repr()


class Int8Linear(nn.Module):
    """A calibrated ``QLinear`` executed by oneDNN's int8 GEMM (float output)."""

    def __init__(self, q: QLinear) -> None:
        super().__init__()
        self.x_scale = float(q.act.scale)
        self.in_features, self.out_features = q.in_features, q.out_features
        qw = quantize(q.weight, q.w_scale)
        # buffers: the integers and scales define the model (and its fingerprint)
        self.register_buffer("weight_int8", qw)
        self.register_buffer("w_scales", q.w_scale.expand(self.out_features).float().contiguous())
        self.register_buffer("x_scale_", torch.tensor(self.x_scale))
        self.w_zps = torch.zeros(self.out_features, dtype=torch.int64)
        self.bias = None if q.bias is None else q.bias.detach().float()
        self.packed = torch.ops.onednn.qlinear_prepack(qw, None)

    #: below this many rows (the decoder's few prompt tokens) the kernel's fixed cost
    #: exceeds the float product; the same integers then go through a float GEMM
    min_rows = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if x.numel() < self.min_rows * self.in_features:
            if not hasattr(self, "_w_float"):
                self._w_float = self.weight_int8.float() * self.w_scales[:, None]
            return F.linear(fake_quant(x, self.x_scale), self._w_float, self.bias)
        qx = _quantize_u8(x.reshape(-1, self.in_features), self.x_scale)
        out = torch.ops.onednn.qlinear_pointwise(
            qx, self.x_scale, 128, self.packed, self.w_scales, self.w_zps, self.bias,
            1.0, 0, torch.float32, "none", [], "")
        return out.view(*lead, self.out_features)


class Int8Conv2d(nn.Module):
    """A calibrated dense ``QConv`` executed by oneDNN's int8 convolution (float output,
    channels-last)."""

    def __init__(self, q: QConv) -> None:
        super().__init__()
        self.x_scale = float(q.act.scale)
        self.stride, self.padding, self.groups = list(q.stride), list(q.padding), q.groups
        qw = quantize(q.weight, q.w_scale.view(-1, 1, 1, 1))
        self.register_buffer("weight_int8", qw)
        self.register_buffer("w_scales", q.w_scale.float().contiguous())
        self.register_buffer("x_scale_", torch.tensor(self.x_scale))
        self.w_zps = torch.zeros(len(self.w_scales), dtype=torch.int64)
        self.bias = None if q.bias is None else q.bias.detach().float()
        self.packed = torch.ops.onednn.qconv_prepack(
            qw, self.w_scales, self.x_scale, 128, self.stride, self.padding, [1, 1], self.groups, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx = _quantize_u8(x.contiguous(memory_format=torch.channels_last), self.x_scale)
        return torch.ops.onednn.qconv2d_pointwise(
            qx, self.x_scale, 128, self.packed, self.w_scales, self.w_zps, self.bias,
            self.stride, self.padding, [1, 1], self.groups, 1.0, 0, torch.float32, "none", [], None)


def int8_kernel_layers(qmodel: nn.Module) -> list[str]:
    """Layers that :func:`use_int8_kernels` runs in int8 kernels: calibrated linear layers
    and dense (not depthwise, not transposed) convolutions with a uniform input quantizer."""
    names = []
    for name, m in qmodel.named_modules():
        if isinstance(m, (QLinear, QConv)) and m.act.kind == "uniform" and bool((m.act.scale > 0).all()):
            if isinstance(m, QConv) and (m.transposed or m.depthwise):
                continue
            names.append(name)
    return names


def use_int8_kernels(qmodel: Sam) -> Sam:
    """Swap (in place) the layers of a calibrated simulated model that int8 kernels can run
    for those kernels; everything else stays simulated. Returns the model."""
    if not int8_kernels_available():
        warnings.warn("this PyTorch build has no oneDNN int8 kernels; the model stays simulated",
                      stacklevel=2)
        return qmodel
    targets = set(int8_kernel_layers(qmodel))
    for name, m in list(qmodel.named_modules()):
        for child_name, child in list(m.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full in targets:
                setattr(m, child_name, Int8Linear(child) if isinstance(child, QLinear) else Int8Conv2d(child))
    qmodel.quantization["int8_kernels"] = sorted(targets)
    return qmodel


# -- checkpoints ------------------------------------------------------------------------
def quantized_state_dict(qmodel: Sam) -> dict[str, torch.Tensor]:
    """The state dict of a calibrated simulated model with every quantized weight stored as
    int8 (``<layer>.weight`` int8 + ``<layer>.w_scale``); everything else float32, except
    the unused classification head (float16)."""
    sd = {}
    weights = {f"{n}.weight": m for n, m in quant_layers(qmodel) if isinstance(m, (QLinear, QConv))}
    for k, v in qmodel.state_dict().items():
        m = weights.get(k)
        if m is not None and bool((m.w_scale > 0).all()):
            s = m.w_scale if isinstance(m, QLinear) else m._w_view(m.w_scale)
            sd[k] = quantize(v, s)
        elif k.startswith(("image_encoder.head.", "image_encoder.norm_head.")):
            sd[k] = v.half().clone()  # the unused classification head: kept for strict loading
        else:
            sd[k] = v.detach().clone()  # scales, biases, norms: float32, so a reload is exact
    return sd


def save_quantized(qmodel: Sam, path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Write a calibrated simulated model in the project's checkpoint format (atomic):
    ``config`` carries the float architecture and a ``quantization`` entry."""
    config = dict(qmodel.config)
    config["quantization"] = {"bits": BITS, "twin": qmodel.quantization.get("twin", "auto"),
                              "distance": qmodel.quantization.get("distance")}
    meta = {**(getattr(qmodel, "meta", None) or {}), **(meta or {})}  # keeps tuned thresholds
    write_checkpoint(path, config, quantized_state_dict(qmodel), meta)


def load_quantized(config: dict[str, Any], state_dict: dict[str, torch.Tensor], int8_kernels: bool = True,
                   source: str = "checkpoint") -> Sam:
    """Rebuild a quantized model from a checkpoint's config and state dict: the simulated
    model with its stored integers and scales, then (by default) int8 kernels where
    possible."""
    qcfg = config["quantization"]
    float_cfg = {k: v for k, v in config.items() if k != "quantization"}
    q = prepare(build_sam(float_cfg), twin=qcfg.get("twin", "auto"))
    own = q.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match a quantized {float_cfg.get('image_encoder', {}).get('name', '')} model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    layers = dict(quant_layers(q))
    sd = {}
    for k, v in state_dict.items():
        if v.dtype == torch.int8:
            m = layers[k.rsplit(".", 1)[0]]
            s = state_dict[k.rsplit(".", 1)[0] + ".w_scale"].float()
            s = s if isinstance(m, QLinear) else m._w_view(s)
            sd[k] = v.float() * s
        else:
            sd[k] = v.float() if v.is_floating_point() else v
    q.load_state_dict(sd, strict=True)
    for _, m in quant_layers(q):
        if isinstance(m, (QLinear, QConv)) and bool((m.w_scale > 0).all()):
            m.frozen = True  # the stored integers times their scales: on the grid already
    q.config = float_cfg
    q.quantization.update(qcfg)
    if int8_kernels:
        use_int8_kernels(q)
    return q.eval()
