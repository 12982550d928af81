"""Prompt quality of a model on BBBC039 val: one click at each nucleus's innermost point
(best of the three masks by predicted IoU), the ground-truth box, and three SAM-style
corrective clicks. Every nucleus of every val field is used.

    .venv/bin/python benchmarks/bench_quality.py [--model default] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from napari_tinysam import load_model
from napari_tinysam.bench import print_table
from napari_tinysam.distill.data import load_folder
from napari_tinysam.evaluation import evaluate_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="model name or path (repeatable)")
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--max-objects", type=int, default=None, help="per field (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    samples = load_folder(Path(args.data) / "bbbc039" / args.split / "images")
    rows = []
    for name in args.model or ["default"]:
        t0 = time.perf_counter()
        res = evaluate_prompts(load_model(name), samples, max_objects=args.max_objects)
        rows.append({
            "model": name,
            "click mIoU": f"{res['click']:.4f}",
            "box mIoU": f"{res['box']:.4f}",
            "3 corrective clicks mIoU": f"{res['click3']:.4f}",
            "objects": res["objects"],
            "seconds": f"{time.perf_counter() - t0:.0f}",
        })
    print(f"BBBC039 {args.split}, {len(samples)} fields")
    print_table(rows, ["model", "click mIoU", "box mIoU", "3 corrective clicks mIoU", "objects", "seconds"])


if __name__ == "__main__":
    main()
