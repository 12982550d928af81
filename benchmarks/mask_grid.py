"""How much the low-resolution mask grid (a quarter of the model's input) limits masks, by
nucleus area, on BBBC039 val ground truth (no model weights involved).

Two ways to put a ground-truth mask through the grid and back with the model's own
upscaling (``Sam.postprocess_masks``: bilinear to the padded input, crop, bilinear to the
field):

- area-averaged: the mask resized to the input and averaged over each 4x4 cell, upscaled
  and cut at 0.5: how a smooth mask looks after the grid (a pessimistic proxy);
- fitted: logits on the grid optimised (Adam) so that their upscaled version matches the
  mask: what the grid can represent when the logits are free (an optimistic bound).

    .venv/bin/python benchmarks/mask_grid.py [--sizes 768] [--fit-per-bin 20]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_tinysam import load_model
from napari_tinysam.bench import print_table
from napari_tinysam.distill.data import load_folder
from napari_tinysam.distill.losses import dice_loss, mask_iou
from napari_tinysam.evaluation import area_bins
from napari_tinysam.model import build_sam
from napari_tinysam.predictor import preprocess_shape


def _fit(model, gt: torch.Tensor, init: torch.Tensor, input_size, steps: int) -> torch.Tensor:
    """Grid logits fitted to ``gt`` (H, W) by dice + BCE on a window around the object."""
    ys, xs = np.nonzero(gt.numpy())
    y0, y1 = max(0, ys.min() - 20), ys.max() + 21
    x0, x1 = max(0, xs.min() - 20), xs.max() + 21
    target = gt[y0:y1, x0:x1]
    low = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([low], lr=0.5)
    for _ in range(steps):
        out = 4 * model.postprocess_masks(low, input_size, tuple(gt.shape))[0, 0, y0:y1, x0:x1]
        loss = dice_loss(out[None, None], target[None, None])[0, 0] + F.binary_cross_entropy_with_logits(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return model.postprocess_masks(low, input_size, tuple(gt.shape))[0, 0] > 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--sizes", type=int, nargs="+", default=[768], help="model input sizes")
    ap.add_argument("--fit-per-bin", type=int, default=20, help="objects per area bin for the fitted logits")
    ap.add_argument("--fit-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    samples = [s for s in load_folder(Path(args.data) / "bbbc039" / args.split / "images") if s.labels is not None]
    objects = [
        (k, i + 1)
        for k, s in enumerate(samples)
        for i, sl in enumerate(ndimage.find_objects(s.labels))
        if sl is not None
    ]
    areas = np.array([(samples[k].labels == i).sum() for k, i in objects])
    rng = np.random.default_rng(args.seed)
    fit_pick: set[int] = set()
    for _, sel in area_bins(areas):
        idx = np.nonzero(sel)[0]
        fit_pick |= set(rng.choice(idx, min(args.fit_per_bin, len(idx)), replace=False).tolist())
    rows = []
    config = load_model("default").config  # the bundled architecture; only the input size varies
    for size in args.sizes:
        model = build_sam(dict(config, img_size=size))
        averaged, fitted = np.zeros(len(objects)), np.full(len(objects), np.nan)
        for n, (k, i) in enumerate(objects):
            labels = samples[k].labels
            h0, w0 = labels.shape
            input_size = preprocess_shape(h0, w0, size)
            gt = torch.from_numpy(labels == i).float()
            canvas = torch.zeros(1, 1, size, size)
            canvas[..., : input_size[0], : input_size[1]] = F.interpolate(
                gt[None, None], size=input_size, mode="bilinear", align_corners=False
            )
            cells = F.avg_pool2d(canvas, 4)
            with torch.no_grad():
                smooth = model.postprocess_masks(cells, input_size, (h0, w0))[0, 0] > 0.5
            averaged[n] = float(mask_iou(smooth, gt))
            if n in fit_pick:
                fitted[n] = float(mask_iou(_fit(model, gt, (cells - 0.5) * 20, input_size, args.fit_steps), gt))
        for label, m in area_bins(areas):
            rows.append(
                {
                    "input": size,
                    "area (px)": label,
                    "objects": int(m.sum()),
                    "area-averaged mIoU": f"{averaged[m].mean():.4f}",
                    "fitted logits mIoU": f"{np.nanmean(fitted[m]):.4f} ({int(np.isfinite(fitted[m]).sum())})",
                }
            )
        rows.append(
            {
                "input": size,
                "area (px)": "all",
                "objects": len(objects),
                "area-averaged mIoU": f"{averaged.mean():.4f}",
                "fitted logits mIoU": "",
            }
        )
    print(f"BBBC039 {args.split}, {len(samples)} fields, ground truth through the low-resolution grid")
    print_table(rows, ["input", "area (px)", "objects", "area-averaged mIoU", "fitted logits mIoU"])


if __name__ == "__main__":
    main()
