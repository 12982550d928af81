"""Headless everything-mode on files: expand inputs, segment 2D/3D/RGB data, write label
images next to nothing else, report a summary. Used by ``napari-tinysam segment``."""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .everything import check_volume, segment_everything, segment_volume
from .io import READABLE, WRITABLE, open_zarr, read_image, read_voxel_size, write_labels
from .model import Sam


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files, folders (their readable files, sorted) and glob patterns -> file list."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and p.suffix.lower() != ".zarr":
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in READABLE)
            if not found:
                raise FileNotFoundError(f"no readable images ({', '.join(READABLE)}) in folder {p}")
            out += found
        elif p.exists():
            out.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"no such file, folder or pattern: {item}")
            out += matches
    for p in out:
        if p.suffix.lower() not in READABLE:
            raise ValueError(f"unsupported file type {p.suffix!r} for {p}; readable: {', '.join(READABLE)}")
    return out


def output_paths(inputs: list[Path], output: str) -> list[Path]:
    """One output per input. A single input may name its output file; otherwise
    ``output`` is a folder and outputs are ``<stem>_labels.tif``."""
    out = Path(output)
    if len(inputs) == 1 and out.suffix.lower() in WRITABLE:
        return [out]
    if out.suffix.lower() in WRITABLE:
        raise ValueError(f"{len(inputs)} inputs need an output folder, not the file {out}")
    if not out.is_dir():
        if len(inputs) == 1 and out.suffix:
            raise ValueError(f"cannot write labels to {out}: name a {', '.join(WRITABLE)} file, or a folder")
        if out.exists():
            raise ValueError(f"cannot write labels into {out}: it is a file, not a folder")
        if not out.parent.is_dir():
            raise FileNotFoundError(
                f"output folder {out} does not exist and cannot be made (is {out.parent} an existing folder?)"
            )
    return [out / f"{p.stem}_labels.tif" for p in inputs]


@contextmanager
def output_folders(outputs: list[Path]):
    """Create the folder that ``outputs`` go into when it is new (its parent exists:
    :func:`output_paths` checked that), as ``mkdir`` does; enter it once the run's
    arguments have all been checked. A folder made here that is still empty when the
    run fails (an unreadable input, a model that does not load) is removed again, so a
    failed run leaves nothing behind."""
    made = []
    for folder in sorted({p.parent for p in outputs}):
        if not folder.exists():
            folder.mkdir()
            made.append(folder)
    try:
        yield
    except BaseException:
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def select_index(data: np.ndarray, index: tuple[int, ...] | None) -> np.ndarray:
    """Apply leading indices (e.g. a time point) to data with more than 3 spatial axes,
    then drop axes of one element that hold no choice: a trailing channel axis (H, W, 1)
    and leading ones beyond three axes (an OME file's T and C of one, (1, 1, Z, Y, X))."""
    if index:
        data = data[tuple(index)]
    if data.ndim >= 3 and data.shape[-1] == 1:
        data = data[..., 0]
    while data.ndim > 3 and data.shape[0] == 1 and not (data.ndim == 4 and data.shape[-1] in (3, 4)):
        data = data[0]
    rgb = data.ndim >= 3 and data.shape[-1] in (3, 4)
    spatial = data.ndim - (1 if rgb else 0)
    if spatial > 3:
        raise ValueError(
            f"data of shape {data.shape} has {spatial} spatial axes; choose a 2D or 3D part "
            "with --index (e.g. --index 0 for the first time point)"
        )
    return data


class UnreadableInput(ValueError):
    """One input of a batch cannot be read or has no 2D / 3D part to segment; the run
    goes on with the other inputs."""


def read_input(path: Path, index: tuple[int, ...] | None = None, lazy: bool = False):
    """The 2D or 3D data of one input (after ``index``); a Zarr store stays on disk with
    ``lazy`` (a dask array over it when a part of it is chosen). Raises
    :class:`UnreadableInput` naming the file."""
    try:
        if lazy and path.suffix.lower() == ".zarr":
            data = open_zarr(path)
            if data.ndim > 3 or index:  # indexing a Zarr array would read it whole
                import dask.array as da

                data = da.from_zarr(data)
        else:
            data = read_image(path)
        return select_index(data, index)
    except (ValueError, OSError) as exc:
        message = str(exc) if str(path.name) in str(exc) else f"{path}: {exc}"
        raise UnreadableInput(message) from exc


@dataclass
class Result:
    input: Path
    output: Path
    shape: tuple[int, ...]
    objects: int
    seconds: float
    slices: int
    voxel_size: tuple[float, float, float] | None = None


def segment_file(
    model: Sam,
    path: Path,
    out: Path,
    overwrite: bool = False,
    index: tuple[int, ...] | None = None,
    progress: Callable[[int, int], None] | None = None,
    **kwargs,
) -> Result:
    """Everything mode on one file; writes ``out``. 2D images with
    :func:`segment_everything` (``progress`` per tile), 3D stacks with
    :func:`segment_volume` (``progress`` per slice; ``stitch`` for the per-slice modes;
    ``scale``, the voxel size (z, y, x), by default the one the file records
    (:func:`~napari_tinysam.io.read_voxel_size`), else none)."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    data = read_input(path, index)
    t0 = time.perf_counter()
    rgb = data.ndim >= 3 and data.shape[-1] in (3, 4)
    if data.ndim == 2 or (data.ndim == 3 and rgb):
        labels = segment_everything(
            model, data, progress=progress, **{k: v for k, v in kwargs.items() if k not in ("stitch", "scale")}
        )
        slices = 1
    else:
        check_volume(data)
        if kwargs.get("scale") is None:
            kwargs = {**kwargs, "scale": read_voxel_size(path)}
        labels = segment_volume(model, data, progress=progress, **kwargs)
        slices = data.shape[0]
    seconds = time.perf_counter() - t0
    write_labels(out, labels, overwrite=overwrite)
    objects = len(np.unique(labels)) - 1
    return Result(path, out, tuple(labels.shape), objects, seconds, slices, kwargs.get("scale"))


def check_output_folder(path: Path) -> None:
    """The folder ``path`` goes into exists and is writable, or is a new folder (to be
    made by :func:`output_folders`) in a writable one."""
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        if not folder.parent.is_dir():
            raise FileNotFoundError(f"output folder {folder} does not exist; create it first")
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"output folder {folder} is not writable")
