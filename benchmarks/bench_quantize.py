"""W8A8 post-training quantization of a model: accuracy, speed and size in one run.

Calibrates on BBBC039 *train* fields (default 8) with both scale-search distances
(Hessian-guided and plain L2) and two placements of twin-uniform quantizers: on every
post-softmax / post-GELU input (the paper's scheme, simulated), and only where the layer
runs simulated anyway (``auto``: linear layers and dense convolutions keep one scale and
run in int8 kernels). Reports on BBBC039 val: each variant's masks against the float
model's masks for the same prompts (one click at the innermost point, best of three by
predicted IoU; the ground-truth box) and its click and box mIoU against the ground truth.
The deployable variant (``auto``) is chosen between the two distances on 4 train fields
that calibration did not use. Then the speed of the image encoder and of a click with int8
kernels against the float model (medians, same run), and the checkpoint sizes. ``--save``
writes the chosen deployable model.

    .venv/bin/python benchmarks/bench_quantize.py --ablation --save src/napari_tinysam/weights/default-int8.pt
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_tinysam import SamPredictor, load_model
from napari_tinysam.bench import median_time, print_table
from napari_tinysam.distill.data import load_folder
from napari_tinysam.evaluation import compare_models
from napari_tinysam.everything import recommended_thresholds, segment_everything
from napari_tinysam.metrics import best_match_iou, match_instances
from napari_tinysam.model import save_checkpoint
from napari_tinysam.predictor import compute_embedding, to_uint8_rgb
from napari_tinysam.quantize import (
    QConv,
    QLinear,
    QMatMul,
    calibrate,
    int8_kernels_available,
    int8_kernels_unavailable,
    prepare,
    quant_layers,
    record_calibration,
    save_quantized,
    use_int8_kernels,
)


def median_ms(fn, repeats: int) -> float:
    return 1e3 * median_time(fn, repeats)[0]


def speed_rows(float_model, int8_model, image: np.ndarray, repeats: int) -> list[dict]:
    rgb = to_uint8_rgb(image)
    h, w = rgb.shape[:2]
    point = np.array([[w / 2, h / 2]])
    rows = []
    enc = {}
    click = {}
    for name, model in (("float32", float_model), ("int8", int8_model)):
        enc[name] = median_ms(lambda m=model: compute_embedding(m, rgb), repeats)
        pred = SamPredictor(model)
        pred.set_image(image)
        click[name] = median_ms(lambda p=pred: p.predict(point_coords=point, point_labels=[1]), repeats * 4)
    for name in ("float32", "int8"):
        rows.append(
            {
                "model": name,
                "embedding ms": f"{enc[name]:.1f}",
                "encoder speedup": f"{enc['float32'] / enc[name]:.2f}x",
                "click ms": f"{click[name]:.1f}",
                "click ratio": f"{click['float32'] / click[name]:.2f}x",
            }
        )
    return rows


TWIN_LABELS = {"all": "twin uniform (paper)", "auto": "twin on matmul inputs", "none": "uniform"}


def _row(activations: str, distance: str, run: str, res: dict, seconds: str) -> dict:
    return {
        "post-softmax/GELU": activations,
        "distance": distance,
        "run": run,
        "mask IoU vs float (click)": f"{res['agree_click']:.3f}",
        "mask IoU vs float (box)": f"{res['agree_box']:.3f}",
        "click mIoU": f"{res['click']:.3f} ({res['click'] - res['ref_click']:+.3f})",
        "box mIoU": f"{res['box']:.3f} ({res['box'] - res['ref_box']:+.3f})",
        "calibration s": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    ap.add_argument("--calibration-images", type=int, default=8)
    ap.add_argument("--val-fields", type=int, default=20)
    ap.add_argument("--val-objects", type=int, default=30, help="per field")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="hessian,l2", help="distances to compare")
    ap.add_argument("--everything-fields", type=int, default=4, help="val fields for everything mode (0: skip)")
    ap.add_argument("--ablation", action="store_true", help="also quantize one layer type at a time")
    ap.add_argument("--save", default=None, help="write the chosen deployable model here")
    ap.add_argument("--int8", default=None, help="only measure this quantized checkpoint (no calibration)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data) / "bbbc039"
    train = load_folder(root / "train" / "images")
    calib = train[: args.calibration_images]
    select = train[args.calibration_images : args.calibration_images + 4]
    val = load_folder(root / "val" / "images")[: args.val_fields]
    model = load_model(args.model)

    if args.int8:  # an existing quantized checkpoint: accuracy, speed and size
        int8 = load_model(args.int8)
        res = compare_models(int8, model, val, max_objects=args.val_objects)
        print(f"\nAccuracy of {args.int8}: BBBC039 val, {len(val)} fields, {res['objects']} objects")
        print_table(
            [
                _row(
                    TWIN_LABELS[int8.quantization["twin"]],
                    int8.quantization["distance"],
                    "int8 kernels" if int8.quantization.get("int8_kernels") else "simulated",
                    res,
                    "",
                )
            ],
            [
                "post-softmax/GELU",
                "distance",
                "run",
                "mask IoU vs float (click)",
                "mask IoU vs float (box)",
                "click mIoU",
                "box mIoU",
            ],
        )
        report_speed_and_size(model, int8, Path(args.int8), val[0].image, args)
        return
    rows, deployable = [], {}
    for twin in ("all", "auto"):
        prepared = prepare(model, twin=twin)
        t0 = time.perf_counter()
        captures = record_calibration(prepared, [s.image for s in calib], [s.labels for s in calib])
        t_record = time.perf_counter() - t0
        for distance in args.variants.split(","):
            q = copy.deepcopy(prepared)
            t0 = time.perf_counter()
            calibrate(q, captures, distance)
            q.quantization.update(distance=distance, calibration_images=len(calib))
            t_cal = t_record + time.perf_counter() - t0
            print(f"calibrated: twin={twin}, {distance}: {t_cal:.0f} s", flush=True)
            variants = [("simulated", q)]
            if twin == "auto":
                # model selection on training fields that calibration did not use
                sel = compare_models(q, model, select, max_objects=args.val_objects)
                deployable[distance] = (sel["agree_click"] + sel["agree_box"], q)
                if int8_kernels_available():  # else the same model again: nothing to add
                    variants.append(("int8 kernels", use_int8_kernels(copy.deepcopy(q))))
            for how, qm in variants:
                res = compare_models(qm, model, val, max_objects=args.val_objects)
                rows.append(_row(TWIN_LABELS[twin], distance, how, res, f"{t_cal:.0f}"))
                ref = res
    if args.ablation:
        # which layer types cost accuracy: keep one type quantized, the rest float (an unset
        # scale passes values through)
        best = max(deployable.values(), key=lambda v: v[0])[1]
        for label, types in (
            ("linear layers only", (QLinear,)),
            ("convolutions only", (QConv,)),
            ("matrix products only", (QMatMul,)),
            ("image encoder only", None),
            ("prompt encoder + mask decoder only", "decoder"),
        ):
            qm = prepare(model, twin=best.quantization["twin"])  # float weights, no scales
            calibrated = dict(quant_layers(best))
            for name, layer in quant_layers(qm):
                keep = (
                    isinstance(layer, types)
                    if isinstance(types, tuple)
                    else name.startswith("image_encoder") == (types is None)
                )
                if keep:  # this layer's calibrated scales
                    src = dict(calibrated[name].named_buffers())
                    for buf_name, buf in layer.named_buffers():
                        buf.copy_(src[buf_name])
            res = compare_models(qm, model, val, max_objects=args.val_objects)
            rows.append(_row(TWIN_LABELS["auto"], best.quantization["distance"], f"simulated, {label}", res, ""))
    print(
        f"\nAccuracy: BBBC039 val, {len(val)} fields, {ref['objects']} objects; float model click "
        f"mIoU {ref['ref_click']:.3f}, box {ref['ref_box']:.3f}; calibration on {len(calib)} train fields"
    )
    print_table(rows, list(rows[0]))

    best = max(deployable.values(), key=lambda v: v[0])[1]
    print(
        f"deployable variant (chosen on {len(select)} train fields outside calibration): "
        f"{best.quantization['distance']} distance"
    )
    if args.save:
        meta = {
            **model.meta,
            "quantized_from": args.model,
            "calibration": [s.name for s in calib],
            "distance": best.quantization["distance"],
            "twin": "auto",
            "date": time.strftime("%Y-%m-%d"),
        }
        save_quantized(best, args.save, meta=meta)
        print(f"\nwrote {args.save}")
    int8 = use_int8_kernels(copy.deepcopy(best))  # the deployable execution, built once
    if args.everything_fields:
        print(f"\nEverything mode, hierarchical, BBBC039 val, {args.everything_fields} fields")
        print_table(
            everything_rows({"float32": model, "int8": int8}, val[: args.everything_fields]),
            ["model", "F1 @ IoU 0.5", "objects", "true objects", "agreement with float"],
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.save) if args.save else Path(tmp) / "int8.pt"
        if not args.save:
            save_quantized(best, path)
        report_speed_and_size(model, int8, path, val[0].image, args)


def everything_rows(models: dict, fields: list) -> list[dict]:
    """Everything mode (hierarchical, each model's tuned thresholds) on val fields: F1 at
    IoU 0.5 against the ground truth, objects found, and agreement of each model's label
    image with the float model's (mean best-match IoU of the float model's objects)."""
    labels = {
        name: [segment_everything(m, f.image, mode="hierarchical", **recommended_thresholds(m)) for f in fields]
        for name, m in models.items()
    }
    ref = labels["float32"]
    rows = []
    for name, labs in labels.items():
        scores = [match_instances(lab, f.labels) for lab, f in zip(labs, fields)]
        rows.append(
            {
                "model": name,
                "F1 @ IoU 0.5": f"{np.mean([s['f1'] for s in scores]):.3f}",
                "objects": sum(s["n_pred"] for s in scores),
                "true objects": sum(s["n_true"] for s in scores),
                "agreement with float": f"{np.mean([best_match_iou(r, lab) for r, lab in zip(ref, labs)]):.3f}",
            }
        )
    return rows


def report_speed_and_size(model, int8_model, int8_path: Path, image, args) -> None:
    n_int8 = len(int8_model.quantization.get("int8_kernels", []))
    why = int8_kernels_unavailable()
    print(
        f"\nSpeed: one {image.shape[1]}x{image.shape[0]} field, {args.threads} threads, "
        f"medians of {args.repeats} (clicks: {args.repeats * 4}); {n_int8} layers run in int8 kernels, "
        f"the other quantized layers simulated" + (f" ({why})" if why else "")
    )
    print_table(
        speed_rows(model, int8_model, image, args.repeats),
        ["model", "embedding ms", "encoder speedup", "click ms", "click ratio"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        f32, f16 = Path(tmp) / "f32.pt", Path(tmp) / "f16.pt"
        save_checkpoint(model, f32)
        save_checkpoint(model, f16, half=True)
        sizes = [
            ("float32", f32.stat().st_size),
            ("float16 (bundled default)", f16.stat().st_size),
            ("int8 (W8A8)", int8_path.stat().st_size),
        ]
    print("\nSize")
    print_table(
        [{"checkpoint": n, "MB": f"{s / 2**20:.1f}", "vs float32": f"{s / sizes[0][1]:.0%}"} for n, s in sizes],
        ["checkpoint", "MB", "vs float32"],
    )


if __name__ == "__main__":
    main()
