"""Everything mode: speed (grid vs hierarchical, same model, same image, medians) and
quality on BBBC039 val (instance F1 at IoU 0.5, mean matched IoU) next to a classical
Otsu + watershed baseline computed in the same run.

    .venv/bin/python benchmarks/bench_everything.py [--model default] [--repeats 3]
        [--data ../shared/data] [--fields 20] [--reference-weights PATH]

--reference-weights (e.g. ../shared/conformance/vit_t_perturbed_fp16.pt) adds rows for
an official-size 1024 vit_t model, the setting of the public reference's timing.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from napari_tinysam import SamPredictor, load_model, samples
from napari_tinysam.bench import median_time, print_table
from napari_tinysam.distill.data import load_folder
from napari_tinysam.everything import recommended_thresholds, segment_everything
from napari_tinysam.metrics import best_match_iou, match_instances, otsu_watershed


def speed_rows(model, name: str, image: np.ndarray, repeats: int) -> list[dict]:
    rows, results = [], {}
    thresholds = recommended_thresholds(model)
    for mode in ("grid", "hierarchical"):
        def run(mode=mode):
            # embedding included: a fresh predictor (empty cache) every run
            results[mode] = segment_everything(SamPredictor(model), image, mode=mode, **thresholds)

        t, _ = median_time(run, repeats, warmup=1)
        rows.append({"model": name, "mode": mode, "median_s": f"{t:.2f}", "objects": int(results[mode].max()), "_t": t})
    g, h = rows
    h["speedup_vs_grid"] = f"{g['_t'] / h['_t']:.2f}x"
    g["speedup_vs_grid"] = "1.00x"
    h["agreement"] = f"{best_match_iou(results['grid'], results['hierarchical']):.3f}"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=3, help="speed runs (0: quality only)")
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    ap.add_argument("--fields", type=int, default=20)
    ap.add_argument("--reference-weights", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    image = samples.nuclei_2d()
    model = load_model(args.model)
    if args.repeats > 0:
        rows = speed_rows(model, args.model, image, args.repeats)
        if args.reference_weights:
            rows += speed_rows(load_model(args.reference_weights), "vit_t 1024 (conformance weights)", image, 1)
        print("\nSpeed on one 520x696 BBBC039 field, embedding included, each model's recommended "
              "thresholds (public reference, hierarchical, 1024 vit_t random weights: 169 s worst "
              "case on this machine):")
        print_table(rows, ["model", "mode", "median_s", "speedup_vs_grid", "agreement", "objects"])

    val = load_folder(Path(args.data) / "bbbc039" / "val" / "images")[: args.fields]
    tuned = recommended_thresholds(model)
    print(f"\nthresholds tuned for {args.model} on train (meta): {tuned}")
    runs = {
        "grid, tuned thresholds": {"mode": "grid", **tuned},
        "hierarchical, tuned thresholds": {"mode": "hierarchical", **tuned},
        "hierarchical, SAM thresholds (0.88 / 0.95)": {"mode": "hierarchical"},
    }
    scores: dict[str, list[dict]] = {name: [] for name in runs} | {"otsu+watershed (classical)": []}
    for s in val:
        pred = SamPredictor(model)
        for name, kw in runs.items():
            scores[name].append(match_instances(segment_everything(pred, s.image, **kw), s.labels))
        scores["otsu+watershed (classical)"].append(match_instances(otsu_watershed(s.image), s.labels))
    qrows = []
    for method, per in scores.items():
        qrows.append({
            "method": method,
            "F1@0.5": f"{np.mean([p['f1'] for p in per]):.3f}",
            "precision": f"{np.mean([p['precision'] for p in per]):.3f}",
            "recall": f"{np.mean([p['recall'] for p in per]):.3f}",
            "mean_matched_iou": f"{np.mean([p['mean_matched_iou'] for p in per]):.3f}",
        })
    print(f"\nQuality on BBBC039 val ({len(val)} fields, mean over fields):")
    print_table(qrows, ["method", "F1@0.5", "precision", "recall", "mean_matched_iou"])


if __name__ == "__main__":
    main()
