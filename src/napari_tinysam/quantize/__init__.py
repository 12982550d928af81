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
On CPUs whose kernels saturate (no VNNI) nothing is swapped and the model stays simulated
(:func:`int8_kernels_unavailable` says why).
"""

from __future__ import annotations

import torch

from ..model.build import register_checkpoint_kind
from .calibration import (
    calibrate,
    calibration_prompts,
    candidate_alphas,
    quantize_model,
    record_calibration,
    search_scales,
)
from .int8 import (
    Int8Conv2d,
    Int8Linear,
    int8_kernel_layers,
    int8_kernels_available,
    int8_kernels_unavailable,
    load_quantized,
    quantized_state_dict,
    save_quantized,
    use_int8_kernels,
)
from .simulated import (
    BITS,
    ActQuant,
    QConv,
    QLinear,
    QMatMul,
    fake_quant,
    prepare,
    quant_layers,
    quantize,
    twin_gelu_quant,
    twin_softmax_quant,
)

__all__ = [
    "BITS",
    "ActQuant",
    "Int8Conv2d",
    "Int8Linear",
    "QConv",
    "QLinear",
    "QMatMul",
    "calibrate",
    "calibration_prompts",
    "candidate_alphas",
    "fake_quant",
    "int8_kernel_layers",
    "int8_kernels_available",
    "int8_kernels_unavailable",
    "load_quantized",
    "prepare",
    "quant_layers",
    "quantize",
    "quantize_model",
    "quantized_state_dict",
    "record_calibration",
    "save_quantized",
    "search_scales",
    "twin_gelu_quant",
    "twin_softmax_quant",
    "use_int8_kernels",
]

# a checkpoint whose config carries ``quantization`` is rebuilt here, with int8 kernels on the CPU
register_checkpoint_kind(
    "quantization",
    lambda config, state_dict, device, source: load_quantized(
        config, state_dict, int8_kernels=torch.device(device).type == "cpu", source=source
    ),
)
