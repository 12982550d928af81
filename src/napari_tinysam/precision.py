"""Numeric precision of inference: which one a model runs at, and the hardware check
behind ``precision="auto"``.

The forward passes run under ``torch.autocast`` at the chosen precision: matrix
products and convolutions in bfloat16 (or float16 on GPUs), with autocast's float32
list (softmax, norms, reductions) left in float32. Weights stay float32, and every
tensor leaving the model (embeddings, mask logits, IoU predictions, instance maps) is
float32, so thresholds, stability scores and caches see one dtype whatever runs inside.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ENV_VAR = "TINYSAM_PRECISION"


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively (CPU: AVX512_BF16 or
    AMX through oneDNN; CUDA: Ampere or newer)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str | None, device: str | torch.device = "cpu") -> str:
    """``"auto"`` (or None) -> ``"bf16"`` where the hardware runs it natively, else
    ``"fp32"``; explicit values are checked against the device. The environment variable
    ``TINYSAM_PRECISION`` replaces ``"auto"`` (e.g. ``fp32`` to rule bfloat16 out)."""
    if precision is None or precision == "auto":
        precision = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if precision not in PRECISIONS:
            raise ValueError(f"{ENV_VAR}={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' runs on CUDA GPUs only; use 'bf16' or 'fp32' on this device")
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        warnings.warn(
            "this CPU has no native bfloat16 (AVX512_BF16 or AMX): bfloat16 is emulated, "
            "many times slower than float32 (an embedding 15x on an AVX2 CPU); "
            "precision='auto' picks float32 here",
            stacklevel=2,
        )
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (a no-op for float32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])
