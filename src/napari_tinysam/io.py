"""Reading and writing images: TIFF, PNG/JPEG, NumPy and Zarr."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into a NumPy array (TIFF, PNG, JPEG, .npy).

    Raises ``ValueError`` with the file name for unsupported or unreadable files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    try:
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
    raise ValueError(
        f"unsupported file type {suffix!r} for {path}; use TIFF, PNG, JPEG, .npy or Zarr"
    )
