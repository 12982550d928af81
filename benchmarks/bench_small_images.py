"""Clicks in small images: one click at each whole nucleus's innermost point, through the
annotator's path (``segment_prompts`` with the magnified look at small objects), with and
without ``rescale`` (an unconfident object in a slice that the model enlarges is decoded
again on the slice seen smaller; ``napari_tinysam.annotate.SEED_SCALES``).

The bundled model enlarges an image up to 4x (``max_upscale``) so that the tiny nuclei of
small 3D slices are seen large enough; nuclei of ordinary size in a small image are then
blown up past the sizes it was trained on. Measured on crops of every BBBC039 val field
(nuclei cut by the crop's border left out) and on the DSB2018 val images as they are
(many sizes, 256x256 the most common: seen 3x enlarged).

    .venv/bin/python benchmarks/bench_small_images.py [--crops 128 192 256 384 0] [--dsb]

``--snr S [S ...]`` prints instead a table of noisy images: the BBBC039 val fields with
Poisson noise (``volumes.noisy_field``, before cropping) at each signal-to-noise ratio,
clicked through the annotator's whole path (``rescale`` on), the model given each image as
acquired, smoothed as the annotator smooths it by default
(``annotate.click_denoise_sigma``) and smoothed as everything mode's auto mode smooths
it (``everything.auto_denoise_sigma``). ``--max-objects`` samples the objects per image.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from volumes import noisy_field

from napari_tinysam import load_model
from napari_tinysam.annotate import ClickHistory, Prompts, Zoom, click_denoise_sigma, segment_prompts
from napari_tinysam.bench import cpu_name, print_table
from napari_tinysam.distill.data import load_folder
from napari_tinysam.evaluation import innermost_point
from napari_tinysam.everything import auto_denoise_sigma, denoised_rgb
from napari_tinysam.predictor import SamPredictor, to_uint8_rgb


def whole_objects(labels: np.ndarray) -> list[int]:
    """Ids of the objects that do not touch the image's border."""
    h, w = labels.shape
    return [
        i
        for i, s in enumerate(ndimage.find_objects(labels), 1)
        if s is not None and s[0].start > 0 and s[1].start > 0 and s[0].stop < h and s[1].stop < w
    ]


def clicks(model, images: list[tuple[np.ndarray, np.ndarray]], rescale: bool, sigma_of=None, max_objects=None) -> dict:
    """mIoU of one click per whole object, embeddings computed, seconds per image.
    ``sigma_of(rgb)``: the smoothing the model sees each image with (default none);
    ``max_objects``: at most this many objects per image (a seeded sample)."""
    ious, factors, sigmas, embeddings, seconds = [], [], [], 0, 0.0
    rng = np.random.default_rng(0)
    for image, labels in images:
        predictor = SamPredictor(model)  # a fresh cache: every image's embeddings are counted
        sigmas.append(sigma_of(to_uint8_rgb(image)) if sigma_of is not None else 0.0)
        rgb = denoised_rgb(image, sigmas[-1])
        ids = whole_objects(labels)
        if max_objects is not None and len(ids) > max_objects:
            ids = sorted(rng.choice(ids, max_objects, replace=False))
        t0 = time.perf_counter()
        for i in ids:
            gt = labels == i
            prompts = Prompts(np.array([innermost_point(gt)], np.float64), np.array([1]))
            res = segment_prompts(predictor, rgb, prompts, ClickHistory(), Zoom(), rescale=rescale)
            ious.append((res.mask & gt).sum() / max(1, (res.mask | gt).sum()))
            factors.append(res.factor)
        seconds += time.perf_counter() - t0
        embeddings += predictor.encoder_calls
    return {
        "objects": len(ious),
        "mIoU": float(np.mean(ious)) if ious else float("nan"),
        "rescaled": float(np.mean(np.array(factors) < 1)) if factors else 0.0,
        "sigma": float(np.mean(sigmas)) if sigmas else 0.0,
        "embeddings/image": embeddings / max(1, len(images)),
        "s/image": seconds / max(1, len(images)),
    }


def field_sets(fields, sizes, max_crops: int) -> list[tuple[str, list]]:
    """(name, [(image, labels)]) for each crop size of ``sizes`` (0: the whole fields):
    up to ``max_crops`` crops from each field's top-left, side by side."""
    sets = []
    for size in sizes:
        if size == 0:
            sets.append(("BBBC039 val, whole 520x696 fields", list(fields)))
            continue
        crops = [
            (im[:size, x : x + size], lab[:size, x : x + size])
            for im, lab in fields
            for x in range(0, size * max_crops, size)
            if x + size <= im.shape[1]
        ]
        sets.append((f"BBBC039 val, {size}x{size} crops", crops))
    return sets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    ap.add_argument("--model", default="default")
    ap.add_argument(
        "--crops",
        type=int,
        nargs="*",
        default=[128, 192, 256, 384, 0],
        help="crop sizes of the BBBC039 val fields (0: whole fields)",
    )
    ap.add_argument("--max-crops", type=int, default=2, help="crops per field (from its top-left, side by side)")
    ap.add_argument("--dsb", action="store_true", help="also the DSB2018 val images")
    ap.add_argument("--snr", type=float, nargs="+", help="only the table of noisy images at these SNRs")
    ap.add_argument("--max-objects", type=int, default=None, help="objects per image (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    fields = [(f.image, f.labels) for f in load_folder(Path(args.data) / "bbbc039" / "val" / "images")]
    if args.snr:
        if args.dsb:
            ap.error("--snr takes the BBBC039 val fields and their crops only: leave out --dsb")
        noisy_table(args, model, fields)
        return
    sets = field_sets(fields, args.crops, args.max_crops)
    if args.dsb:
        dsb = load_folder(Path(args.data) / "dsb2018" / "val" / "images")
        sets.append(("DSB2018 val, whole images", [(s.image, s.labels) for s in dsb]))
    rows = []
    for name, images in sets:
        scale = np.median([min(model.img_size / max(im.shape[:2]), model.max_upscale or np.inf) for im, _ in images])
        base = clicks(model, images, rescale=False)
        res = clicks(model, images, rescale=True)
        _add_row(
            rows,
            {
                "images": f"{name} ({len(images)})",
                "model's scale (median)": f"{scale:.2f}x",
                "objects": base["objects"],
                "click mIoU": f"{base['mIoU']:.3f}",
                "with rescale": f"**{res['mIoU']:.3f}**",
                "objects rescaled": f"{res['rescaled']:.0%}",
                "embeddings / image": f"{base['embeddings/image']:.1f} -> {res['embeddings/image']:.1f}",
                "s / image": f"{base['s/image']:.2f} -> {res['s/image']:.2f}",
            },
        )
    _print_table(args, model, rows, "the annotator's magnified look on")


def noisy_table(args, model, fields) -> None:
    """The fields with Poisson noise at each of ``args.snr`` (cropped as ``--crops`` says),
    clicked with rescale, as acquired and smoothed two ways (module docstring)."""
    views = {
        "as acquired": None,
        "smoothed (default)": lambda rgb: click_denoise_sigma(model, rgb),
        "everything mode's smoothing": auto_denoise_sigma,
    }
    rows = []
    for snr in args.snr:
        noisy = [(noisy_field(im, lab, snr, seed=i), lab) for i, (im, lab) in enumerate(fields)]
        for name, images in field_sets(noisy, args.crops, args.max_crops):
            for view, sigma_of in views.items():
                res = clicks(model, images, rescale=True, sigma_of=sigma_of, max_objects=args.max_objects)
                _add_row(
                    rows,
                    {
                        "images": f"{name} ({len(images)})",
                        "SNR": f"{snr:g}",
                        "model sees": view,
                        "sigma (mean)": f"{res['sigma']:.2f}",
                        "objects": res["objects"],
                        "click mIoU": f"{res['mIoU']:.3f}",
                    },
                )
    _print_table(args, model, rows, "the annotator's magnified look and rescale on")


def _add_row(rows: list[dict], row: dict) -> None:
    rows.append(row)
    print(row, flush=True)  # as it comes: a full run takes a while


def _print_table(args, model, rows: list[dict], settings: str) -> None:
    print(
        f"CPU: {cpu_name()}; model {args.model!r} at precision {model.arithmetic}, {args.threads} threads; "
        f"one click per whole object at its innermost point, {settings}"
    )
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
