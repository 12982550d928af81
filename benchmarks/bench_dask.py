"""Headless segmentation of 3D stacks: one process against a local Dask cluster, with the
quality of both (3D F1@0.5 against the true instances), whether Dask gives the same
objects, the time per slice (medians of ``--repeats`` runs) and peak memory of the client
and the workers; and the cost of opening a matching embedding store.

The stacks: the real GoNuclear confocal crops 1135 / 1136 (100 slices, three blocks of
the Dask run) and a deep noisy stand-in built from a BBBC039 val field (96 x 256 x 256,
nuclei growing and shrinking through z, noise and blur; benchmarks/volumes.py), each read
from a Zarr store in a temporary folder; ``--volumes large`` a stand-in whose 1024x1024
slices (a 2x2 mosaic of BBBC039 val fields) are tiled in the plane. Workers run one thread each, the single process
two. ``--per-slice`` adds a Dask run that segments every slice on its own and links the
objects across slices (``per_slice=True``, what Dask did before 3D blocks).

    .venv/bin/python benchmarks/bench_dask.py [--workers 2] [--repeats 3] [--per-slice]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from volumes import gonuclear, mosaics, noisy_stack  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def volumes(data: Path, which: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from napari_tinysam.distill.data import load_folder

    out = []
    if "gonuclear" in which:
        out += [(f"GoNuclear {name}", img, lab) for name, img, lab in gonuclear(data) if name in ("1135", "1136")]
    if "stand-in" in which:
        field = load_folder(data / "bbbc039" / "val" / "images")[0]
        img, lab = noisy_stack(field.image, field.labels, depth=96, size=256, seed=0)
        out.append(("noisy stand-in (BBBC039 val 0, 96 slices)", img, lab))
    if "large" in which:  # slices larger than the model's input, tiled in the plane
        fields = load_folder(data / "bbbc039" / "val" / "images", limit=4)
        (img, lab), *_ = mosaics(fields, 2)
        img, lab = noisy_stack(img, lab, depth=40, size=1024, seed=0)
        out.append(("noisy stand-in, 1024x1024 slices (2x2 BBBC039 val fields, 40 slices)", img, lab))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--volumes", default="gonuclear,stand-in", help="comma-separated: gonuclear, stand-in, large")
    ap.add_argument("--per-slice", action="store_true", help="also the Dask run that segments slice by slice")
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    args = ap.parse_args()
    import zarr

    from napari_tinysam.bench import cpu_name, print_table
    from napari_tinysam.distributed import BLOCK_DEPTH, connect, segment_volume_distributed
    from napari_tinysam.embedding_store import EmbeddingStore
    from napari_tinysam.everything import segment_volume
    from napari_tinysam.metrics import best_match_iou, match_instances
    from napari_tinysam.weights import load_model

    torch.set_num_threads(2)
    model = load_model("default")
    tmp = Path(tempfile.mkdtemp())
    client = connect(workers=args.workers)
    rows = []
    stacks = volumes(Path(args.data), args.volumes.split(","))
    for name, stack, truth in stacks:
        src = zarr.open_array(
            str(tmp / "stack.zarr"), mode="w", shape=stack.shape, chunks=(1, *stack.shape[1:]), dtype=stack.dtype
        )
        src[...] = stack
        z = stack.shape[0]
        times, single = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            single = segment_volume(model, stack)
            times.append(time.perf_counter() - t0)
        t_single = float(np.median(times))
        f1 = match_instances(single, truth)["f1"]
        rows.append(
            {
                "stack": name,
                "run": "one process, 2 threads",
                "s/slice": f"{t_single / z:.2f}",
                "speedup": "1.00x",
                "3D F1@0.5": f"{f1:.3f}",
                "objects": int(single.max()),
                "peak MB": f"client {peak_rss_mb():.0f}",
            }
        )
        runs = [("Dask, 3D blocks", {}, args.repeats)]
        if args.per_slice:
            runs.append(("Dask, slice by slice (per_slice=True)", {"per_slice": True}, 1))
        for label, extra, repeats in runs:
            times = []
            for r in range(repeats):
                t0 = time.perf_counter()
                out = segment_volume_distributed(
                    "default", src, tmp / f"labels{r}.zarr", client, overwrite=True, **extra
                )
                times.append(time.perf_counter() - t0)
            dist = np.asarray(out[...])
            workers_mb = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            pairs = np.unique(np.stack([single.ravel(), dist.ravel()]), axis=1)
            same = len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
            rows.append(
                {
                    "stack": name,
                    "run": f"{label}, {args.workers} workers x 1 thread",
                    "s/slice": f"{np.median(times) / z:.2f}",
                    "speedup": f"{t_single / np.median(times):.2f}x",
                    "3D F1@0.5": f"{match_instances(dist, truth)['f1']:.3f}",
                    "objects": int(dist.max()),
                    "same objects as one process": f"{same} (agreement {best_match_iou(single, dist):.3f})",
                    "peak MB": "workers " + ", ".join(f"{v:.0f}" for v in workers_mb.values()),
                }
            )
            print(rows[-1], flush=True)
    client.close()

    name, stack, _ = stacks[0]
    store = EmbeddingStore.open(tmp / "emb.zarr", model, stack, create=True)
    store.compute(model, stack)
    t0 = time.perf_counter()
    EmbeddingStore.open(tmp / "emb.zarr", model, stack)
    rows.append(
        {
            "stack": name,
            "run": "open a matching embedding store (signature check)",
            "seconds": f"{time.perf_counter() - t0:.2f}",
        }
    )
    print(
        f"CPU: {cpu_name()}; model 'default' at precision {model.arithmetic}; Dask blocks of {BLOCK_DEPTH} slices; "
        f"medians of {args.repeats} runs"
    )
    print_table(
        rows,
        [
            "stack",
            "run",
            "s/slice",
            "speedup",
            "3D F1@0.5",
            "objects",
            "same objects as one process",
            "peak MB",
            "seconds",
        ],
    )


if __name__ == "__main__":
    main()
