"""One object through a 3D stack from the instance head: the clicked points seed a 3D
watershed over the head's maps of the slices around them, and the object is the region
grown from the clicks.

On confocal nuclei the head's maps, smoothed across slices, delimit an object in 3D far
better than prompting the mask decoder slice by slice (docs/benchmarks.md, 3D
propagation). The maps come from embeddings of the slices, computed on demand nearest
first through the predictor's embedding cache: a window of slices around the clicks
grows until the object ends ``Z_MARGIN`` slices inside it, so one nucleus costs the
slices it spans plus a few on each side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .annotate import is_embedded
from .everything import (
    Cancelled,
    denoised_rgb,
    recommended_thresholds,
    volume_instances,
)
from .instances import end_at_next_object, head_maps
from .predictor import SamPredictor

#: Slices of maps kept beyond each end of the object. On training stacks one slice gave
#: the same 3D IoU as three (0.6235 both, mean of 5 stacks) with 17 slices embedded per
#: object instead of 21 (docs/benchmarks.md).
Z_MARGIN = 1
#: Slices added to a side of the window when the object reaches its margin. One slice
#: gave the same 3D IoU as two on training stacks (0.6292 against 0.6298, mean of 5) with
#: 0.9 fewer slices embedded per object (docs/benchmarks.md).
Z_STEP = 1
#: Pixels of maps kept around the object in the image plane (besides its own size).
XY_MARGIN = 16
#: Half-width (voxels) of the seed put at a click that lands outside every object the
#: head finds: a user's click says that an object is there.
CLICK_SEED = 1


class HeadSlices:
    """The head's maps (3, H, W) of a stack's slices, computed when first asked for:
    each slice smoothed in its plane by ``denoise_sigma``, scaled by ``limits`` and
    embedded through the predictor (its embedding cache keeps them). Records the slices
    whose embeddings it computed (``embedded``) and every slice it read (``visited``);
    ``cancel()`` is checked before each slice and a True raises ``Cancelled``. With
    ``window`` (y0, y1, x0, x1; kept as ``part``) only that part of each slice is embedded
    (at the scale the model gives it), only that part's maps are kept, and the maps
    outside it are background."""

    def __init__(
        self,
        predictor: SamPredictor,
        stack,
        limits,
        denoise_sigma: float,
        cancel: Callable[[], bool] | None = None,
        window: tuple[int, int, int, int] | None = None,
    ) -> None:
        self.predictor, self.stack, self.limits, self.sigma = predictor, stack, limits, denoise_sigma
        self.cancel, self.part = cancel, window
        self._maps: dict[int, np.ndarray] = {}
        self.embedded: list[int] = []
        self.visited: list[int] = []

    def _part_maps(self, z: int) -> np.ndarray:
        """Maps (3, h, w) float16 of the part of slice ``z`` that is read (all of it
        without a window), computed on first use; only these are kept."""
        if z not in self._maps:
            if self.cancel is not None and self.cancel():
                raise Cancelled(f"cancelled before slice {z}")
            plane = np.asarray(self.stack[z])
            y0, y1, x0, x1 = self.part or (0, plane.shape[0], 0, plane.shape[1])
            rgb = denoised_rgb(plane[y0:y1, x0:x1], self.sigma, self.limits)
            maps = _background((y1 - y0, x1 - x0))  # a constant slice
            if rgb.min() != rgb.max():
                if not is_embedded(self.predictor, rgb):
                    self.embedded.append(z)
                self.predictor.set_image(rgb)
                maps[:] = head_maps(self.predictor.model, self.predictor._embedding)
            self._maps[z] = maps
            self.visited.append(z)
        return self._maps[z]

    def foreground(self, z: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The foreground map of the part of slice ``z`` that is read, (h, w) float32, and
        the part's origin (y, x) in the slice (the whole slice without a window)."""
        y0, _, x0, _ = self.part or (0, 0, 0, 0)
        return self._part_maps(z)[0].astype(np.float32), (y0, x0)

    def __getitem__(self, z: int) -> np.ndarray:
        """The maps (3, H, W) of slice ``z``; background outside the window."""
        return self.window(z, z, slice(None), slice(None), z)[:, 0]

    def window(self, lo: int, hi: int, ys: slice, xs: slice, around: int) -> np.ndarray:
        """Maps of slices lo..hi (inclusive) cropped to (ys, xs), (3, n, h, w) float32;
        slices are computed nearest to ``around`` first."""
        for z in sorted(range(lo, hi + 1), key=lambda v: (abs(v - around), v)):
            self._part_maps(z)
        h, w = self.stack.shape[1:3]
        y0, y1, x0, x1 = self.part or (0, h, 0, w)
        (a, b, _), (c, d, _) = ys.indices(h), xs.indices(w)
        out = _background((hi - lo + 1, b - a, d - c)).astype(np.float32)
        # the part of the window that the slices' read part covers
        iy0, iy1, ix0, ix1 = max(a, y0), min(b, y1), max(c, x0), min(d, x1)
        if iy0 < iy1 and ix0 < ix1:
            for i, z in enumerate(range(lo, hi + 1)):
                out[:, i, iy0 - a : iy1 - a, ix0 - c : ix1 - c] = self._maps[z][
                    :, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0
                ]
        return out


def _background(shape: tuple[int, ...]) -> np.ndarray:
    """Head maps (3, *shape) float16 of nothing: foreground 0, distances 1."""
    maps = np.ones((3, *shape), np.float16)
    maps[0] = 0.0
    return maps


def _grow_from_clicks(
    maps: np.ndarray, clicks: list[tuple[int, int, int]], params: dict
) -> tuple[np.ndarray, np.ndarray]:
    """The object of the clicks (z, y, x) in a window's maps (3, n, h, w): the union of
    the head's 3D instances under them; a click outside every instance seeds one more
    region, grown over the foreground against the others. Returns the mask and the
    extent maps' foreground probability."""
    from skimage.segmentation import watershed

    labels, extent = volume_instances(maps, params)
    ids = {int(labels[c]) for c in clicks} - {0}
    missed = [c for c in clicks if labels[c] == 0]
    if missed:
        seeds, new = labels.copy(), int(labels.max()) + 1
        r = CLICK_SEED
        for z, y, x in missed:
            seeds[max(z - r, 0) : z + r + 1, max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1] = new
        grown = watershed(extent[2], seeds, mask=(extent[0] > params["foreground_thresh"]) | (seeds > 0))
        labels = np.where(grown == new, new, labels)
        ids.add(new)
    return np.isin(labels, sorted(ids)), extent[0]


def _crop_around(
    fg: np.ndarray,
    clicks_yx: np.ndarray,
    thresh: float,
    shape: tuple[int, int] | None = None,
    origin: tuple[int, int] = (0, 0),
) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) around the clicks (y, x) and the foreground components under them,
    with their own size and ``XY_MARGIN`` pixels on each side, in a slice of ``shape``
    (default: ``fg``'s) whose foreground map is known on a part (``fg``, float32) at ``origin``."""
    h, w = fg.shape if shape is None else shape
    comp, _ = ndimage.label(fg > thresh)
    local = clicks_yx - np.asarray(origin)
    inside = ((local >= 0) & (local < fg.shape)).all(1)
    ids = {int(comp[y, x]) for y, x in local[inside]} - {0}
    ys, xs = np.nonzero(np.isin(comp, sorted(ids))) if ids else (np.zeros(0, int), np.zeros(0, int))
    ys = np.concatenate([ys + origin[0], clicks_yx[:, 0]])
    xs = np.concatenate([xs + origin[1], clicks_yx[:, 1]])
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    pad_y = max(y1 - y0, XY_MARGIN) + XY_MARGIN
    pad_x = max(x1 - x0, XY_MARGIN) + XY_MARGIN
    return max(0, y0 - pad_y), min(h, y1 + pad_y), max(0, x0 - pad_x), min(w, x1 + pad_x)


@dataclass
class HeadEstimate:
    """The object as known so far: its sections by slice (z -> (H, W) bool), the head's
    mean foreground probability inside each, and whether this is the result (``final``)
    or a preview from fewer slices."""

    sections: dict[int, np.ndarray]
    scores: dict[int, float]
    final: bool


def iter_head_object(
    predictor: SamPredictor,
    stack,
    clicks: Mapping[int, np.ndarray],
    slices: HeadSlices,
    *,
    z_range: tuple[int, int] | None = None,
    params: dict | None = None,
) -> Iterator[HeadEstimate]:
    """One object of a (Z, H, W) stack from positive clicks ``{z: (N, 2) (x, y)}``, by the
    instance head (see the module's docstring), over the maps of ``slices``; ``params``
    are the model's tuned 3D thresholds by default (``recommended_thresholds(model,
    "auto", volume=True)``; their ``denoise_sigma`` is the slices').
    Yields previews as the first slices come in (the clicked slices alone: one
    embedding for one click; then with the slice below, then the slice above), one
    estimate per larger window of slices, and the result last (``final``)."""
    model = predictor.model
    if not model.has_instance_head:
        raise ValueError("this model has no instance head; propagate with method='decoder'")
    params = dict(recommended_thresholds(model, "auto", volume=True) if params is None else params)
    params.pop("denoise_sigma", None)
    depth, h, w = stack.shape[:3]
    zmin, zmax = z_range if z_range is not None else (0, depth - 1)
    first, last = min(clicks), max(clicks)
    pts = {
        z: np.clip(np.round(np.asarray(p, np.float64).reshape(-1, 2)[:, ::-1]).astype(int), 0, [h - 1, w - 1])
        for z, p in clicks.items()
    }
    middle = (first + last) // 2
    fg, origin = slices.foreground(middle)
    ys0, ys1, xs0, xs1 = _crop_around(
        fg, np.concatenate(list(pts.values())), params["foreground_thresh"], (h, w), origin
    )

    def estimate(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        maps = slices.window(lo, hi, slice(ys0, ys1), slice(xs0, xs1), middle)
        local = [(z - lo, int(y) - ys0, int(x) - xs0) for z, p in pts.items() for y, x in p]
        obj, fg = _grow_from_clicks(maps, local, params)
        return end_at_next_object(obj, first - lo, last - lo), fg

    def sections(lo: int, obj: np.ndarray, fg: np.ndarray, final: bool) -> HeadEstimate:
        out, scores = {}, {}
        for i in np.flatnonzero(obj.reshape(len(obj), -1).any(1)):
            out[lo + int(i)] = plane = np.zeros((h, w), bool)
            plane[ys0:ys1, xs0:xs1] = obj[i]
            scores[lo + int(i)] = float(fg[i][obj[i]].mean())
        return HeadEstimate(out, scores, final)

    for lo, hi in dict.fromkeys(
        [(first, last), (max(zmin, first - 1), last), (max(zmin, first - 1), min(zmax, last + 1))]
    ):
        yield sections(lo, *estimate(lo, hi), final=False)
    lo, hi = max(zmin, first - Z_MARGIN - 1), min(zmax, last + Z_MARGIN + 1)
    while True:
        obj, fg = estimate(lo, hi)
        zs = np.flatnonzero(obj.any((1, 2)))
        ys, xs = np.nonzero(obj.any(0))
        grow_lo = lo > zmin and zs[0] - Z_MARGIN < 0
        grow_hi = hi < zmax and zs[-1] + Z_MARGIN > hi - lo
        # the object reaches the crop's edge in the plane: widen the crop there
        wide = [
            (ys0 > 0 and ys.min() == 0),
            (ys1 < h and ys.max() == ys1 - ys0 - 1),
            (xs0 > 0 and xs.min() == 0),
            (xs1 < w and xs.max() == xs1 - xs0 - 1),
        ]
        final = not (grow_lo or grow_hi or any(wide))
        yield sections(lo, obj, fg, final)
        if final:
            return
        lo = max(zmin, lo - Z_STEP) if grow_lo else lo
        hi = min(zmax, hi + Z_STEP) if grow_hi else hi
        pad_y, pad_x = ys1 - ys0, xs1 - xs0
        ys0, ys1 = (max(0, ys0 - pad_y) if wide[0] else ys0), (min(h, ys1 + pad_y) if wide[1] else ys1)
        xs0, xs1 = (max(0, xs0 - pad_x) if wide[2] else xs0), (min(w, xs1 + pad_x) if wide[3] else xs1)
