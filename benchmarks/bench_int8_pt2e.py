"""The maintained int8 route on this CPU, against the default precision: the image encoder
quantized with PT2E (``torch.export`` + torchao's ``X86InductorQuantizer``, static
per-channel int8 weights and per-tensor uint8 activations, calibrated on BBBC039 *train*
fields) and compiled by inductor into fused oneDNN int8 kernels; beside it, in the same
run, float32 and bfloat16 eager, bfloat16 compiled, and the bundled ``default-int8``
(the paper's scheme, this project's kernels). Quality: each variant's masks against the
float32 model's masks for the same val prompts (click at the innermost point, GT box).

    pip install --no-deps torchao   # not a dependency of the package
    .venv/bin/python benchmarks/bench_int8_pt2e.py [--calibration 8] [--val-fields 10]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch

from napari_tinysam import load_model
from napari_tinysam.bench import cpu_name, median_time, print_table
from napari_tinysam.distill.data import load_folder
from napari_tinysam.evaluation import compare_models
from napari_tinysam.predictor import model_input, to_uint8_rgb


def encoder_input(model, image: np.ndarray) -> torch.Tensor:
    """The padded, normalised encoder input of one image (1, 3, s, s)."""
    return model.preprocess(model_input(model, to_uint8_rgb(image)))


def pt2e_encoder(model, calibration: list[np.ndarray]):
    """Export, quantize (X86InductorQuantizer defaults) and calibrate the image encoder."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    example = encoder_input(model, calibration[0])
    exported = torch.export.export(model.image_encoder, (example,)).module()
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    for image in calibration:
        prepared(encoder_input(model, image))
    converted = convert_pt2e(prepared)
    converted.img_size = model.image_encoder.img_size  # Sam reads its input size here
    return converted


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--int8", default="default-int8", help="the bundled int8 model to compare")
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    ap.add_argument("--calibration", type=int, default=8, help="train fields")
    ap.add_argument("--val-fields", type=int, default=10)
    ap.add_argument("--val-objects", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--slow", type=float, default=10.0, help="seconds: a variant whose call takes longer is timed once, not scored"
    )
    ap.add_argument("--only-pt2e", action="store_true", help="skip the other variants except float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # as Sam.set_compiled compiles
    cpu = cpu_name()
    print(f"{cpu}; torch {torch.__version__}, {args.threads} threads")

    data = Path(args.data) / "bbbc039"
    train = load_folder(data / "train" / "images")[: args.calibration]
    val = load_folder(data / "val" / "images")[: args.val_fields]
    fp32 = load_model(args.model, precision="fp32")
    x = model_input(fp32, to_uint8_rgb(val[0].image))

    variants: dict[str, object] = {}
    variants["float32, eager"] = fp32
    if not args.only_pt2e:
        variants["bfloat16, eager (default on this CPU)"] = load_model(args.model, precision="bf16")
        bf16c = load_model(args.model, precision="bf16", compile=True)
        variants["bfloat16, compiled (compile=True)"] = bf16c
        variants[f"{args.int8} (paper's scheme, own kernels)"] = load_model(args.int8)
    t0 = time.perf_counter()
    q = copy.deepcopy(fp32)
    q.image_encoder = pt2e_encoder(fp32, [s.image for s in train])
    t_quant = time.perf_counter() - t0
    q.image_encoder = torch.compile(q.image_encoder)  # compiled with freezing (set in main)
    variants["PT2E int8 encoder, compiled"] = q

    rows = []
    base = None
    for name, model in variants.items():
        t0 = time.perf_counter()
        model.embed(x)  # compiles where compiled
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.embed(x)
        once = time.perf_counter() - t0
        if once > args.slow:
            # oneDNN picked its reference (scalar) kernel somewhere: one call says enough
            rows.append(
                {
                    "encoder": name,
                    "encoder ms": f"{once * 1e3:.0f} (one call)",
                    "vs float32": f"{base / once:.3f}x",
                    "first call s": f"{first:.1f}",
                    "masks vs float32 (click / box)": "not measured (too slow)",
                    "click / box mIoU": "",
                }
            )
            print(rows[-1], flush=True)
            continue
        t, _ = median_time(lambda model=model: model.embed(x), args.repeats)
        base = base or t
        row = {
            "encoder": name,
            "encoder ms": f"{t * 1e3:.1f}",
            "vs float32": f"{base / t:.2f}x",
            "first call s": f"{first:.1f}",
            "masks vs float32 (click / box)": "1 / 1",
            "click / box mIoU": "",
        }
        if model is not fp32:
            a = compare_models(model, fp32, val, max_objects=args.val_objects)
            row["masks vs float32 (click / box)"] = f"{a['agree_click']:.3f} / {a['agree_box']:.3f}"
            row["click / box mIoU"] = f"{a['click']:.3f} / {a['box']:.3f}"
            rows[0]["click / box mIoU"] = f"{a['ref_click']:.3f} / {a['ref_box']:.3f}"
        rows.append(row)
        print(rows[-1], flush=True)
    print(f"\nPT2E export + calibration on {len(train)} train fields: {t_quant:.1f} s")
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
