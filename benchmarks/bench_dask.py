"""Headless segmentation of a stack: single process vs a local Dask cluster, peak memory
of the client and the workers, and the cost of opening a matching embedding store.

The stack is made of 512x512 crops of BBBC039 val fields (a Zarr store in a temporary
folder). Workers run one thread each, the single process two: float sums then differ in
the last bits and a few borderline masks can flip, so besides bit identity the table
reports agreement (mean best-match IoU of the single-process objects, per slice).

    .venv/bin/python benchmarks/bench_dask.py [--slices 100] [--workers 2] [--points-per-side 32]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    args = ap.parse_args()
    import zarr

    from napari_tinysam.bench import print_table
    from napari_tinysam.distill.data import load_folder
    from napari_tinysam.distributed import connect, segment_volume_distributed
    from napari_tinysam.embedding_store import EmbeddingStore
    from napari_tinysam.everything import recommended_thresholds, segment_volume
    from napari_tinysam.metrics import best_match_iou
    from napari_tinysam.weights import load_model

    torch.set_num_threads(2)
    fields = load_folder(Path(args.data) / "bbbc039" / "val" / "images")
    s = args.size
    stack = np.stack([fields[z % len(fields)].image[:s, :s] for z in range(args.slices)])
    tmp = Path(tempfile.mkdtemp())
    src = zarr.open_array(str(tmp / "stack.zarr"), mode="w", shape=stack.shape, chunks=(1, s, s), dtype=stack.dtype)
    src[...] = stack
    model = load_model("default")
    params = {"points_per_side": args.points_per_side, **recommended_thresholds(model)}
    rows = []

    t0 = time.perf_counter()
    single = segment_volume(model, stack, **params)
    t_single = time.perf_counter() - t0
    rows.append({"run": "single process (2 threads)", "s/slice": f"{t_single / args.slices:.2f}",
                 "speedup": "1.00x", "peak MB": f"client {peak_rss_mb():.0f}"})

    client = connect(workers=args.workers)
    t0 = time.perf_counter()
    out = segment_volume_distributed("default", src, tmp / "labels.zarr", client, **params)
    t_dist = time.perf_counter() - t0
    worker_mb = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    dist = np.asarray(out[...])
    same = bool(np.array_equal(dist, single))
    agreement = np.mean([best_match_iou(single[z], dist[z]) for z in range(args.slices)])
    rows.append({"run": f"Dask LocalCluster, {args.workers} workers x 1 thread",
                 "s/slice": f"{t_dist / args.slices:.2f}", "speedup": f"{t_single / t_dist:.2f}x",
                 "peak MB": f"client {peak_rss_mb():.0f}; workers "
                            + ", ".join(f"{v:.0f}" for v in worker_mb.values()),
                 "labels identical": f"{same} (agreement {agreement:.3f})"})
    client.close()
    client.cluster.close()

    store = EmbeddingStore.open(tmp / "emb.zarr", model, stack, create=True)
    store.compute(model, stack)
    t0 = time.perf_counter()
    EmbeddingStore.open(tmp / "emb.zarr", model, stack)
    t_open = time.perf_counter() - t0
    rows.append({"run": f"open a matching embedding store ({args.slices} slices, signature check)",
                 "s/slice": "", "speedup": "", "peak MB": "", "labels identical": "",
                 "seconds": f"{t_open:.2f}"})
    print(f"stack {stack.shape} {stack.dtype}, points_per_side {args.points_per_side}, "
          f"thresholds {recommended_thresholds(model)}")
    print_table(rows, ["run", "s/slice", "speedup", "peak MB", "labels identical", "seconds"])


if __name__ == "__main__":
    main()
