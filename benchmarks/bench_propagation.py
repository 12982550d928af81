"""One click per object on its largest slice, propagated through the stack
(``segment_object_in_volume``) by each method (``--methods``: the instance head's 3D
watershed from the click, the decoder's slice-by-slice walk), against the decoder's
slice-by-slice upper bound (one click on every slice the object spans):

- 3D IoU with the true object, mean over objects (and the share of objects >= 0.5);
- slices embedded per object against the slices it spans and the stack depth;
- seconds per object with its embeddings: every object is segmented on a cold cache
  for ``--cold`` objects per volume (measured), the rest on the volume's shared cache
  (decoding measured, embeddings counted).

Volumes: the GoNuclear confocal crops, the small synthetic stack, and noisy stand-ins
built from BBBC039 fields (``volumes.noisy_stack``: drifting, growing and shrinking
nuclei, blur, dim nuclei, Poisson noise at SNR 3; ``--snr`` and ``--blur`` make them
noisier or blurrier, ``--shrink 0.5`` makes the nuclei half as wide; ``--large N`` adds N
stand-ins with 1024x1024 slices built from 2x2 mosaics of fields).

    .venv/bin/python benchmarks/bench_propagation.py [--model default] [--data ../shared/data]
        [--split val] [--noisy 2] [--snr 3] [--blur 1] [--max-objects 40] [--cold 3]
        [--methods head,decoder]

``--anisotropy``: only the GoNuclear crops resampled in z (every other slice, twice as many
slices), one click per object by the head without and with the voxel size (``scale``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from volumes import gonuclear, mosaics, noisy_stack, resampled_gonuclear

from napari_tinysam import SamPredictor, load_model
from napari_tinysam.bench import cpu_name, print_table
from napari_tinysam.distill.data import load_folder
from napari_tinysam.evaluation import innermost_point
from napari_tinysam.everything import volume_contrast_limits
from napari_tinysam.predictor import EmbeddingCache, compute_embedding, to_uint8_rgb
from napari_tinysam.propagate import segment_object_in_volume


def iou3d(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def volumes(
    data: Path, split: str, noisy: int, snr: float = 3.0, blur: float = 1.0, shrink: float = 1.0, large: int = 0
):
    out = [(f"gonuclear {name}", img, lab) for name, img, lab in gonuclear(data)]
    syn = data / "nuclei3d_synthetic"
    if syn.exists():
        import tifffile

        out.append(
            ("synthetic", tifffile.imread(syn / "img3d.tif"), tifffile.imread(syn / "mask3d.tif").astype(np.int32))
        )
    fields = load_folder(data / "bbbc039" / split / "images", limit=noisy) if noisy else []
    for i, s in enumerate(fields):
        img, lab = noisy_stack(s.image, s.labels, seed=i, snr=snr, blur=blur, shrink=shrink)
        out.append((f"noisy BBBC039 {split} {i}" + (f" shrunk by {shrink:g}" if shrink != 1 else ""), img, lab))
    if large:  # slices larger than the model's input: 2x2 mosaics of fields, nuclei at their size
        fields = load_folder(data / "bbbc039" / split / "images", limit=4 * large)
        for k, (img, lab) in enumerate(mosaics(fields, 2)):
            img, lab = noisy_stack(img, lab, depth=24, size=1024, seed=k, snr=snr, blur=blur)
            out.append((f"large noisy BBBC039 {split} {k} (1024x1024 slices)", img, lab))
    return out


def run_volume(model, name, stack, labels, max_objects, cold, rng, methods, upper_bound=True):
    cache = EmbeddingCache(4 * 2**30)
    predictor = SamPredictor(model, cache=cache)
    ids = np.unique(labels[labels > 0])
    if max_objects and len(ids) > max_objects:
        ids = np.sort(rng.choice(ids, max_objects, replace=False))
    # embedding time per slice, measured on this volume (median of 3)
    rgb = to_uint8_rgb(np.asarray(stack[len(stack) // 2]), volume_contrast_limits(stack))
    t = []
    for _ in range(3):
        t0 = time.perf_counter()
        compute_embedding(model, rgb)
        t.append(time.perf_counter() - t0)
    t_embed = float(np.median(t))
    row = {"volume": name, "depth": stack.shape[0], "objects": len(ids)}
    spans, upper = [], []
    for obj_id in ids:
        area = (labels == obj_id).reshape(len(labels), -1).sum(1)
        spans.append(int((area > 0).sum()))
    for method in methods:
        prop, embeds, secs, cold_secs = [], [], [], []
        for k, i in enumerate(ids):
            obj = labels == i
            z = int(np.argmax(obj.reshape(len(obj), -1).sum(1)))
            x, y = innermost_point(obj[z])
            if k < cold:
                t0 = time.perf_counter()
                segment_object_in_volume(SamPredictor(model), stack, z, [[x, y]], [1], method=method)
                cold_secs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            before = set(cache._items)
            res = segment_object_in_volume(predictor, stack, z, [[x, y]], [1], method=method)
            decode = time.perf_counter() - t0
            new = len(set(cache._items) - before)
            secs.append(decode - new * t_embed + len(set(res.visited)) * t_embed)
            embeds.append(len(set(res.visited)))
            prop.append(iou3d(np.asarray(res), obj))
        row[f"{method}: 3D IoU"] = f"{np.mean(prop):.3f}"
        row[f"{method}: >= 0.5"] = f"{np.mean(np.array(prop) >= 0.5):.2f}"
        row[f"{method}: slices embedded"] = f"{np.mean(embeds):.1f}"
        row[f"{method}: s/object"] = f"{np.median(secs):.2f}"
        row[f"{method}: s/object cold"] = f"{np.median(cold_secs):.2f}" if cold_secs else "-"
        row[f"_{method}"] = prop
    if upper_bound:  # a click on every slice the object spans (each slice at its own best scale)
        for i in ids:
            obj = labels == i
            ub = np.zeros_like(obj)
            for zz in np.flatnonzero(obj.reshape(len(obj), -1).any(1)):
                px, py = innermost_point(obj[zz])
                ub[zz] = segment_object_in_volume(
                    predictor, stack, zz, [[px, py]], [1], z_range=(zz, zz), method="decoder"
                )[zz]
            upper.append(iou3d(ub, obj))
        row["3D IoU, click per slice"] = f"{np.mean(upper):.3f}"
        row["_upper"] = upper
    row["slices spanned"] = f"{np.mean(spans):.1f}"
    row["s/embedding"] = f"{t_embed:.2f}"
    return row


def anisotropy_rows(model, data: Path, max_objects: int) -> list[dict]:
    """Mean 3D IoU of one click per object (the head method) on the GoNuclear crops
    resampled in z (every other slice; twice as many slices), without and with the
    stack's voxel size (``scale``)."""
    rows = []
    for name, what, im, lb, scale in resampled_gonuclear(data):
        predictor = SamPredictor(model, cache=EmbeddingCache(8 * 2**30))
        ids = np.unique(lb[lb > 0])
        ids = np.sort(np.random.default_rng(0).choice(ids, min(max_objects, len(ids)), replace=False))
        ious: dict[str, list[float]] = {"3D IoU without scale": [], "3D IoU with scale": []}
        for i in ids:
            obj = lb == i
            z = int(np.argmax(obj.reshape(len(obj), -1).sum(1)))
            x, y = innermost_point(obj[z])
            for key, sc in zip(ious, (None, scale)):
                out = segment_object_in_volume(predictor, im, z, [[x, y]], [1], method="head", scale=sc)
                ious[key].append(iou3d(np.asarray(out), obj))
        rows.append(
            {
                "crop": name,
                "z sampling": what,
                "slices": len(im),
                "objects": len(ids),
                **{k: f"{np.mean(v):.3f}" for k, v in ious.items()},
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("TINYSAM_DATA_DIR", "../shared/data")))
    ap.add_argument("--split", default="val", help="BBBC039 split the noisy stand-ins are built from")
    ap.add_argument("--noisy", type=int, default=2, help="noisy stand-in stacks")
    ap.add_argument("--snr", type=float, default=3.0, help="signal-to-noise ratio of the noisy stand-ins")
    ap.add_argument("--blur", type=float, default=1.0, help="blur of the noisy stand-ins (pixels in the plane)")
    ap.add_argument(
        "--shrink",
        type=float,
        default=1.0,
        help="noisy stand-ins from fields shrunk by this factor (0.5: nuclei half as wide)",
    )
    ap.add_argument("--max-objects", type=int, default=40, help="objects per volume (random, seeded)")
    ap.add_argument("--cold", type=int, default=3, help="objects per volume timed on a cold cache")
    ap.add_argument("--only", default="", help="only volumes whose name contains this")
    ap.add_argument(
        "--large", type=int, default=0, help="noisy stand-ins with 1024x1024 slices (from 2x2 mosaics of fields)"
    )
    ap.add_argument("--methods", default="head,decoder", help="propagation methods to compare, comma-separated")
    ap.add_argument("--no-upper-bound", action="store_true", help="skip the click-on-every-slice bound")
    ap.add_argument(
        "--anisotropy",
        action="store_true",
        help="only the GoNuclear crops resampled in z, without and with their voxel size",
    )
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    if args.anisotropy:
        rows = anisotropy_rows(model, args.data, args.max_objects)
        print(
            f"\nmodel {args.model} ({model.precision}), {cpu_name()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; one click per object, head method\n"
        )
        print_table(rows, list(rows[0]))
        return
    rng = np.random.default_rng(0)
    rows, every = [], {}
    for name, stack, labels in volumes(args.data, args.split, args.noisy, args.snr, args.blur, args.shrink, args.large):
        if args.only and args.only not in name:
            continue
        row = run_volume(model, name, stack, labels, args.max_objects, args.cold, rng, methods, not args.no_upper_bound)
        for key in [k for k in row if k.startswith("_")]:
            every.setdefault(key[1:], []).extend(row.pop(key))
        rows.append(row)
        print(row, flush=True)
    overall = ", ".join(f"{k} {np.mean(v):.3f}" for k, v in every.items())
    print(
        f"\nmodel {args.model} ({model.precision}), {cpu_name()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; all objects, 3D IoU: {overall}\n"
    )
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
