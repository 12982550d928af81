"""Everything mode on stacks larger than one machine, on Dask.

Each worker loads the model once (by name or path); results go straight into Zarr
stores (one chunk per slice) and the client never gathers the volume, so memory stays
bounded by a few slices (or one block of slices) on every machine.

With a model that has an instance head (mode ``auto``, the default for it), the run is
that of :func:`~napari_tinysam.everything.segment_volume`: 3D instances from the head's
maps of all slices. Slices are tasks that write the head's maps to a temporary Zarr
store beside the output; blocks of ``block_depth`` slices, each read with ``halo``
slices of context on either side, are tasks that grow 3D instances and write those of
their own slices; objects that cross a block's border are joined by one-to-one matching
of the two blocks' views of the slices around it (IoU >= 0.5). A stack of at most
``block_depth`` slices is one block and gives ``segment_volume``'s labels exactly.

Other modes (or ``per_slice=True``) segment every slice on its own (slices are tasks) and
a final pass links ids across slices (the rule of ``segment_volume`` with
``per_slice=True``), reading two slices at a time.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .everything import (
    _place_tile,
    _tile_starts,
    check_volume,
    default_mode,
    link_slice,
    segment_everything,
    slice_keywords,
    volume_contrast_limits,
    volume_from_maps,
    volume_head_maps,
    volume_params,
    volume_tiles,
)
from .instances import keep_objects
from .masks import overlap_iou
from .predictor import SamPredictor

#: Slices of each block of the 3D path (its own slices, written by it) and the least
#: context read on either side of it; the context is at least twice the reach of the
#: smoothing across slices (a Gaussian reaches 4 sigma).
BLOCK_DEPTH = 32
MIN_HALO = 16
#: Slices on either side of a block border on which the two blocks' objects are matched.
MATCH_DEPTH = 4
#: IoU there at which an object of one block and one of the next are the same object.
MATCH_IOU = 0.5

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


def _worker_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("TINYSAM_WORKER_THREADS", "1")))


def _segment_slice(z: int, plane, out_path: str, model_name: str, params: dict, limits, precision: str = "auto") -> int:
    import zarr

    _worker_threads()
    labels = segment_everything(
        worker_model(model_name, precision), np.asarray(plane)[0], contrast_limits=limits, **params
    )
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
    per_slice: bool = False,
    scale=None,
    block_depth: int = BLOCK_DEPTH,
    halo: int | None = None,
    **params,
):
    """Everything mode on ``stack`` (NumPy, Zarr or dask array, (Z, H, W) or RGB) on the
    cluster behind ``client``; labels go to the Zarr array ``out_path``, which is returned
    (opened read-only). ``model_name`` is a registry name or a checkpoint path that the
    workers (and the client, which reads the model's settings) can read, loaded there at
    ``precision``.

    Mode ``auto`` (the default for models with an instance head) builds 3D instances as
    :func:`~napari_tinysam.everything.segment_volume` does (``scale`` and its keywords
    alike), in blocks of ``block_depth`` slices each read with ``halo`` slices of context
    on either side (None: at least :data:`MIN_HALO`, more for wide smoothing across
    slices); the head's maps live in a temporary Zarr store (float16, 3 x the stack's
    voxels x 2 bytes). Everything is written into a temporary folder beside ``out_path``
    (which the workers must be able to write) and the labels are moved to ``out_path``
    when complete. Other modes, or ``per_slice=True``, segment slice by slice and link
    objects across slices (``stitch``, ``stitch_iou``). ``progress(done, total)`` is
    called after each task."""
    shape = tuple(stack.shape)
    check_volume(shape)
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".zarr":
        raise ValueError(f"distributed output must be a Zarr store (.zarr), got {out_path}")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass --overwrite (overwrite=True) to replace it")
    auto = not per_slice and (mode or default_mode(worker_model(model_name, precision))) == "auto"
    # everything is written into a temporary folder beside the output and moved into place
    # when complete: a failed or interrupted run leaves no partial labels (nor removes old ones)
    work = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        if auto:
            _distributed_tiles(
                model_name, stack, work, client, contrast_limits, progress, precision, scale, block_depth, halo, params
            )
        else:
            _distributed_slices(
                model_name, stack, work, client, mode, stitch, stitch_iou, contrast_limits, progress, precision, params
            )
        if out_path.exists():
            shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
        os.replace(work / "labels.zarr", out_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return zarr_array(out_path, "r")


def _distributed_slices(
    model_name, stack, work: Path, client, mode, stitch, stitch_iou, contrast_limits, progress, precision, params
) -> None:
    if contrast_limits is None:  # the rule of segment_volume, reading a few slices only
        contrast_limits = volume_contrast_limits(stack)
    z, h, w = stack.shape[:3]
    out_path = work / "labels.zarr"
    _new_labels(out_path, (z, h, w))
    params = slice_keywords({"mode": mode, **params})
    futures = [
        client.submit(
            _segment_slice, i, plane, str(out_path), model_name, params, tuple(contrast_limits), precision, pure=False
        )
        for i, plane in enumerate(_planes(client, stack))
    ]
    _wait(futures, progress, z)
    out = zarr_array(out_path, "r+")
    previous, before, next_id = None, None, 1
    for i in range(z):  # the stitching pass: three slices in memory at a time
        labels, next_id = link_slice(previous, np.asarray(out[i]), next_id, stitch, stitch_iou, before)
        out[i] = labels
        previous, before = labels, previous


def zarr_array(path, mode: str):
    import zarr

    return zarr.open_array(str(path), mode=mode)


def _new_labels(path: Path, shape: tuple[int, int, int]):
    import zarr

    return zarr.open_array(str(path), mode="w", shape=shape, chunks=(1, *shape[1:]), dtype="int32")


def _planes(client, stack) -> list:
    """One future per slice of ``stack``, each holding that slice (1, H, W[, C])."""
    import dask.array as da

    one = (1, *stack.shape[1:])  # a task per slice, however the data is chunked
    darr = stack.rechunk(one) if isinstance(stack, da.Array) else da.from_array(stack, chunks=one)
    return [client.compute(p) for p in darr.to_delayed().ravel()]


def _wait(futures: list, progress, total: int, done: int = 0) -> list:
    """The results of ``futures`` (a worker's error is raised here), ``progress`` after
    each of them as (done + finished, total)."""
    from distributed import as_completed

    for count, fut in enumerate(as_completed(futures), done + 1):
        fut.result()
        if progress is not None:
            progress(count, total)
    return [f.result() for f in futures]


def plan_blocks(depth: int, block_depth: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Blocks of a stack of ``depth`` slices: (z0, z1, e0, e1), the block's own slices
    [z0, z1) and the slices it reads [e0, e1) (``halo`` more on either side, within the
    stack). The last block takes a remainder under half a block."""
    starts = list(range(0, depth, block_depth))
    if len(starts) > 1 and depth - starts[-1] < block_depth / 2:
        starts.pop()
    ends = starts[1:] + [depth]
    return [(z0, z1, max(0, z0 - halo), min(depth, z1 + halo)) for z0, z1 in zip(starts, ends)]


def _slice_maps(z: int, plane, maps_path: str, model_name: str, limits, sigma: float, precision: str) -> None:
    _worker_threads()
    predictor = SamPredictor(worker_model(model_name, precision))
    zarr_array(maps_path, "r+")[:, z : z + 1] = volume_head_maps(
        predictor, np.asarray(plane), limits, denoise_sigma=sigma
    )


def _block_labels(
    block: tuple[int, int, int, int], maps_path: str, out_path: str, side_path: str, params: dict, match: int
) -> int:
    """3D instances of one block from the maps of the slices it reads; writes those of its
    own slices (ids 1..n, the objects with a voxel there) to the output and its view of
    the ``match`` slices beyond each of its borders to the side store; returns n."""
    z0, z1, e0, e1 = block
    labels = volume_from_maps(np.asarray(zarr_array(maps_path, "r")[:, e0:e1]), **params)
    own = labels[z0 - e0 : z1 - e0]
    keep = np.zeros(int(labels.max()) + 1, bool)
    keep[np.unique(own)] = True
    labels = keep_objects(labels, keep)
    zarr_array(out_path, "r+")[z0:z1] = labels[z0 - e0 : z1 - e0]
    side = zarr_array(side_path, "r+")
    if z0 > e0:
        side[z0 - match : z0] = labels[z0 - match - e0 : z0 - e0]
    if e1 > z1:
        side[z1 : z1 + match] = labels[z1 - e0 : z1 + match - e0]
    return int(keep.sum()) - int(keep[0])


def _relabel(z0: int, z1: int, out_path: str, lut: np.ndarray) -> None:
    out = zarr_array(out_path, "r+")
    out[z0:z1] = lut[np.asarray(out[z0:z1])]


def border_matches(below: np.ndarray, above: np.ndarray, min_iou: float = MATCH_IOU) -> list[tuple[int, int]]:
    """Pairs (id below, id above) of the same object seen by two blocks: ``below`` and
    ``above`` are the two blocks' labels of the same slices around their border; one to
    one (Hungarian on IoU), IoU >= ``min_iou``."""
    from scipy.optimize import linear_sum_assignment

    ids_b, ids_a, iou = overlap_iou(below, above)
    if not iou.size:
        return []
    rows, cols = linear_sum_assignment(-iou)
    return [(int(ids_b[r]), int(ids_a[c])) for r, c in zip(rows, cols) if iou[r, c] >= min_iou]


def join_blocks(counts: list[int], matches: list[list[tuple[int, int]]]) -> list[np.ndarray]:
    """Volume-wide ids: one look-up table per block (its ids 1..counts[b] -> ids 1..N),
    an object matched across a border (``matches[b]``: pairs of ids of blocks b and b+1)
    keeping one id through every block it crosses."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    parent = np.arange(int(offsets[-1]) + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for b, pairs in enumerate(matches):
        for lo, hi in pairs:
            ra, rb = root(int(offsets[b] + lo)), root(int(offsets[b + 1] + hi))
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(len(parent))])
    _, final = np.unique(roots, return_inverse=True)  # background (0) stays 0; the rest 1..N in order
    return [
        np.concatenate([[0], final[offsets[b] + 1 : offsets[b] + n + 1]]).astype(np.int32) for b, n in enumerate(counts)
    ]


def _distributed_tiles(
    model_name, stack, work: Path, client, contrast_limits, progress, precision, scale, block_depth, halo, kwargs
) -> None:
    """The 3D path, tiled in the plane where ``segment_volume`` tiles the stack (slices
    larger than the model's input with objects too small at the whole-slice scale,
    :func:`~napari_tinysam.everything.volume_tiles`): each tile (with its halo, through
    every slice) is a run of :func:`_distributed_auto`, and its objects are placed as
    ``segment_volume`` places them, in the client one tile at a time."""
    import dask.array as da

    if kwargs.get("tile_shape") is not None:
        raise ValueError(
            "tile_shape is not available on Dask: slices are tiled as segment_volume tiles them "
            "when their objects are small (halo here is the context in slices between blocks)"
        )
    model = worker_model(model_name, precision)
    sigma = volume_params(model, kwargs, scale)["denoise_sigma"]
    limits = contrast_limits or volume_contrast_limits(stack, denoise_sigma=sigma)
    tiles = volume_tiles(SamPredictor(model), stack, limits, sigma)
    if tiles is None:
        _distributed_auto(
            model_name, stack, work, client, limits, progress, precision, scale, block_depth, halo, kwargs
        )
        return
    lazy = stack if isinstance(stack, da.Array) else da.from_array(stack, chunks=(1, *stack.shape[1:]))
    starts = _tile_starts(stack.shape[1:3], *tiles)
    out = _new_labels(work / "labels.zarr", stack.shape[:3])
    next_id = 1
    for k, ((y, x), (y0, x0, y1, x1)) in enumerate(starts):
        part = work / f"tile{k}"
        part.mkdir()
        step = None if progress is None else (lambda d, t, k=k: progress(k * t + d, len(starts) * t))
        _distributed_auto(
            model_name, lazy[:, y0:y1, x0:x1], part, client, limits, step, precision, scale, block_depth, halo, kwargs
        )
        region = np.asarray(out[:, y0:y1, x0:x1])
        next_id = _place_tile(
            region, np.asarray(zarr_array(part / "labels.zarr", "r")[...]), (0, 0), (y - y0, x - x0, *tiles[0]), next_id
        )
        out[:, y0:y1, x0:x1] = region
        shutil.rmtree(part)
    # ids of objects that lost every pixel to earlier tiles' objects are dropped: 1..N, slice by slice
    counts = np.zeros(next_id, np.int64)
    for i in range(out.shape[0]):
        counts += np.bincount(np.asarray(out[i]).ravel(), minlength=next_id)
    for i in range(out.shape[0]):
        out[i] = keep_objects(np.asarray(out[i]), counts > 0)


def _distributed_auto(
    model_name, stack, work: Path, client, contrast_limits, progress, precision, scale, block_depth, halo, kwargs
) -> None:
    import zarr

    params = volume_params(worker_model(model_name, precision), kwargs, scale)
    sigma = params.pop("denoise_sigma")
    reach = max(params["z_sigma"], params["extent_z_sigma"])
    halo = max(MIN_HALO, 2 * math.ceil(4 * reach)) if halo is None else int(halo)
    if int(block_depth) < 1 or halo < 0:
        raise ValueError(f"block_depth must be >= 1 and halo >= 0, got {block_depth} and {halo}")
    limits = contrast_limits or volume_contrast_limits(stack, denoise_sigma=sigma)
    z, h, w = stack.shape[:3]
    blocks = plan_blocks(z, int(block_depth), halo)
    match = max(1, min(MATCH_DEPTH, halo, min(b[1] - b[0] for b in blocks) // 2))
    total = z + 2 * len(blocks)
    out_path, maps_path, side_path = work / "labels.zarr", str(work / "maps.zarr"), str(work / "side.zarr")
    zarr.open_array(maps_path, mode="w", shape=(3, z, h, w), chunks=(3, 1, h, w), dtype="float16")
    zarr.open_array(side_path, mode="w", shape=(z, h, w), chunks=(1, h, w), dtype="int32")
    _new_labels(out_path, (z, h, w))
    futures = [
        client.submit(_slice_maps, i, plane, maps_path, model_name, tuple(limits), sigma, precision, pure=False)
        for i, plane in enumerate(_planes(client, stack))
    ]
    _wait(futures, progress, total)
    futures = [
        client.submit(_block_labels, b, maps_path, str(out_path), side_path, params, match, pure=False) for b in blocks
    ]
    counts = _wait(futures, progress, total, z)
    out, side = zarr_array(out_path, "r"), zarr_array(side_path, "r")
    matches = []
    for _, z1, _, _ in blocks[:-1]:
        lo, hi = slice(z1 - match, z1), slice(z1, z1 + match)
        below = np.concatenate([out[lo], side[hi]])  # the lower block's view
        above = np.concatenate([side[lo], out[hi]])  # the upper block's view
        matches.append(border_matches(below, above))
    luts = join_blocks(counts, matches)
    futures = [
        client.submit(_relabel, z0, z1, str(out_path), lut, pure=False) for (z0, z1, _, _), lut in zip(blocks, luts)
    ]
    _wait(futures, progress, total, z + len(blocks))
