"""bfloat16 against float32 on BBBC039 val: prompt quality at each precision and the
agreement of their masks, prompt by prompt (click at each nucleus's innermost point, best
of the three masks by predicted IoU; and its ground-truth box, token 0).

    .venv/bin/python benchmarks/bench_precision.py [--model default] [--every 1]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from napari_tinysam import SamPredictor, load_model
from napari_tinysam.bench import print_table
from napari_tinysam.distill.data import load_folder
from napari_tinysam.evaluation import evaluate_prompts, innermost_point
from napari_tinysam.predictor import predict_batch, upscale_logits


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@torch.no_grad()
def prompt_masks(model, sample) -> dict[str, np.ndarray]:
    """Full-size masks (N, H, W) of every object's click and box prompt on one field, each
    decoded and upscaled as a single click in the annotator is."""
    pred = SamPredictor(model)
    pred.set_image(sample.image)
    ids = [i for i in np.unique(sample.labels) if i]
    pts, boxes = [], []
    for i in ids:
        m = sample.labels == i
        x, y = innermost_point(m)
        pts.append([[x, y]])
        rows, cols = np.nonzero(m)
        boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    pts = np.asarray(pts, np.float64)
    with model.interactive_decoding():  # each object decoded and upscaled as a single click
        low, iou = predict_batch(pred, pts, np.ones(pts.shape[:2]))
        best = iou[:, 1:].argmax(1) + 1
        click = upscale_logits(pred, low[torch.arange(len(ids)), best][:, None])[:, 0] > 0
        low_b, _ = predict_batch(pred, boxes=np.asarray(boxes, np.float64))
        box = upscale_logits(pred, low_b[:, :1])[:, 0] > 0
    return {"click": click.numpy(), "box": box.numpy()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    ap.add_argument("--every", type=int, default=1, help="use every N-th val field")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    samples = load_folder(Path(args.data) / "bbbc039" / "val" / "images")[:: args.every]
    models = {p: load_model(args.model, precision=p) for p in ("fp32", "bf16")}

    rows = []
    for p, model in models.items():
        t0 = time.perf_counter()
        res = evaluate_prompts(model, samples)
        rows.append(
            {
                "precision": p,
                "click mIoU": f"{res['click']:.4f}",
                "box mIoU": f"{res['box']:.4f}",
                "3 corrective clicks mIoU": f"{res['click3']:.4f}",
                "objects": res["objects"],
                "seconds": f"{time.perf_counter() - t0:.0f}",
            }
        )
    print(f"BBBC039 val, {len(samples)} fields, model {args.model}")
    print_table(rows, list(rows[0]))

    agree: dict[str, list[float]] = {"click": [], "box": []}
    for s in samples:
        a, b = prompt_masks(models["fp32"], s), prompt_masks(models["bf16"], s)
        for k in agree:
            agree[k] += [mask_iou(x, y) for x, y in zip(a[k], b[k])]
    print("\nmask IoU of bfloat16 with float32, prompt by prompt")
    print_table(
        [
            {
                "prompt": k,
                "mean": f"{np.mean(v):.4f}",
                "5th percentile": f"{np.percentile(v, 5):.4f}",
                "min": f"{np.min(v):.4f}",
                "prompts": len(v),
            }
            for k, v in agree.items()
        ],
        ["prompt", "mean", "5th percentile", "min", "prompts"],
    )


if __name__ == "__main__":
    main()
