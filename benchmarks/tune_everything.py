"""Tune everything-mode thresholds for a model on TRAINING fields (never val) and,
with --write, store them in the checkpoint's meta["everything"], from where the command
line and the napari widget take their defaults.

    .venv/bin/python benchmarks/tune_everything.py --checkpoint PATH [--fields 4] [--write]
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import numpy as np
import torch

from napari_tinysam import SamPredictor
from napari_tinysam.bench import print_table
from napari_tinysam.distill.data import load_folder
from napari_tinysam.everything import segment_everything
from napari_tinysam.metrics import match_instances
from napari_tinysam.model.build import update_checkpoint_meta
from napari_tinysam.weights import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--iou", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.88])
    ap.add_argument("--stability", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    fields = load_folder(Path(args.data) / "bbbc039" / "train" / "images")
    rng = np.random.default_rng(0)
    fields = [fields[i] for i in rng.choice(len(fields), args.fields, replace=False)]
    preds = [SamPredictor(model) for _ in fields]
    rows = []
    for iou, stab in itertools.product(args.iou, args.stability):
        f1 = [match_instances(segment_everything(p, s.image, pred_iou_thresh=iou, stability_score_thresh=stab),
                              s.labels)["f1"] for p, s in zip(preds, fields)]
        rows.append({"pred_iou_thresh": iou, "stability_score_thresh": stab, "train F1@0.5": float(np.mean(f1))})
    rows.sort(key=lambda r: -r["train F1@0.5"])
    print_table([{**r, "train F1@0.5": f"{r['train F1@0.5']:.3f}"} for r in rows[:8]],
                ["pred_iou_thresh", "stability_score_thresh", "train F1@0.5"])
    best = rows[0]
    if args.write:
        tuned = {"pred_iou_thresh": best["pred_iou_thresh"],
                 "stability_score_thresh": best["stability_score_thresh"],
                 "tuned_on": f"{args.fields} BBBC039 train fields, hierarchical mode, F1@0.5"}
        update_checkpoint_meta(args.checkpoint, {"everything": tuned})
        print(f"wrote thresholds {tuned} into {args.checkpoint}")


if __name__ == "__main__":
    main()
