"""Everything mode on stacks larger than one machine, on Dask.

Slices are tasks. Each worker loads the model once (by name or path) and writes its
slice's labels straight into the output Zarr (one chunk per slice), returning only a
count; the client never gathers the volume. A final pass over slice boundaries links
ids across slices (the rule of :func:`segment_volume` with ``per_slice=True``), reading
two slices at a time, so memory stays bounded by a few slices on every machine. (The 3D
instances that ``segment_volume`` builds from the head's maps by default need every
slice's maps in one place, which this bounded-memory path does not gather.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .everything import (
    check_volume,
    link_slice,
    segment_everything,
    slice_keywords,
    volume_contrast_limits,
)

_models: dict[tuple[str, str], object] = {}
_lock = threading.Lock()


def worker_model(name_or_path: str, precision: str = "auto"):
    """The model of this worker process, loaded on first use ("auto" precision is decided
    by each worker's own CPU)."""
    with _lock:
        model = _models.get((name_or_path, precision))
        if model is None:
            from .weights import load_model

            model = load_model(name_or_path, precision=precision)
            _models[(name_or_path, precision)] = model
        return model


def _segment_slice(z: int, plane, out_path: str, model_name: str, params: dict, limits,
                   precision: str = "auto") -> int:
    import torch
    import zarr

    torch.set_num_threads(int(os.environ.get("TINYSAM_WORKER_THREADS", "1")))
    labels = segment_everything(worker_model(model_name, precision), np.asarray(plane)[0], contrast_limits=limits, **params)
    zarr.open_array(out_path, mode="r+")[z] = labels
    return int(labels.max())


def connect(scheduler: str | None = None, workers: int | None = None, timeout: float = 10.0):
    """A dask.distributed Client: to ``scheduler`` (an address such as
    tcp://host:8786), or a LocalCluster with ``workers`` processes. Fails fast with a
    clear message when the scheduler does not answer."""
    from distributed import Client

    if scheduler:
        try:
            return Client(scheduler, timeout=f"{timeout}s")
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(
                f"the Dask scheduler at {scheduler} does not answer within {timeout:.0f} s ({exc}); "
                "check the address and that the scheduler is running"
            ) from exc
    # the client starts the LocalCluster itself, so that closing the client closes it (a
    # cluster passed in would outlive the client: worker processes and their IO threads
    # then stay alive until the interpreter's teardown)
    return Client(n_workers=workers or 2, threads_per_worker=1, processes=True, dashboard_address=None)


def segment_volume_distributed(
    model_name: str,
    stack,
    out_path: str | os.PathLike,
    client,
    mode: str | None = None,
    stitch: bool = True,
    stitch_iou: float = 0.5,
    contrast_limits: tuple[float, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    precision: str = "auto",
    **params,
):
    """Segment every slice of ``stack`` (NumPy, Zarr or dask array, (Z, H, W) or RGB) on
    the cluster behind ``client``; labels go to the Zarr array ``out_path``, which is
    returned (opened read-only). ``model_name`` is a registry name or a checkpoint path
    that the workers can read, loaded there at ``precision``."""
    import dask.array as da
    import zarr
    from distributed import as_completed

    shape = tuple(stack.shape)
    check_volume(shape)
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".zarr":
        raise ValueError(f"distributed output must be a Zarr store (.zarr), got {out_path}")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass --overwrite (overwrite=True) to replace it")
    if contrast_limits is None:  # the rule of segment_volume, reading a few slices only
        contrast_limits = volume_contrast_limits(stack)
    z, h, w = shape[:3]
    zarr.open_array(str(out_path), mode="w", shape=(z, h, w), chunks=(1, h, w), dtype="int32")
    params = slice_keywords({"mode": mode, **params})
    darr = stack if isinstance(stack, da.Array) else da.from_array(stack, chunks=(1, *shape[1:]))
    planes = darr.to_delayed().ravel()
    futures = [
        client.submit(_segment_slice, i, client.compute(planes[i]), str(out_path), model_name, params,
                      tuple(contrast_limits), precision, pure=False)
        for i in range(z)
    ]
    for done, fut in enumerate(as_completed(futures), 1):
        fut.result()  # re-raise a worker's error here
        if progress is not None:
            progress(done, z)
    out = zarr.open_array(str(out_path), mode="r+")
    previous, before, next_id = None, None, 1
    for i in range(z):  # the stitching pass: three slices in memory at a time
        labels, next_id = link_slice(previous, np.asarray(out[i]), next_id, stitch, stitch_iou, before)
        out[i] = labels
        previous, before = labels, previous
    return zarr.open_array(str(out_path), mode="r")
