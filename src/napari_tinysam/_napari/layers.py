"""Layer <-> prompt conversion: world and data coordinates, slices, points and boxes.

Coordinates go data (prompt layer) -> world -> data (image layer), so layer scale and
translate are respected. The last two axes of the image are the segmented plane; the
leading axes (z, time, ...) select the slice.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..annotate import Prompts


def image_ndim(layer) -> int:
    """Spatial dimensionality of an image layer (RGB's channel axis excluded)."""
    return layer.data.ndim - (1 if getattr(layer, "rgb", False) else 0)


#: The largest image plane (pixels) the widgets read at once: beyond it (a whole-slide
#: image, say) a crop is needed, or the command line's tiled, distributed run.
MAX_PLANE_PIXELS = 2**27


def image_data(layer):
    """The image layer's array; for a multiscale image its full-resolution level, whose
    data coordinates are the layer's. A plane larger than :data:`MAX_PLANE_PIXELS` raises
    ``ValueError`` with what to do."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    nd = image_ndim(layer)
    h, w = data.shape[nd - 2 : nd]
    if h * w > MAX_PLANE_PIXELS:
        raise ValueError(
            f"image layer {layer.name!r} has planes of {h} x {w} pixels, too large to read at once; open a "
            "crop of it as a new image layer, or segment it with the command line "
            "(napari-tinysam segment IN -o OUT, tiled, on Dask with --workers)"
        )
    return data


def voxel_size(image) -> tuple[float, float, float] | None:
    """The (z, y, x) voxel size of a stack's image layer from its ``scale`` (the last three
    spatial axes); None for 2D images and for napari's default scale of 1 on every axis
    (the voxel size unknown)."""
    if image_ndim(image) < 3:
        return None
    scale = tuple(float(v) for v in image.scale[-3:])
    return None if np.allclose(scale, 1.0) else scale


def to_image_coords(prompt_layer, image_layer, coords: np.ndarray) -> np.ndarray:
    """(N, D) prompt-layer data coordinates -> (N, D) image-layer data coordinates."""
    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) == 0:
        return coords.reshape(0, image_ndim(image_layer))
    world = np.array([prompt_layer.data_to_world(c) for c in coords])
    return np.array([image_layer.world_to_data(w) for w in world])


def slice_of(coords: np.ndarray) -> tuple[int, ...]:
    """The slice index (leading axes) of one point in image data coordinates."""
    return tuple(int(np.round(v)) for v in coords[:-2])


def check_slice(index: tuple[int, ...], shape: tuple[int, ...]) -> None:
    for axis, (i, n) in enumerate(zip(index, shape)):
        if not 0 <= i < n:
            raise ValueError(
                f"the prompt lies on index {i} of axis {axis}, outside the image (0..{n - 1}); move it onto the image"
            )


def prompts_on_slice(
    points: np.ndarray, positive: np.ndarray, boxes: list[np.ndarray], index: tuple[int, ...]
) -> Prompts:
    """Collect the prompts of one slice.

    points: (N, D) image data coordinates with ``positive`` (N,) bool; boxes: list of
    (4, D) rectangle vertices in image data coordinates. The last rectangle drawn on the
    slice is the box prompt. Returns pixel coordinates (x = last axis, y = second last).
    """
    sel = [i for i, p in enumerate(points) if slice_of(p) == index]
    pts = points[sel][:, [-1, -2]] if sel else np.zeros((0, 2))
    labels = positive[sel].astype(np.int64) if sel else np.zeros((0,), np.int64)
    box = None
    for verts in boxes:
        if slice_of(verts.mean(0)) == index:
            ys, xs = verts[:, -2], verts[:, -1]
            box = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
    return Prompts(pts, labels, box)


def record_in_history(layer, changes) -> None:
    """Make changes already written into a Labels layer's array one step of napari's undo
    history of that layer (``Ctrl-Z`` in the layer reverts them, ``Ctrl-Shift-Z`` redoes
    them, as for a brush stroke), then refresh it. ``changes``: (index, (y0, x0), old, new)
    patches of the slice at ``index`` in the order they were written. The changed pixels
    are put back and written again, patch by patch, through ``Labels.data_setitem``, which
    keeps the history and emits the layer's paint event."""
    data = layer.data
    for index, (y0, x0), old, new in reversed(changes):
        diff = old != new
        data[index][y0 : y0 + old.shape[0], x0 : x0 + old.shape[1]][diff] = old[diff]
    with getattr(layer, "block_history", contextlib.nullcontext)():
        for index, (y0, x0), old, new in changes:
            ys, xs = np.nonzero(old != new)
            if len(ys):
                where = (*(np.full(len(ys), i) for i in index), ys + y0, xs + x0)
                layer.data_setitem(where, new[ys, xs], refresh=False)
    layer.refresh()
