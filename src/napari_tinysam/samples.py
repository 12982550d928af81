"""Bundled sample data (see ``data/ATTRIBUTION.md``), usable without napari."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import read_image

DATA_DIR = Path(__file__).parent / "data"


def nuclei_2d() -> np.ndarray:
    """A 520x696 uint16 BBBC039 fluorescence field of U2OS nuclei (CC0)."""
    return read_image(DATA_DIR / "bbbc039_IXMtest_A09_s1.tif")


def nuclei_2d_labels() -> np.ndarray:
    """Instance labels of :func:`nuclei_2d` (0 = background)."""
    return read_image(DATA_DIR / "bbbc039_IXMtest_A09_s1_labels.tif").astype(np.int32)


def nuclei_3d() -> np.ndarray:
    """A 31x61x57 uint16 synthetic 3D nuclei stack (StarDist, BSD-3-Clause)."""
    return read_image(DATA_DIR / "nuclei3d_synthetic.tif")
