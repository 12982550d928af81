"""The ``napari-tinysam`` console script: argument parsing only; the work is done by
the engine (``napari_tinysam.*``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

# `distill` loss terms whose weights are options (defaults live in distill.TrainConfig)
LOSS_TERMS = {
    "focal": "focal loss against the ground truth",
    "dice": "dice loss against the ground truth",
    "iou": "MSE of the predicted IoU",
    "embedding": "L1 between student and teacher image embeddings",
    "tokens": "L1 between the two-way transformer's output tokens",
    "logits": "hard-mask-weighted L1 between mask logits",
}


def _add_precision(parser: argparse.ArgumentParser) -> None:
    from .precision import PRECISIONS

    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bfloat16 where the CPU/GPU runs it natively, else float32",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the image encoder with torch.compile: the first image takes "
        "tens of seconds longer, every later one less (for folders and stacks)",
    )


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import samples
    from .demo import run_demo

    _threads(args.threads)
    torch.set_grad_enabled(False)
    run_demo(
        args.model,
        Path(args.output),
        image=samples.nuclei_2d(),
        labels=samples.nuclei_2d_labels(),
        precision=args.precision,
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .weights import REGISTRY, model_path

    if args.action == "list":
        from .bench import print_table

        rows = []
        for name, info in REGISTRY.items():
            path = model_path(name)
            rows.append(
                {
                    "name": name,
                    "description": info.description,
                    "local": "yes" if path.is_file() else "no",
                    "hash": info.hash or "-",
                    "source": "bundled" if info.bundled else info.url,
                }
            )
        print_table(rows, ["name", "local", "description", "hash", "source"])
        return 0
    if args.action == "download":
        from .weights import download_model

        if not args.name:
            raise SystemExit("models download: give a model name, e.g. `napari-tinysam models download tinysam`")
        print(download_model(args.name))
        return 0
    if args.action == "path":
        if not args.name:
            raise SystemExit("models path: give a model name, e.g. `napari-tinysam models path tinysam`")
        print(model_path(args.name))
        return 0
    raise SystemExit(f"unknown action {args.action!r}")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from . import samples
    from .bench import core_benchmark, print_table
    from .model import sam_from_checkpoint
    from .weights import load_model

    _threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {args.repeats}")
    model_1024 = sam_from_checkpoint(args.weights_1024) if args.weights_1024 else None
    if model_1024 is not None:
        model_1024.set_precision(args.precision)
    default = None
    try:
        default = load_model(args.model, precision=args.precision)
    except Exception as exc:  # the core numbers do not need the default model
        print(f"(skipping default-model rows: {exc})")
    if default is not None:
        print(
            f"default model: {default.arithmetic} (--precision {args.precision})"
            f"{', compiled encoder' if default.compiled else ''}"
        )
    rows = core_benchmark(samples.nuclei_2d(), model_1024, default, repeats=args.repeats)
    print()
    print_table(rows, ["measure", "median_ms", "ratio"])
    print("\nAgainst the public TinySAM code in the same run: benchmarks/bench_speed.py --reference DIR")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import TrainConfig, Trainer
    from .weights import load_model

    teacher = None if args.teacher in (None, "none") else load_model(args.teacher).eval()
    cfg = TrainConfig(
        train_images=args.images,
        out_dir=args.out,
        val_images=args.val,
        teacher=None if teacher is None else args.teacher,
        student=args.student,
        img_size=args.img_size or (teacher.img_size if teacher is not None else None),
        teacher_views=args.teacher_views,
        teacher_store=args.teacher_store,
        crop=args.crop,
        scale=args.scale,
        batch_crops=args.batch,
        objects_per_crop=args.objects,
        max_rounds=args.max_rounds,
        center_fraction=args.center_clicks,
        small_object_boost=args.small_boost,
        small_object_area=args.small_area,
        hard_prompts=not args.no_hard_prompts,
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        threads=args.threads,
        val_every=args.val_every,
        val_fields=args.val_fields,
        val_objects=args.val_objects,
        checkpoint_minutes=args.checkpoint_minutes,
        device=args.device,
        amp=args.amp,
        workers=args.workers,
        minutes=args.minutes,
        **{f"w_{t}": getattr(args, f"w_{t}") for t in LOSS_TERMS if getattr(args, f"w_{t}") is not None},
    )
    trainer = Trainer(cfg, teacher=teacher)
    trainer.run()
    print(f"wrote {Path(args.out) / 'final.pt'} (best on validation: {Path(args.out) / 'best.pt'})")
    return 0


#: Everything-mode thresholds settable on the command line (None: the model's tuned value).
THRESHOLD_OPTIONS = {
    "pred_iou_thresh": "predicted-IoU filter",
    "stability_score_thresh": "stability filter (grid modes)",
    "box_nms_thresh": "box NMS IoU",
    "foreground_thresh": "head foreground threshold (auto)",
    "center_thresh": "head centre-distance seed threshold (auto)",
    "boundary_thresh": "head boundary-distance seed threshold (auto)",
    "min_contrast": "drop objects fainter than this fraction of the median object's contrast (auto, 2D)",
    "blob_contrast": "add small objects the head misses, this fraction of the median object's contrast above "
    "the background (auto, 2D; 0: off)",
    "denoise_sigma": "smooth each image, or each slice of a stack, in its plane by a Gaussian of this many pixels "
    "first (auto: 2D images by their measured noise, none when clean; stacks by the model's value; 0: off)",
}


def cmd_train_head(args: argparse.Namespace) -> int:
    from .distill.instance import HeadConfig, train_head

    _threads(args.threads)
    cfg = HeadConfig(
        sources=args.data,
        out_dir=args.out,
        model=args.model,
        val=args.val or [],
        views=args.views,
        z_step=args.z_step,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        val_every=args.val_every,
        val_limit=args.val_limit,
        minutes=args.minutes,
        init=args.init,
        precision=args.precision,
    )
    path = train_head(cfg)
    print(f"wrote {path} (the model with the head that scored best on validation)")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .batch import check_output_folder, expand_inputs, output_folders, output_paths

    _threads(args.threads)
    inputs = expand_inputs(args.inputs)
    outputs = output_paths(inputs, args.output)
    for out in outputs:
        check_output_folder(out)
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it (nothing was written)")
    distributed = bool(args.workers or args.scheduler)
    if args.block_depth is not None and not distributed:
        raise ValueError(
            "--block-depth applies to runs on Dask (--workers / --scheduler); a run in one process "
            "reads the whole stack"
        )
    if args.halo and not args.tile_shape:
        raise ValueError("--halo needs --tile-shape")
    if distributed:
        for out in outputs:
            if out.suffix.lower() != ".zarr":
                raise ValueError(f"with --workers/--scheduler the output must be a .zarr store, got {out}")
    with output_folders(outputs):
        if distributed:
            return _segment_distributed(args, inputs, outputs)
        return _segment_local(args, inputs, outputs)


def _segment_local(args: argparse.Namespace, inputs, outputs) -> int:
    from tqdm import tqdm

    from .batch import UnreadableInput, segment_file
    from .weights import load_model

    model = load_model(args.model, precision=args.precision)
    params = {
        "mode": args.mode,
        "points_per_side": args.points_per_side,
        **_thresholds(args),
        "min_mask_region_area": args.min_area,
        "contrast_limits": tuple(args.contrast_limits) if args.contrast_limits else None,
        "stitch": not args.no_stitch,
        **({"scale": tuple(args.scale)} if args.scale else {}),
        **({"tile_shape": tuple(args.tile_shape), "halo": tuple(args.halo or (0, 0))} if args.tile_shape else {}),
    }
    rows, skipped = [], []
    for path, out in zip(inputs, outputs):
        bar = tqdm(total=0, desc=path.name, unit="slice")
        try:
            res = segment_file(
                model,
                path,
                out,
                overwrite=args.overwrite,
                index=tuple(args.index) if args.index else None,
                progress=partial(_show_progress, bar),
                **params,
            )
        except UnreadableInput as exc:
            skipped.append(_skip(exc))
            continue
        finally:
            bar.close()
        rows.append(
            {
                "input": str(path),
                "output": str(out),
                "shape": "x".join(map(str, res.shape)),
                "voxel (z, y, x)": _voxel(res.voxel_size),
                "objects": res.objects,
                "s/slice": f"{res.seconds / res.slices:.2f}",
            }
        )
    return _report(rows, skipped, len(inputs))


def _skip(exc: Exception) -> str:
    """Say at once that an input is skipped (the run goes on); the reason, for the end."""
    print(f"skipped: {exc}", file=sys.stderr)
    return str(exc)


def _report(rows: list[dict], skipped: list[str], total: int) -> int:
    """The table of what was written; inputs that could not be read fail the run (exit
    code 2) once the others are done."""
    from .bench import print_table

    if rows:
        print_table(rows, ["input", "output", "shape", "voxel (z, y, x)", "objects", "s/slice"])
    if skipped:
        done = "the others were written" if rows else "nothing was written"
        raise ValueError(f"{len(skipped)} of {total} inputs could not be segmented ({done}): " + "; ".join(skipped))
    return 0


def _voxel(size) -> str:
    return "" if size is None else " x ".join(f"{v:g}" for v in size)


def _show_progress(bar, done: int, total: int) -> None:
    """A progress callback's (done, total) shown on a tqdm bar."""
    bar.total = total
    bar.n = done
    bar.refresh()


def _thresholds(args: argparse.Namespace) -> dict:
    """The thresholds given on the command line; the engine fills the others with the
    model's tuned values."""
    out = {key: getattr(args, key) for key in THRESHOLD_OPTIONS if getattr(args, key) is not None}
    if args.head_only:
        out["head_only"] = True
    return out


def _segment_distributed(args: argparse.Namespace, inputs, outputs) -> int:
    from tqdm import tqdm

    from .batch import UnreadableInput, read_input
    from .distributed import connect, segment_volume_distributed
    from .io import read_voxel_size

    client = connect(args.scheduler, args.workers)
    rows, skipped = [], []
    try:
        for path, out in zip(inputs, outputs):
            try:
                data = read_input(path, tuple(args.index) if args.index else None, lazy=True)
            except UnreadableInput as exc:
                skipped.append(_skip(exc))
                continue
            scale = tuple(args.scale) if args.scale else read_voxel_size(path)
            bar = tqdm(total=data.shape[0], desc=path.name, unit="task")
            t0 = time.perf_counter()
            labels = segment_volume_distributed(
                args.model,
                data,
                out,
                client,
                mode=args.mode,
                stitch=not args.no_stitch,
                contrast_limits=tuple(args.contrast_limits) if args.contrast_limits else None,
                progress=partial(_show_progress, bar),
                overwrite=args.overwrite,
                precision=args.precision,
                scale=scale,
                **({"block_depth": args.block_depth} if args.block_depth else {}),
                points_per_side=args.points_per_side,
                min_mask_region_area=args.min_area,
                **_thresholds(args),
            )
            bar.close()
            seconds = time.perf_counter() - t0
            objects = len(np.unique(np.concatenate([np.unique(labels[i]) for i in range(labels.shape[0])]))) - 1
            rows.append(
                {
                    "input": str(path),
                    "output": str(out),
                    "shape": "x".join(map(str, labels.shape)),
                    "voxel (z, y, x)": _voxel(scale),
                    "objects": objects,
                    "s/slice": f"{seconds / labels.shape[0]:.2f}",
                }
            )
    finally:
        client.close()
    return _report(rows, skipped, len(inputs))


def cmd_embed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .batch import read_input
    from .embedding_store import EmbeddingStore
    from .weights import load_model

    _threads(args.threads)
    data = read_input(Path(args.input), tuple(args.index) if args.index else None)
    rgb = data.ndim >= 3 and data.shape[-1] in (3, 4)
    if data.ndim == 2 or (data.ndim == 3 and rgb):
        data = data[None]
    model = load_model(args.model, precision=args.precision)
    store = EmbeddingStore.open(args.output, model, data, args.contrast_limits, create=True, smooth=not args.no_smooth)
    todo = int((~store.done).sum())
    bar = tqdm(total=data.shape[0], initial=data.shape[0] - todo, desc="embed", unit="slice")
    n = store.compute(model, data, progress=lambda d, t: bar.update(1))
    bar.close()
    print(f"{args.output}: {data.shape[0]} slices ({n} computed now, {data.shape[0] - n} reused)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .distill.data import load_folder
    from .quantize import quantize_model, save_quantized
    from .weights import load_model

    _threads(args.threads)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; add --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    model = load_model(args.model)
    if getattr(model, "quantization", None):
        raise ValueError(f"{args.model} is already quantized; quantize its float model instead")
    samples = load_folder(args.images, args.labels, limit=args.images_count)
    bar = tqdm(total=None, desc="calibrating", unit="layer")

    def progress(done: int, total: int, name: str) -> None:
        bar.total = total
        bar.update(1)

    t0 = time.perf_counter()
    q = quantize_model(
        model,
        [s.image for s in samples],
        [s.labels for s in samples],
        distance=args.distance,
        twin=args.twin,
        prompts_per_image=args.prompts,
        seed=args.seed,
        progress=progress,
    )
    bar.close()
    meta = {
        "quantized_from": str(args.model),
        "calibration": [s.name for s in samples],
        "distance": args.distance,
        "twin": args.twin,
        "date": time.strftime("%Y-%m-%d"),
    }
    save_quantized(q, out, meta=meta)
    print(
        f"{out}: W8A8 ({args.distance} distance, twin-uniform: {args.twin}), "
        f"{len(samples)} calibration images, {time.perf_counter() - t0:.0f} s, "
        f"{out.stat().st_size / 2**20:.1f} MB"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="napari-tinysam", description="TinySAM for microscopy")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="segment the bundled sample headless and write an overlay")
    d.add_argument("--model", default="default", help="registry name or checkpoint path")
    d.add_argument("-o", "--output", default="outputs/demo", help="output folder")
    d.add_argument("--threads", type=int, default=2)
    _add_precision(d)
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", help="list, download, or print where a model file belongs")
    m.add_argument("action", choices=["list", "download", "path"])
    m.add_argument("name", nargs="?")
    m.set_defaults(func=cmd_models)

    b = sub.add_parser("bench", help="embedding and click latency table")
    b.add_argument("--model", default="default")
    b.add_argument(
        "--weights-1024",
        default=None,
        help="vit_t checkpoint for the 1024 rows (default: random vit_t weights; speed does not depend on values)",
    )
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--threads", type=int, default=2)
    _add_precision(b)
    b.set_defaults(func=cmd_bench)

    g = sub.add_parser("segment", help="everything mode on files (TIFF, Zarr, NumPy; 2D, 3D, RGB)")
    g.add_argument("inputs", nargs="+", help="files, folders or glob patterns")
    g.add_argument(
        "-o", "--output", required=True, help="output file (.tif/.zarr/.npy) for one input, else a folder (made if new)"
    )
    g.add_argument("--model", default="default", help="registry name or checkpoint path")
    g.add_argument(
        "--mode",
        choices=["auto", "hierarchical", "grid"],
        default=None,
        help="default: auto for models with an instance head (the bundled default), else hierarchical",
    )
    g.add_argument(
        "--head-only",
        action="store_true",
        help="auto mode: instances of the head alone, without the prompt decoder (faster)",
    )
    g.add_argument(
        "--points-per-side",
        type=int,
        default=32,
        help="hierarchical / grid modes: points per side of the prompt grid (default 32)",
    )
    for key, what in THRESHOLD_OPTIONS.items():
        g.add_argument(
            "--" + key.replace("_", "-"),
            type=float,
            default=None,
            help=f"{what} (default: the model's tuned value for the mode)",
        )
    g.add_argument("--min-area", type=int, default=0, help="remove islands/holes below this area")
    g.add_argument(
        "--contrast-limits",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="intensity range mapped to 0..255 (default: 0.5 / 99.5 percentiles)",
    )
    g.add_argument(
        "--tile-shape",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="segment images, or the slices of stacks (auto mode, in one process), in tiles of this size "
        "(default in auto mode: tiles only when the objects are too small at the whole-image scale, sized "
        "from them; on Dask always so)",
    )
    g.add_argument("--halo", type=int, nargs=2, metavar=("H", "W"), help="overlap added around each tile")
    g.add_argument("--index", type=int, nargs="+", help="leading indices for 4D+ data (e.g. a time point)")
    g.add_argument("--no-stitch", action="store_true", help="do not link objects across slices")
    g.add_argument(
        "--scale",
        type=float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="3D stacks: voxel size in any one unit (e.g. 0.5 0.1 0.1 um; default: the one "
        "an ImageJ / OME-TIFF or OME-Zarr file records); the smoothing across slices "
        "is converted to this stack's z spacing",
    )
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--workers", type=int, default=None, help="run on a local Dask cluster with N worker processes")
    g.add_argument("--scheduler", default=None, help="run on the Dask cluster at this address (tcp://host:port)")
    g.add_argument(
        "--block-depth",
        type=int,
        default=None,
        metavar="N",
        help="on Dask, 3D stacks are segmented in blocks of N slices (default 32), each read with "
        "16 more on either side: lower it if a worker runs out of memory (a block needs about "
        "60 bytes per voxel it reads)",
    )
    g.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    _add_precision(g)
    g.set_defaults(func=cmd_segment)

    e = sub.add_parser("embed", help="precompute slice embeddings into a Zarr store (resumable)")
    e.add_argument("input", help="a 2D/3D TIFF, Zarr or .npy")
    e.add_argument("-o", "--output", required=True, help="store path, e.g. stack_embeddings.zarr")
    e.add_argument("--model", default="default")
    e.add_argument(
        "--contrast-limits",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="default: the stack's 0.5 / 99.5 percentiles",
    )
    e.add_argument("--index", type=int, nargs="+", help="leading indices for 4D+ data")
    e.add_argument(
        "--no-smooth",
        action="store_true",
        help="embed noisy slices as acquired (for the annotator with 'smooth noisy images' off); "
        "by default they are smoothed as the annotator smooths them",
    )
    e.add_argument("--threads", type=int, default=2)
    _add_precision(e)
    e.set_defaults(func=cmd_embed)

    t = sub.add_parser("distill", help="train a TinySAM student (distillation or ground truth)")
    t.add_argument("images", help="folder of training images (labels in a sibling 'labels' folder)")
    t.add_argument("-o", "--out", required=True, help="run folder (checkpoints; resumes if present)")
    t.add_argument("--val", default=None, help="folder of validation images with labels")
    t.add_argument("--teacher", default="none", help="teacher model name/path, or 'none' (ground truth only)")
    t.add_argument("--student", default="vit_t", help="architecture name or checkpoint to start from")
    t.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="student input size (default: the teacher's, else the student checkpoint's, else 512)",
    )
    t.add_argument("--teacher-views", type=int, default=2000, help="fixed views with stored teacher embeddings")
    t.add_argument(
        "--teacher-store", default=None, help="folder of the teacher embedding store (default: OUT/teacher_store)"
    )
    t.add_argument("--crop", type=int, default=256)
    t.add_argument("--scale", type=float, default=1.0, help="resize factor applied to training images")
    t.add_argument("--batch", type=int, default=4, help="crops per step")
    t.add_argument("--objects", type=int, default=12, help="objects per crop")
    t.add_argument("--max-rounds", type=int, default=9, help="hard-prompt rounds drawn from 0..N")
    t.add_argument(
        "--center-clicks",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share of hard-prompt points placed at the innermost point of the largest error "
        "region (the quality benchmark's corrective click) instead of uniformly in it",
    )
    t.add_argument(
        "--small-boost",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="draw objects smaller than --small-area this many times as often (when a crop holds more than --objects)",
    )
    t.add_argument(
        "--small-area",
        type=int,
        default=180,
        metavar="PIXELS",
        help="area under which an object counts as small, in crop pixels at the model's scale",
    )
    t.add_argument("--no-hard-prompts", action="store_true")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--val-every", type=int, default=200)
    t.add_argument("--val-fields", type=int, default=6, help="validation fields used (the first N)")
    t.add_argument("--val-objects", type=int, default=15, help="objects per validation field")
    t.add_argument("--checkpoint-minutes", type=float, default=3.0)
    t.add_argument("--device", default="cpu", help="torch device to train on (e.g. cuda)")
    t.add_argument("--amp", action="store_true", help="bfloat16 autocast for the forward passes")
    t.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that make augmented crops ahead of each step (ground-truth training; distillation reads its stored views)",
    )
    t.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="time budget of a fresh run: --steps is replaced by the count that fits, measured after 25 steps",
    )
    for term, what in LOSS_TERMS.items():
        t.add_argument(f"--w-{term}", type=float, default=None, help=f"weight of the {what} (default: TrainConfig's)")
    t.set_defaults(func=cmd_distill)

    h = sub.add_parser("train-head", help="train the instance head (auto everything mode) on labelled images")
    h.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH[:WEIGHT]",
        help="a folder with images/ and labels/, or a 3D stack NAME_raw.tif with NAME_labels.tif "
        "beside it (sliced along every axis), with its share of the draws; repeatable",
    )
    h.add_argument(
        "--val",
        action="append",
        metavar="PATH",
        help="held-out folder or stack, reported separately; the best mean F1 is kept; repeatable",
    )
    h.add_argument("-o", "--out", required=True, help="run folder (views, checkpoints; resumes if present)")
    h.add_argument("--model", default="default", help="the (float) model whose frozen encoder feeds the head")
    h.add_argument("--views", type=int, default=2400, help="augmented views embedded once and stored")
    h.add_argument(
        "--z-step",
        type=float,
        default=1.0,
        help="z spacing over xy spacing of 3D stacks (their side views are stretched by it)",
    )
    h.add_argument("--steps", type=int, default=6000)
    h.add_argument("--batch", type=int, default=8)
    h.add_argument("--lr", type=float, default=2e-3)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--val-every", type=int, default=500)
    h.add_argument("--val-limit", type=int, default=30, help="images (or slices) per validation source")
    h.add_argument("--minutes", type=float, default=None, help="time budget: fewer steps when they would not fit")
    h.add_argument(
        "--init",
        default=None,
        metavar="MODEL",
        help="start from the instance head of this model (registry name or checkpoint) instead of at random",
    )
    h.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="the head's arithmetic while training (weights stay float32); auto: bfloat16 where the CPU "
        "runs it natively",
    )
    h.add_argument("--threads", type=int, default=2)
    h.set_defaults(func=cmd_train_head)

    q = sub.add_parser("quantize", help="post-training W8A8 quantization of a model")
    q.add_argument("model", help="registry name or checkpoint path of the float model")
    q.add_argument("images", help="folder of calibration images (labels in a sibling 'labels' folder, optional)")
    q.add_argument("-o", "--output", required=True, help="quantized checkpoint to write (.pt)")
    q.add_argument("--labels", default=None, help="folder of instance labels for prompt sampling")
    q.add_argument("--images-count", type=int, default=8, help="calibration images to use (default 8)")
    q.add_argument("--prompts", type=int, default=16, help="prompts per calibration image")
    q.add_argument(
        "--distance",
        choices=["l2", "hessian"],
        default="l2",
        help="scale-search distance: plain squared error of each layer's output (default; "
        "the better of the two on our nuclei, see README) or Hessian-guided",
    )
    q.add_argument(
        "--twin",
        choices=["auto", "all", "none"],
        default="auto",
        help="twin-uniform post-softmax/post-GELU quantizers: 'auto' (default) on the "
        "inputs of matrix products and transposed convolutions, which run simulated "
        "anyway; 'all' (the paper's scheme: linear layers and convolutions after a "
        "GELU then run simulated, not in int8 kernels); or 'none'",
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--threads", type=int, default=2)
    q.set_defaults(func=cmd_quantize)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .model import CheckpointError
    from .model.sam import COMPILE_ENV_VAR

    if getattr(args, "compile", False):
        # through the environment, so that every model this command loads (and Dask
        # workers it starts) compiles its encoder
        os.environ[COMPILE_ENV_VAR] = "1"

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        ValueError,
        KeyError,
        ConnectionError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
