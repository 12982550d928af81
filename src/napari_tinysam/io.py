"""Reading and writing images: TIFF, PNG/JPEG, NumPy and Zarr."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

READABLE = (".tif", ".tiff", ".npy", ".png", ".jpg", ".jpeg", ".bmp", ".zarr")
WRITABLE = (".tif", ".tiff", ".npy", ".zarr")


def open_zarr(path: str | os.PathLike):
    """Open a Zarr array, or the first-resolution array ``0`` of an OME-Zarr group."""
    import zarr

    node = zarr.open(str(path), mode="r")
    if hasattr(node, "shape"):
        return node
    for key in ("0", "s0"):
        if key in node:
            return node[key]
    arrays = [k for k in node if hasattr(node[k], "shape")]
    if not arrays:
        raise ValueError(f"{path} is a Zarr group without arrays")
    return node[arrays[0]]


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into a NumPy array (TIFF, PNG, JPEG, .npy, Zarr/OME-Zarr).

    Raises ``ValueError`` with the file name for unsupported or unreadable files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".zarr":
            return np.asarray(open_zarr(path)[...])
        if suffix in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in (".png", ".jpg", ".jpeg", ".bmp"):
            from PIL import Image

            with Image.open(path) as im:
                return np.asarray(im)
    except Exception as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    raise ValueError(f"unsupported file type {suffix!r} for {path}; use TIFF, PNG, JPEG, .npy or Zarr")


def read_voxel_size(path: str | os.PathLike) -> tuple[float, float, float] | None:
    """The voxel size (z, y, x) a 3D image file records, in its own unit: ImageJ TIFF
    (``spacing`` and the X/Y resolution tags), OME-TIFF (``PhysicalSizeZ/Y/X``) or
    OME-Zarr (the first dataset's ``scale`` transformation, its last three values). None
    when the file records none, or not for all three axes."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return _tiff_voxel_size(path)
        if path.suffix.lower() == ".zarr":
            return _ome_zarr_voxel_size(path)
    except Exception:  # metadata that cannot be read gives no voxel size; the pixels still load
        return None
    return None


#: Length units of OME metadata, in micrometres.
_UNITS_UM = {
    "nm": 1e-3,
    "nanometer": 1e-3,
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "micrometer": 1.0,
    "mm": 1e3,
    "millimeter": 1e3,
}


def _positive(values, units=("µm",) * 3) -> tuple[float, float, float] | None:
    """Three positive finite sizes in one unit (micrometres where units are given and
    known), else None."""
    factors = [_UNITS_UM.get(str(u).lower()) for u in units]
    if None in factors:
        return None
    out = tuple(float(v) * f for v, f in zip(values, factors))
    return out if len(out) == 3 and all(np.isfinite(v) and v > 0 for v in out) else None


def _tiff_voxel_size(path: Path) -> tuple[float, float, float] | None:
    import re

    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.is_ome and tif.ome_metadata:
            sizes = {k: re.search(rf'PhysicalSize{k}="([^"]+)"', tif.ome_metadata) for k in "ZYX"}
            units = {k: re.search(rf'PhysicalSize{k}Unit="([^"]+)"', tif.ome_metadata) for k in "ZYX"}
            if all(sizes.values()):
                return _positive(
                    [sizes[k].group(1) for k in "ZYX"], [units[k].group(1) if units[k] else "µm" for k in "ZYX"]
                )
        ij = tif.imagej_metadata or {}
        tags = tif.pages[0].tags
        if "spacing" in ij and "XResolution" in tags and "YResolution" in tags:
            (xn, xd), (yn, yd) = tags["XResolution"].value, tags["YResolution"].value
            if xn and yn:  # pixels per unit
                return _positive((ij["spacing"], yd / yn, xd / xn))
    return None


def _ome_zarr_voxel_size(path: Path) -> tuple[float, float, float] | None:
    import zarr

    node = zarr.open(str(path), mode="r")
    multiscales = node.attrs.get("multiscales") if not hasattr(node, "shape") else None
    if not multiscales:
        return None
    axes = multiscales[0].get("axes", [])
    units = [a.get("unit", "µm") if isinstance(a, dict) else "µm" for a in axes[-3:]] or ["µm"] * 3
    for t in multiscales[0]["datasets"][0].get("coordinateTransformations", []):
        if t.get("type") == "scale" and len(t.get("scale", [])) >= 3:
            return _positive(t["scale"][-3:], units if len(units) == 3 else ["µm"] * 3)
    return None


def write_labels(path: str | os.PathLike, labels: np.ndarray, overwrite: bool = False) -> Path:
    """Write an int32 label image to TIFF, .npy or Zarr (chosen by the suffix).

    Files are written under a temporary name and renamed, so a failed or interrupted
    write never leaves a partial output; an existing output is kept unless ``overwrite``.
    """
    import shutil

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITABLE:
        raise ValueError(f"cannot write labels to {path}: use a .tif, .npy or .zarr output")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"output folder {path.parent} is not writable")
    tmp = path.with_name(f".{path.name}.partial")
    labels = np.asarray(labels, dtype=np.int32)
    if suffix in (".tif", ".tiff"):
        import tifffile

        # one grey page per slice: without the photometric tag a stack of 3 or 4 slices is
        # written as one RGB(A) page, which Fiji and others open as a colour image
        tifffile.imwrite(
            tmp,
            labels,
            compression="zlib",
            photometric="minisblack",
            metadata={"axes": "ZYX"[-labels.ndim :]} if labels.ndim <= 3 else None,
        )
    elif suffix == ".npy":
        with open(tmp, "wb") as fh:
            np.save(fh, labels)
    else:
        import zarr

        chunks = (1, *labels.shape[1:]) if labels.ndim == 3 else labels.shape
        arr = zarr.open_array(str(tmp), mode="w", shape=labels.shape, chunks=chunks, dtype="int32")
        arr[...] = labels
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)
    return path
