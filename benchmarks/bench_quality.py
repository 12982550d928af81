"""Prompt quality of a model on BBBC039 val: one click at each nucleus's innermost point
(best of the three masks by predicted IoU), the ground-truth box, and three SAM-style
corrective clicks. Every nucleus of every val field is used.

    .venv/bin/python benchmarks/bench_quality.py [--model default] [--data ../shared/data]

``--feedback`` compares the two ways of decoding corrective clicks, click by click: with
the previous mask's logits as mask input (SAM's interactive protocol, what the annotator
does) and from scratch (every point set decoded alone). The choice was made on training
fields: ``--feedback --split train --every 12 --max-objects 25``.

``--by-size`` splits the scores by nucleus area and shows where the 3-click protocol
loses most (each bin's share of the summed 1 - IoU).

``--zoom`` adds rows for the annotator's magnified second look at small objects
(``napari_tinysam.annotate.Zoom``; ``--zoom-target`` and ``--zoom-max`` set its two
parameters, chosen on training fields: ``--split train --every 8 --zoom --zoom-target T``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from napari_tinysam import load_model
from napari_tinysam.annotate import Zoom
from napari_tinysam.bench import print_table
from napari_tinysam.distill.data import load_folder
from napari_tinysam.evaluation import area_bins, evaluate_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="model name or path (repeatable)")
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--max-objects", type=int, default=None, help="per field (default: all)")
    ap.add_argument("--every", type=int, default=1, help="use every N-th field")
    ap.add_argument("--feedback", action="store_true", help="compare corrective clicks with and without mask input")
    ap.add_argument("--by-size", action="store_true", help="scores by nucleus area (pixels)")
    ap.add_argument(
        "--zoom", action="store_true", help="also with the annotator's magnified second look at small objects"
    )
    ap.add_argument("--zoom-target", type=float, default=Zoom.target_area, help="Zoom.target_area")
    ap.add_argument("--zoom-max", type=float, default=Zoom.max_zoom, help="Zoom.max_zoom")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.feedback and (args.zoom or args.by_size):
        ap.error("--feedback is a table of its own: leave out --zoom and --by-size")
    torch.set_num_threads(args.threads)
    samples = load_folder(Path(args.data) / "bbbc039" / args.split / "images")[:: args.every]
    if args.feedback:
        feedback_table(args, samples)
        return
    runs = []
    zooms = [None] + ([Zoom(args.zoom_target, args.zoom_max)] if args.zoom else [])
    for name, zoom in ((n, z) for n in args.model or ["default"] for z in zooms):
        t0 = time.perf_counter()
        res = evaluate_prompts(load_model(name), samples, max_objects=args.max_objects, zoom=zoom, per_object=True)
        runs.append((name, _zoom_label(zoom), res, time.perf_counter() - t0))
    print(f"BBBC039 {args.split}, {len(samples)} fields")
    print_table(
        [
            {
                "model": name,
                "small objects": label,
                "click mIoU": f"{res['click']:.4f}",
                "box mIoU": f"{res['box']:.4f}",
                "3 corrective clicks mIoU": f"{res['click3']:.4f}",
                "objects": res["objects"],
                "seconds": f"{sec:.0f}",
            }
            for name, label, res, sec in runs
        ],
        ["model", "small objects", "click mIoU", "box mIoU", "3 corrective clicks mIoU", "objects", "seconds"],
    )
    if args.by_size:
        size_table(runs)


def _zoom_label(zoom: Zoom | None) -> str:
    return "-" if zoom is None else f"zoom x{zoom.max_zoom:g} to {zoom.target_area:g} px"


def feedback_table(args, samples) -> None:
    rows = []
    for name in args.model or ["default"]:
        model = load_model(name)
        for feedback in (True, False):
            res = evaluate_prompts(model, samples, max_objects=args.max_objects, mask_feedback=feedback)
            row = {
                "model": name,
                "corrective clicks": "previous mask as input" if feedback else "from scratch",
                "click": f"{res['click']:.4f}",
            }
            row.update({f"+{k + 1}": f"{v:.4f}" for k, v in enumerate(res["corrective"])})
            rows.append(row)
    print(f"BBBC039 {args.split}, {len(samples)} fields, {res['objects']} objects")
    print_table(rows, ["model", "corrective clicks", "click", "+1", "+2", "+3"])


def size_table(runs) -> None:
    rows = []
    for name, label, res, _ in runs:
        d = {k: np.asarray(v, dtype=float) for k, v in res["objects_detail"].items()}
        loss = (1 - d["click3"]).sum()
        for area, m in area_bins(d["area"]):
            rows.append(
                {
                    "model": name,
                    "small objects": label,
                    "area (px)": area,
                    "objects": int(m.sum()),
                    "click": f"{d['click'][m].mean():.4f}",
                    "box": f"{d['box'][m].mean():.4f}",
                    "click + 3": f"{d['click3'][m].mean():.4f}",
                    "share of 3-click loss": f"{(1 - d['click3'][m]).sum() / loss:.2f}",
                }
            )
    print_table(
        rows, ["model", "small objects", "area (px)", "objects", "click", "box", "click + 3", "share of 3-click loss"]
    )


if __name__ == "__main__":
    main()
