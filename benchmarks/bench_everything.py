"""Everything mode: speed of every mode on one field (medians, embedding included, grid
as the baseline of the same run) and quality against ground truth next to a classical
Otsu + watershed baseline computed in the same run:

- BBBC039 val (2D fields), DSB2018 val (2D, many kinds and sizes): F1@0.5, precision,
  recall, mean matched IoU, seconds per image;
- 3D: the GoNuclear confocal crops and noisy stand-in stacks built from BBBC039 val
  fields (``volumes.noisy_stack``), ``segment_volume`` with its defaults, 3D F1@0.5.

Every call uses the API defaults (thresholds None = the model's tuned values).

    .venv/bin/python benchmarks/bench_everything.py [--model default] [--repeats 3]
        [--data ../shared/data] [--fields 20] [--dsb 50] [--no-3d] [--stacks 10] [--mosaic 1] [--slow]

--slow adds the point-grid modes (hierarchical, grid) to the DSB2018 and 3D tables.
--anisotropy prints only the GoNuclear crops resampled in z (every other slice, twice as
many), segmented without and with their voxel size (``segment_volume(..., scale=...)``).
--noise prints only the stand-ins at a lower SNR or with a wider blur, after the default one
(SNR 3, blur 1), each segmented with the model's ``denoise_sigma`` and with other values.
--shrink 0.5 builds the stand-ins from fields shrunk by half: nuclei 10-20 px across
instead of BBBC039's 20-40, the size of nuclei in confocal stacks of embryos.
--noisy-fields prints only the table of BBBC039 val fields with Poisson noise at SNR 5 to
1.5: auto mode with the smoothing it chooses from each image's noise against fixed ones.
--large-slices prints only the table of noisy stand-ins with slices larger than the
model's input (16 slices of 1024x1024 from 2x2 mosaics of BBBC039 val fields, 1536x1536
from 3x3 mosaics): the default (tiled in the plane when the nuclei are small) against
whole slices.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from volumes import gonuclear, mosaics, noisy_field, noisy_stack, resampled_gonuclear

from napari_tinysam import SamPredictor, load_model, samples, segment_everything, segment_volume
from napari_tinysam.bench import cpu_name, median_time, print_table
from napari_tinysam.distill.data import load_folder
from napari_tinysam.everything import auto_denoise_sigma, auto_input_size, link_volume, volume_thresholds
from napari_tinysam.metrics import best_match_iou, match_instances, otsu_watershed
from napari_tinysam.predictor import to_uint8_rgb

#: name -> keyword arguments of segment_everything; "paper" is TinySAM's round 2 exactly
#: (no background skipping: background_thresh 0)
METHODS = {
    "auto": {},
    "auto, head only": {"head_only": True},
    "auto, no missed-object pass": {"blob_contrast": 0.0},
    "hierarchical + head (skips background)": {"mode": "hierarchical"},
    "hierarchical (paper)": {"mode": "hierarchical", "background_thresh": 0.0},
    "grid 32x32": {"mode": "grid"},
}
FAST = ["auto", "auto, head only", "auto, no missed-object pass"]
#: large images: the default (tiles when the head finds the objects too small) against
#: the whole image shrunk to the model's input
MOSAIC_METHODS = {
    "auto (default: tiles when objects are small)": {},
    "auto, whole image": {"tile_shape": 10**6},
}
#: stacks with large slices: the default (tiles in the plane when the head finds the
#: objects too small) against whole slices shrunk to the model's input
LARGE_SLICE_METHODS = {
    "auto (default: tiles when objects are small)": {},
    "auto, whole slices": {"tile_shape": 10**6},
}
#: (mosaic side, slice side) of the --large-slices stand-ins
LARGE_SLICES = ((2, 1024), (3, 1536))
#: segment_volume with a head: 3D instances from the head's maps (the default) against
#: the 2D auto mode on every slice, linked across slices
VOLUME_METHODS = {
    "auto (3D from the head's maps)": {},
    "auto per slice, linked": {"per_slice": True},
}


def speed_rows(model, image: np.ndarray, repeats: int) -> list[dict]:
    rows, results, times = [], {}, {}
    for name, kw in METHODS.items():

        def run(name=name, kw=kw):
            # embedding included: a fresh predictor (empty cache) every run
            results[name] = segment_everything(SamPredictor(model), image, **kw)

        times[name], _ = median_time(run, repeats, warmup=1)
    grid = "grid 32x32"
    for name in METHODS:
        rows.append(
            {
                "mode": name,
                "median_s": f"{times[name]:.2f}",
                "speedup_vs_grid": f"{times[grid] / times[name]:.2f}x",
                "agreement_with_grid": f"{best_match_iou(results[grid], results[name]):.3f}",
                "objects": int(results[name].max()),
            }
        )
    return rows


def quality_table(title: str, model, items, methods: dict, volume: bool = False) -> None:
    scores: dict[str, list] = {name: [] for name in methods} | {"otsu+watershed (classical)": []}
    seconds: dict[str, list] = {name: [] for name in scores}
    grid = "grid 32x32" if "grid 32x32" in methods and not volume else None
    agreement: dict[str, list] = {name: [] for name in methods}
    for image, truth in items:
        pred = None if volume else SamPredictor(model)
        found = {}
        for name, kw in methods.items():
            t = time.perf_counter()
            if volume:
                labels = segment_volume(model, image, **kw)
            else:
                labels = segment_everything(pred, image, **kw)
                pred.cache.clear()  # every method pays its embedding
            seconds[name].append(time.perf_counter() - t)
            scores[name].append(match_instances(labels, truth))
            found[name] = labels
        if grid:
            for name in methods:
                agreement[name].append(best_match_iou(found[grid], found[name]))
        t = time.perf_counter()
        classical = link_volume(np.stack([otsu_watershed(s) for s in image])) if volume else otsu_watershed(image)
        seconds["otsu+watershed (classical)"].append(time.perf_counter() - t)
        scores["otsu+watershed (classical)"].append(match_instances(classical, truth))
    rows = []
    for method, per in scores.items():
        rows.append(
            {
                "method": method,
                "F1@0.5": f"{np.mean([p['f1'] for p in per]):.3f}",
                "precision": f"{np.mean([p['precision'] for p in per]):.3f}",
                "recall": f"{np.mean([p['recall'] for p in per]):.3f}",
                "matched_IoU": f"{np.mean([p['mean_matched_iou'] for p in per]):.3f}",
                "s/item": f"{np.median(seconds[method]):.2f}",
                "agreement_with_grid": f"{np.mean(agreement[method]):.3f}" if agreement.get(method) else "",
            }
        )
    print(f"\n{title}")
    print_table(
        rows,
        ["method", "F1@0.5", "precision", "recall", "matched_IoU", "s/item"]
        + (["agreement_with_grid"] if grid else []),
    )


#: (SNR, blur in pixels) of the stand-ins of the --noise table; the first is the default stand-in
NOISE_CONDITIONS = ((3.0, 1.0), (2.0, 1.0), (1.5, 1.0), (3.0, 2.0), (2.0, 2.0))
#: denoise_sigma values compared with the model's own in the --noise table
DENOISE_SIGMAS = (0.0, 1.0, 2.0)


def noise_rows(model, data: Path, stacks: int, shrink: float = 1.0) -> list[dict]:
    """3D F1@0.5 of ``segment_volume`` (mean over stand-ins from BBBC039 val) at each
    of :data:`NOISE_CONDITIONS`, with each of :data:`DENOISE_SIGMAS` and the model's
    ``denoise_sigma``."""
    fields = load_folder(data / "bbbc039" / "val" / "images")[:stacks]
    own = volume_thresholds(model)["denoise_sigma"]
    rows = []
    for snr, blur in NOISE_CONDITIONS:
        items = [
            noisy_stack(s.image, s.labels, seed=i, snr=snr, blur=blur, shrink=shrink) for i, s in enumerate(fields)
        ]
        row = {"SNR": snr, "blur px": blur}
        for sigma in sorted({*DENOISE_SIGMAS, own}):
            f1 = [match_instances(segment_volume(model, img, denoise_sigma=sigma), lab)["f1"] for img, lab in items]
            row[f"denoise {sigma:g}" + (" (model's)" if sigma == own else "")] = f"{np.mean(f1):.3f}"
        rows.append(row)
    return rows


#: Signal-to-noise ratios of the noisy 2D fields' table (``--noisy-fields``); 0: as acquired.
FIELD_SNRS = (0.0, 5.0, 3.0, 2.0, 1.5)
#: Fixed smoothings compared there with auto mode's own choice.
FIELD_SIGMAS = (0.0, 1.0, 2.0)


def noisy_field_rows(model, data: Path, fields: int) -> list[dict]:
    """F1@0.5 of ``segment_everything`` (auto mode, mean over BBBC039 val fields) with Poisson
    noise at each of :data:`FIELD_SNRS`: with the smoothing it chooses from each image's
    noise (``denoise_sigma=None``, the default) and with each of :data:`FIELD_SIGMAS`."""
    val = load_folder(data / "bbbc039" / "val" / "images")[:fields]
    rows = []
    for snr in FIELD_SNRS:
        items = [(noisy_field(s.image, s.labels, snr, seed=i) if snr else s.image, s.labels) for i, s in enumerate(val)]
        chosen = [auto_denoise_sigma(to_uint8_rgb(img)) for img, _ in items]
        row = {"SNR": f"{snr:g}" if snr else "as acquired", "sigma chosen (mean)": f"{np.mean(chosen):.2f}"}
        for sigma in (None, *FIELD_SIGMAS):
            f1 = [match_instances(segment_everything(model, img, denoise_sigma=sigma), lab)["f1"] for img, lab in items]
            row["auto (default)" if sigma is None else f"denoise_sigma={sigma:g}"] = f"{np.mean(f1):.3f}"
        rows.append(row)
    return rows


def anisotropy_rows(model, data: Path) -> list[dict]:
    """3D F1 of ``segment_volume`` on the GoNuclear crops resampled in z (every other
    slice; twice as many slices, linearly interpolated), without and with the stack's
    voxel size (``scale``)."""
    from napari_tinysam.predictor import EmbeddingCache

    predictor = SamPredictor(model, cache=EmbeddingCache(8 * 2**30))
    rows = []
    for name, what, im, lb, scale in resampled_gonuclear(data):
        row = {"crop": name, "z sampling": what, "slices": len(im), "z / xy": f"{scale[0] / scale[1]:.2f}"}
        for key, kw in (("F1 without scale", {}), ("F1 with scale", {"scale": scale})):
            row[key] = f"{match_instances(segment_volume(predictor, im, **kw), lb)['f1']:.3f}"
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=3, help="speed runs (0: quality only)")
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    ap.add_argument("--fields", type=int, default=20, help="BBBC039 val fields (0: none)")
    ap.add_argument("--dsb", type=int, default=50, help="DSB2018 val images (0: none)")
    ap.add_argument("--no-3d", action="store_true")
    ap.add_argument("--mosaic", type=int, default=1, help="large-image table from BBBC039 val mosaics (0: off)")
    ap.add_argument("--stacks", type=int, default=10, help="noisy stand-in stacks (from BBBC039 val fields)")
    ap.add_argument("--slow", action="store_true", help="point-grid modes on DSB2018 and 3D too")
    ap.add_argument(
        "--anisotropy",
        action="store_true",
        help="only the table of GoNuclear crops resampled in z, without and with their voxel size",
    )
    ap.add_argument(
        "--noise",
        action="store_true",
        help="only the table of noisier or more blurred stand-ins (--stacks of them), denoise_sigma compared",
    )
    ap.add_argument(
        "--noisy-fields",
        action="store_true",
        help="only the table of noisy 2D fields (--fields BBBC039 val fields), auto mode's smoothing compared",
    )
    ap.add_argument(
        "--shrink",
        type=float,
        default=1.0,
        help="stand-ins from BBBC039 fields shrunk by this factor (0.5: nuclei half as wide)",
    )
    ap.add_argument(
        "--large-slices",
        action="store_true",
        help="only the table of stand-ins with slices larger than the model's input (from mosaics)",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    data = Path(args.data)
    print(
        f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}, model {args.model}"
    )
    model = load_model(args.model)
    if args.anisotropy:
        print("\nGoNuclear crops resampled in z, segment_volume without and with scale (3D F1@0.5):")
        rows = anisotropy_rows(model, data)
        print_table(rows, list(rows[0]))
        return
    if args.noise:
        print(
            f"\nNoisy 3D stand-ins ({args.stacks} stacks of 24x128x128 from BBBC039 val per row), "
            "segment_volume, 3D F1@0.5, mean over stacks:"
        )
        rows = noise_rows(model, data, args.stacks, args.shrink)
        print_table(rows, list(rows[0]))
        return
    if args.noisy_fields:
        print(
            f"\nNoisy 2D fields ({args.fields} BBBC039 val fields, Poisson noise over 30 photons), "
            "segment_everything, F1@0.5, mean over fields:"
        )
        rows = noisy_field_rows(model, data, args.fields)
        print_table(rows, list(rows[0]))
        return
    if args.large_slices:
        val = load_folder(data / "bbbc039" / "val" / "images")[: args.fields]
        for side, size in LARGE_SLICES:
            stacks = [
                noisy_stack(img, lab, depth=16, size=size, seed=k) for k, (img, lab) in enumerate(mosaics(val, side))
            ]
            quality_table(
                f"Noisy 3D stand-ins with large slices ({len(stacks)} stacks of 16x{size}x{size} from "
                f"{side}x{side} mosaics of BBBC039 val fields, SNR 3, 3D F1, mean over stacks):",
                model,
                stacks,
                LARGE_SLICE_METHODS,
                volume=True,
            )
        return
    if not model.has_instance_head:
        for name in [*FAST, "hierarchical + head (skips background)"]:
            METHODS.pop(name)
    elif auto_input_size(model) != model.img_size:  # auto embeds fields at its own input size
        own = f"auto at the prompts' input size ({model.img_size})"
        items = list(METHODS.items())
        METHODS.clear()
        METHODS.update([items[0], (own, {"input_size": model.img_size}), *items[1:]])
        FAST.append(own)
    if args.repeats > 0:
        print("\nSpeed on one 520x696 BBBC039 field (the bundled sample), embedding included, API defaults:")
        print_table(
            speed_rows(model, samples.nuclei_2d(), args.repeats),
            ["mode", "median_s", "speedup_vs_grid", "agreement_with_grid", "objects"],
        )
    fast = {k: v for k, v in METHODS.items() if args.slow or k in FAST} or METHODS
    if args.fields:
        val = load_folder(data / "bbbc039" / "val" / "images")[: args.fields]
        quality_table(
            f"BBBC039 val ({len(val)} fields, mean over fields):", model, [(s.image, s.labels) for s in val], METHODS
        )
    if args.fields and args.mosaic:
        val = load_folder(data / "bbbc039" / "val" / "images")[: args.fields]
        for side in (2, 3):
            quality_table(
                f"Large images: {side}x{side} mosaics of BBBC039 val fields (mean over mosaics):",
                model,
                mosaics(val, side),
                MOSAIC_METHODS,
            )
    if args.dsb:
        val = load_folder(data / "dsb2018" / "val" / "images")[: args.dsb]
        quality_table(
            f"DSB2018 val ({len(val)} images, mean over images):", model, [(s.image, s.labels) for s in val], fast
        )
    if not args.no_3d:
        volume_methods = VOLUME_METHODS if model.has_instance_head else {}
        if args.slow or not volume_methods:
            volume_methods = {**volume_methods, "hierarchical per slice, linked": {"mode": "hierarchical"}}
        for name, img, lab in gonuclear(data):
            # 1139's raw voxels are spatially uncorrelated noise (docs/benchmarks.md): no
            # method can score there, so it is reported on its own line
            quality_table(
                f"GoNuclear crop {name} (3D F1; 1135 and 1136 are head training data):",
                model,
                [(img, lab)],
                volume_methods,
                volume=True,
            )
        bbbc = load_folder(data / "bbbc039" / "val" / "images")[: args.stacks]
        stand_in = [noisy_stack(s.image, s.labels, seed=i, shrink=args.shrink) for i, s in enumerate(bbbc)]
        note = f" shrunk by {args.shrink:g}" if args.shrink != 1 else ""
        quality_table(
            f"Noisy 3D stand-in ({len(stand_in)} stacks of 24x128x128 from BBBC039 val{note}, "
            "SNR 3, 3D F1, mean over stacks):",
            model,
            stand_in,
            volume_methods,
            volume=True,
        )


if __name__ == "__main__":
    main()
