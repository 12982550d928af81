"""Tune everything-mode thresholds for a model on TRAINING data (never val) and, with
--write, store them in the checkpoint's meta (``meta["everything"]`` for the point-grid
modes, ``meta["auto"]`` for auto mode, ``meta["auto_volume"]`` for auto mode on whole
stacks), from where every entry point (Python API, command line, napari widget, Dask)
takes its defaults.

    .venv/bin/python benchmarks/tune_everything.py --checkpoint PATH [--mode auto|volume] [--write]

Point-grid modes: predicted-IoU and stability thresholds on BBBC039 train fields.
Auto mode: the head's seed and mask thresholds on head-only labels (maps computed once per
image), then the decoder's filters and the faint-object filter, then the missed-object
pass (``blob_contrast``), all at the model's own input size; last the input size at which
images that fill the input are embedded (``input_size``) with those settings; each stage
scored as the mean over sources of the mean F1@0.5: BBBC039 train and DSB2018 train.
Volume: smoothing and thresholds of the 3D instances from the head's maps
(``segment_volume``), see :func:`tune_volume`.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import numpy as np
import torch
from volumes import gonuclear, noisy_stack

from napari_tinysam import SamPredictor
from napari_tinysam.bench import print_table
from napari_tinysam.distill.data import load_folder
from napari_tinysam.everything import (
    VOLUME_THRESHOLDS,
    segment_everything,
    volume_contrast_limits,
    volume_from_maps,
    volume_head_maps,
    volume_thresholds,
)
from napari_tinysam.instances import grid_cell_area, head_maps, labels_from_maps
from napari_tinysam.metrics import match_instances
from napari_tinysam.model.build import update_checkpoint_meta
from napari_tinysam.weights import load_model


def pick(items: list, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [items[i] for i in sorted(rng.choice(len(items), min(n, len(items)), replace=False))]


def print_scores(rows: list[dict], cols: list[str], sources) -> None:
    """A table of settings and their scores (per source and overall, 3 decimals)."""
    print_table([{k: (f"{v:.3f}" if k in (*sources, "score") else v) for k, v in r.items()} for r in rows], cols)


def tune_grid_modes(model, data: Path, n: int, ious, stabs) -> dict:
    fields = pick(load_folder(data / "bbbc039" / "train" / "images"), n)
    preds = [SamPredictor(model) for _ in fields]
    rows = []
    for iou, stab in itertools.product(ious, stabs):
        f1 = [
            match_instances(
                segment_everything(p, s.image, mode="hierarchical", pred_iou_thresh=iou, stability_score_thresh=stab),
                s.labels,
            )["f1"]
            for p, s in zip(preds, fields)
        ]
        rows.append({"pred_iou_thresh": iou, "stability_score_thresh": stab, "train F1@0.5": float(np.mean(f1))})
    rows.sort(key=lambda r: -r["train F1@0.5"])
    print_table(
        [{**r, "train F1@0.5": f"{r['train F1@0.5']:.3f}"} for r in rows[:8]],
        ["pred_iou_thresh", "stability_score_thresh", "train F1@0.5"],
    )
    best = rows[0]
    return {
        "pred_iou_thresh": best["pred_iou_thresh"],
        "stability_score_thresh": best["stability_score_thresh"],
        "tuned_on": f"{n} BBBC039 train fields, hierarchical mode, F1@0.5",
    }


def auto_sources(data: Path, n: int) -> dict[str, list]:
    return {
        "bbbc039 train": pick(load_folder(data / "bbbc039" / "train" / "images"), n),
        "dsb2018 train": pick(load_folder(data / "dsb2018" / "train" / "images"), 2 * n),
    }


def _score(per_source: dict[str, list[float]]) -> float:
    return float(np.mean([np.mean(v) for v in per_source.values()]))


#: Input sizes tried for auto mode (the model's own is always among them).
INPUT_SIZES = (768, 832, 896, 960, 1024)


def tune_auto(model, data: Path, n: int) -> dict:
    sources = auto_sources(data, n)
    size = model.img_size  # the thresholds are tuned at the model's own input size
    cached = {}
    for name, items in sources.items():
        cached[name] = []
        for s in items:
            p = SamPredictor(model)
            p.set_image(s.image)
            emb = p._embedding
            cached[name].append((p, head_maps(model, emb), grid_cell_area(emb), s))
    grid = itertools.product((0.4, 0.5, 0.6, 0.7), (0.4, 0.5, 0.6), (0.4, 0.5, 0.6), (0.5, 1.0, 2.0, 3.0))
    rows = []
    for fg, c, b, ms in grid:
        per = {
            name: [
                match_instances(labels_from_maps(maps, fg, c, b, ms * cell), s.labels)["f1"]
                for _, maps, cell, s in items
            ]
            for name, items in cached.items()
        }
        rows.append(
            {
                "foreground_thresh": fg,
                "center_thresh": c,
                "boundary_thresh": b,
                "min_size": ms,
                **{k: float(np.mean(v)) for k, v in per.items()},
                "score": _score(per),
            }
        )
    rows.sort(key=lambda r: -r["score"])
    cols = ["foreground_thresh", "center_thresh", "boundary_thresh", "min_size", *sources, "score"]
    print("\nhead only (train):")
    print_table(
        [
            {k: (f"{v:.3f}" if isinstance(v, float) and k not in cols[:4] else v) for k, v in r.items()}
            for r in rows[:6]
        ],
        cols,
    )
    head = {k: rows[0][k] for k in cols[:4]}
    rows2 = []
    for iou, agree, contrast in itertools.product((0.0, 0.6), (0.0, 0.3), (0.0, 0.1, 0.2, 0.3)):
        per = {
            name: [
                match_instances(
                    segment_everything(
                        p,
                        s.image,
                        pred_iou_thresh=iou,
                        min_agreement=agree,
                        min_contrast=contrast,
                        input_size=size,
                        **head,
                    ),
                    s.labels,
                )["f1"]
                for p, _, _, s in items
            ]
            for name, items in cached.items()
        }
        rows2.append(
            {
                "pred_iou_thresh": iou,
                "min_agreement": agree,
                "min_contrast": contrast,
                **{k: float(np.mean(v)) for k, v in per.items()},
                "score": _score(per),
            }
        )
    rows2.sort(key=lambda r: -r["score"])
    cols2 = ["pred_iou_thresh", "min_agreement", "min_contrast", *sources, "score"]
    print("\nauto, head thresholds above (train):")
    print_scores(rows2, cols2, sources)
    best = {k: rows2[0][k] for k in cols2[:3]}
    rows3 = []
    for blob in (0.0, 0.3, 0.5, 0.7):
        per = {
            name: [
                match_instances(
                    segment_everything(p, s.image, blob_contrast=blob, input_size=size, **best, **head), s.labels
                )["f1"]
                for p, _, _, s in items
            ]
            for name, items in cached.items()
        }
        rows3.append({"blob_contrast": blob, **{k: float(np.mean(v)) for k, v in per.items()}, "score": _score(per)})
    rows3.sort(key=lambda r: -r["score"])
    cols3 = ["blob_contrast", *sources, "score"]
    print("\nauto, the missed-object pass, thresholds above (train):")
    print_scores(rows3, cols3, sources)
    best["blob_contrast"] = rows3[0]["blob_contrast"]
    rows4 = []
    for side in sorted({size, *INPUT_SIZES}):
        per = {
            name: [
                match_instances(segment_everything(p, s.image, input_size=side, **best, **head), s.labels)["f1"]
                for p, _, _, s in items
            ]
            for name, items in cached.items()
        }
        rows4.append({"input_size": side, **{k: float(np.mean(v)) for k, v in per.items()}, "score": _score(per)})
    rows4.sort(key=lambda r: -r["score"])
    cols4 = ["input_size", *sources, "score"]
    print("\nauto, input size of images that fill the model's input, settings above (train):")
    print_scores(rows4, cols4, sources)
    return {
        **head,
        **best,
        "input_size": rows4[0]["input_size"],
        "tuned_on": f"train: {', '.join(f'{len(v)} {k}' for k, v in sources.items())}; mean F1@0.5",
    }


def tune_volume(model, data: Path, n: int) -> dict:
    """3D thresholds of ``segment_volume``'s auto mode on training stacks: noisy stand-ins
    built from BBBC039 train fields, the same with nuclei half as wide (the size of
    confocal embryo nuclei) and the GoNuclear crops the head was trained on (1135, 1136),
    scored as the mean of the three sources' mean 3D F1@0.5. The head's maps of every
    slice are computed once per in-plane denoising; the sweeps only smooth and threshold
    them."""
    fields = load_folder(data / "bbbc039" / "train" / "images")[:n]
    sources = {
        "stand-in (train)": [noisy_stack(s.image, s.labels, seed=i) for i, s in enumerate(fields)],
        "half-size stand-in (train)": [
            noisy_stack(s.image, s.labels, seed=i, shrink=0.5) for i, s in enumerate(fields)
        ],
        "gonuclear 1135+1136": [(img, lab) for name, img, lab in gonuclear(data) if name in ("1135", "1136")],
    }
    maps = {
        sigma: {
            name: [
                (
                    volume_head_maps(
                        SamPredictor(model), img, volume_contrast_limits(img, denoise_sigma=sigma), denoise_sigma=sigma
                    ),
                    lab,
                )
                for img, lab in vols
            ]
            for name, vols in sources.items()
        }
        for sigma in (0.0, 0.5, 1.0)
    }

    def sweep(grid, title: str) -> dict:
        rows = []
        for prm in grid:
            shape = {k: v for k, v in prm.items() if k != "denoise_sigma"}
            per = {
                name: [match_instances(volume_from_maps(m, **shape), lab)["f1"] for m, lab in items]
                for name, items in maps[prm["denoise_sigma"]].items()
            }
            rows.append({**prm, **{k: float(np.mean(v)) for k, v in per.items()}, "score": _score(per)})
        rows.sort(key=lambda r: -r["score"])
        cols = [*VOLUME_THRESHOLDS, *sources, "score"]
        print(f"\nsegment_volume, auto (train stacks, 3D F1@0.5), {title}:")
        print_scores(rows[:8], cols, sources)
        return {k: v for k, v in rows[0].items() if k in VOLUME_THRESHOLDS}

    # in-plane denoising and seeds first (one seed per connected seed region, objects grown
    # over the same maps), then how much less the maps that give the objects' extent are
    # smoothed, and seed splitting
    min_volume = VOLUME_THRESHOLDS["min_volume"]
    best = sweep(
        [
            dict(
                foreground_thresh=fg,
                center_thresh=c,
                boundary_thresh=b,
                z_sigma=z,
                xy_sigma=xy,
                extent_z_sigma=z,
                extent_xy_sigma=xy,
                seed_depth=0.0,
                min_volume=min_volume,
                denoise_sigma=d,
            )
            for d, z, xy, fg, c, b in itertools.product(
                maps, (1.0, 2.0), (0.0, 1.0), (0.3, 0.4, 0.5), (0.5, 0.6), (0.5, 0.6)
            )
        ],
        "denoising and seeds",
    )
    grid = [
        {**best, "extent_z_sigma": ez, "extent_xy_sigma": exy, "seed_depth": d}
        for ez, exy in sorted({(ez, exy) for ez in (0.5, 1.0, best["z_sigma"]) for exy in (0.0, 0.5, best["xy_sigma"])})
        for d in (0.0, 0.05, 0.1)
    ]
    # the model's own settings compete in the last sweep: the two stages search greedily
    # and can end below them, so a run with --write never makes the model worse
    current = {k: float(v) for k, v in volume_thresholds(model).items() if k in VOLUME_THRESHOLDS}
    if current["denoise_sigma"] in maps and current not in grid:
        grid.append(current)
    best = sweep(grid, "extent and seed depth, and the model's current settings")
    return {
        **best,
        "tuned_on": f"train: {n} noisy stand-in stacks from BBBC039 train, {n} with nuclei half as wide, "
        "GoNuclear 1135 and 1136; mean 3D F1@0.5",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--mode", choices=["hierarchical", "auto", "volume"], default="hierarchical")
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    ap.add_argument("--fields", type=int, default=None, help="images per source (default 4; auto: 10)")
    ap.add_argument("--iou", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.88])
    ap.add_argument("--stability", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = load_model(args.checkpoint)
    data = Path(args.data)
    if args.mode == "auto":
        tuned = {"auto": tune_auto(model, data, args.fields or 10)}
    elif args.mode == "volume":
        tuned = {"auto_volume": tune_volume(model, data, args.fields or 10)}
    else:
        tuned = {"everything": tune_grid_modes(model, data, args.fields or 4, args.iou, args.stability)}
    print(f"\ntuned: {tuned}")
    if args.write:
        update_checkpoint_meta(args.checkpoint, tuned)
        print(f"wrote them into {args.checkpoint}")


if __name__ == "__main__":
    main()
