"""Real int8 execution (oneDNN's u8 x s8 kernels for linear layers and dense
convolutions) and the quantized checkpoint format."""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Sam, build_sam
from ..model.build import CheckpointError, write_checkpoint
from .simulated import BITS, QConv, QLinear, fake_quant, prepare, quant_layers, quantize


# -- real int8 execution ----------------------------------------------------------------
def _kernels_exact() -> bool:
    """Whether oneDNN's u8 x s8 kernels sum their products exactly on this CPU.

    Without the VNNI instructions (AVX2 and early AVX-512 CPUs: AMD Zen 1-3, Intel before
    Cascade Lake / Ice Lake) oneDNN multiplies u8 by s8 with an instruction that adds each
    pair of products into 16 bits, saturating at 32767; two products of 255 x 127 already
    overflow. The symmetric activations here are stored as u8 around 128, so that happens
    in every layer and the outputs differ from their simulation by up to their own size.
    Probed with inputs that overflow any 16-bit pair sum (a few milliseconds, once)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 2, (16, 64), generator=g) * 255).to(torch.uint8)
    w = torch.where(torch.randint(0, 2, (16, 64), generator=g) > 0, 127, -127).to(torch.int8)
    ones, zps = torch.ones(16), torch.zeros(16, dtype=torch.int64)
    ref = (x.float() - 128) @ w.float().T  # integers well below 2**24: exact in float32
    lin = torch.ops.onednn.qlinear_pointwise(
        x, 1.0, 128, torch.ops.onednn.qlinear_prepack(w, None), ones, zps, None, 1.0, 0, torch.float32, "none", [], ""
    )
    xc = x.T.reshape(1, 64, 16, 1).contiguous(memory_format=torch.channels_last)
    packed = torch.ops.onednn.qconv_prepack(w.view(16, 64, 1, 1), ones, 1.0, 128, [1, 1], [0, 0], [1, 1], 1, None)
    conv = torch.ops.onednn.qconv2d_pointwise(
        xc, 1.0, 128, packed, ones, zps, None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], None
    )
    tol = 1e-5 * float(ref.abs().max())
    return float((lin - ref).abs().max()) <= tol and float((conv.reshape(16, 16).T - ref).abs().max()) <= tol


@lru_cache(maxsize=1)
def int8_kernels_unavailable() -> str | None:
    """Why the int8 kernels cannot run here (a sentence), or None where they can."""
    try:
        present = hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qconv2d_pointwise")
    except (AttributeError, RuntimeError):
        present = False
    if not present:
        return "this PyTorch build has no oneDNN int8 kernels"
    try:
        exact = _kernels_exact()
    except RuntimeError as e:  # a kernel that refuses this CPU
        return f"oneDNN's int8 kernels fail on this CPU ({e})"
    if not exact:
        return (
            "this CPU has no VNNI instructions, on which oneDNN's int8 kernels saturate "
            "(16-bit sums of u8 x s8 products)"
        )
    return None


def int8_kernels_available() -> bool:
    """Whether oneDNN's int8 linear and convolution kernels are present and exact on this
    CPU (see :func:`int8_kernels_unavailable`)."""
    return int8_kernels_unavailable() is None


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
            qx,
            self.x_scale,
            128,
            self.packed,
            self.w_scales,
            self.w_zps,
            self.bias,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
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
            qw, self.w_scales, self.x_scale, 128, self.stride, self.padding, [1, 1], self.groups, None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx = _quantize_u8(x.contiguous(memory_format=torch.channels_last), self.x_scale)
        return torch.ops.onednn.qconv2d_pointwise(
            qx,
            self.x_scale,
            128,
            self.packed,
            self.w_scales,
            self.w_zps,
            self.bias,
            self.stride,
            self.padding,
            [1, 1],
            self.groups,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            None,
        )


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
    reason = int8_kernels_unavailable()
    if reason is not None:
        warnings.warn(
            f"{reason}: the int8 model runs its simulation (the same integers on float "
            "kernels: the same results, at about float32 speed)",
            stacklevel=2,
        )
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
    config["quantization"] = {
        "bits": BITS,
        "twin": qmodel.quantization.get("twin", "auto"),
        "distance": qmodel.quantization.get("distance"),
    }
    meta = {**(getattr(qmodel, "meta", None) or {}), **(meta or {})}  # keeps tuned thresholds
    write_checkpoint(path, config, quantized_state_dict(qmodel), meta)


def load_quantized(
    config: dict[str, Any], state_dict: dict[str, torch.Tensor], int8_kernels: bool = True, source: str = "checkpoint"
) -> Sam:
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
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
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
