"""One object through a 3D stack from prompts on one slice (or a few), by one of two
methods:

- ``"decoder"``: slice by slice up and down, each slice prompted by the result of the
  slice next to it, until the object ends. Only the slices the propagation reaches are
  embedded, nearest first, so one nucleus costs the slices it spans plus one on each side.
- ``"head"`` (models with an instance head, positive points only): the clicks seed a 3D
  watershed over the head's maps of the slices around them (:mod:`.head_object`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .annotate import (
    CONFIDENT_SEED,
    Prompts,
    is_embedded,
    logits_to_masks,
    mask_box,
    mask_to_logits,
    resize_rgb,
    segment_prompts,
    smaller_scales,
)
from .evaluation import innermost_point
from .everything import (
    MIN_OBJECT_INPUT_PX,
    Cancelled,
    anisotropy,
    denoised_rgb,
    head_widths,
    recommended_thresholds,
    upscale_for_width,
    volume_contrast_limits,
    volume_thresholds,
)
from .head_object import HeadSlices, iter_head_object
from .predictor import SamPredictor, points_outside, preprocess_shape, to_uint8_rgb


class VolumeMask(np.ndarray):
    """A (Z, H, W) bool mask of one object, with what the propagation knows about it:

    - ``scores`` (Z,): the decoder's predicted IoU per slice (method ``"head"``: the
      head's mean foreground probability inside the slice's mask); NaN where not segmented;
    - ``z_range``: (first, last) slice of the object, or None when it is empty;
    - ``embedded``: the slices whose embeddings were computed for it (not cached before);
    - ``visited``: every slice that was decoded, in order (the ones where it stopped too);
    - ``cancelled``: True when ``cancel`` stopped it (the mask holds what was done);
    - ``scale``: model-input pixels per slice pixel the slices were segmented at;
    - ``method``: ``"decoder"`` or ``"head"``, the method that segmented it.
    """

    scores: np.ndarray
    embedded: list[int]
    visited: list[int]
    cancelled: bool
    scale: float
    method: str

    def __array_finalize__(self, obj) -> None:
        if obj is None:
            return
        self.scores = getattr(obj, "scores", None)
        self.embedded = getattr(obj, "embedded", [])
        self.visited = getattr(obj, "visited", [])
        self.cancelled = getattr(obj, "cancelled", False)
        self.scale = getattr(obj, "scale", float("nan"))
        self.method = getattr(obj, "method", "decoder")

    @property
    def z_range(self) -> tuple[int, int] | None:
        zs = np.flatnonzero(np.asarray(self).reshape(len(self), -1).any(1))
        return (int(zs[0]), int(zs[-1])) if len(zs) else None

    @property
    def least_confident(self) -> int | None:
        """The slice of the object with the lowest predicted IoU."""
        zr = self.z_range
        if zr is None:
            return None
        s = np.where(np.isnan(self.scores), np.inf, self.scores)[zr[0] : zr[1] + 1]
        return zr[0] + int(np.argmin(s))


@dataclass
class SliceResult:
    """One slice of a propagation: its mask (H, W) bool, the decoder's predicted IoU, the
    low-resolution logits (1, s/4, s/4) the next slice is prompted with, and whether the
    object continues from it (False: it ended before this slice; ``mask`` is then not
    part of the object)."""

    z: int
    mask: np.ndarray
    score: float
    low_res: np.ndarray
    kept: bool = True


@dataclass(frozen=True)
class StopRules:
    """When the propagation stops (outside the prompted slices): the new mask is empty,
    grows more than ``max_growth`` times the previous slice's area, the decoder's
    predicted IoU is below ``min_score``, or it overlaps the previous slice's mask below
    ``iou_threshold``: as IoU when it grows (a jump to the next object above or below
    grows it), as the share of it inside the previous mask when it shrinks (an object's
    end shrinks, and must continue)."""

    iou_threshold: float = 0.5
    max_growth: float = 2.5
    min_score: float = 0.5
    #: stop where the object's signal (mean inside the mask minus the slice's median)
    #: falls below this share of the seed's: the dim gap between two nuclei stacked in z
    min_signal: float = 0.5

    def stops(self, previous: np.ndarray, mask: np.ndarray, score: float) -> bool:
        area, before = int(mask.sum()), int(previous.sum())
        if area == 0 or score < self.min_score or area > self.max_growth * max(before, 1):
            return True
        inter = int((mask & previous).sum())
        overlap = inter / area if area <= before else inter / (area + before - inter)
        return overlap < self.iou_threshold


def _model_scale(predictor: SamPredictor, shape: tuple[int, int], factor: float = 1.0) -> float:
    """Model-input pixels per slice pixel for slices of ``shape`` resized by ``factor``."""
    h, w = shape
    ih, iw = preprocess_shape(
        max(2, round(h * factor)), max(2, round(w * factor)), predictor.model.img_size, predictor.model.max_upscale
    )
    return max(ih / h, iw / w)


class _Walker:
    """Slices -> RGB (resized by ``factor``) -> embedded predictor; decodes at that
    scale and returns masks at the slice's size. Records which slices were embedded."""

    def __init__(self, predictor, stack, contrast_limits, prepare_slice) -> None:
        self.predictor = predictor
        self.stack = stack
        self.limits = contrast_limits
        self.prepare_slice = prepare_slice
        self.factor = 1.0
        self._rgb: np.ndarray | None = None
        self.embedded: list[int] = []
        self.visited: list[int] = []

    def set_slice(self, z: int) -> np.ndarray:
        rgb = resize_rgb(to_uint8_rgb(np.asarray(self.stack[z]), self.limits), self.factor)
        if self.prepare_slice is not None and self.factor == 1.0:  # a store holds slices at the model's own scale
            self.prepare_slice(z, rgb)
        if not is_embedded(self.predictor, rgb):
            self.embedded.append(z)
        self.predictor.set_image(rgb)
        self.visited.append(z)
        self._rgb = rgb
        return rgb

    @property
    def scale(self) -> float:
        """Model-input pixels per slice pixel."""
        return _model_scale(self.predictor, self.stack.shape[1:3], self.factor)

    def _full(self, low: np.ndarray) -> np.ndarray:
        """Low-resolution logits (1, s/4, s/4) -> mask at the slice's size."""
        return logits_to_masks(self.predictor, low, tuple(self.stack.shape[1:3]))[0]

    def _scaled(self, prompts: Prompts) -> Prompts:
        f = self.factor
        box = None if prompts.box is None else np.asarray(prompts.box, np.float64) * f
        return Prompts(np.asarray(prompts.points, np.float64) * f, prompts.labels, box)

    def choose_scale(self, z: int, prompts: Prompts, mask: np.ndarray | None) -> None:
        """Pick the scale of the whole walk by the seed's predicted IoU (see ``SEED_SCALES``)."""
        if self.predictor.model.max_upscale is None:
            return
        own, scales = smaller_scales(self.predictor.model, self.stack.shape[1:3])
        if mask is not None and len(prompts.points) == 0 and prompts.box is None:
            x, y = innermost_point(mask)
            prompts = Prompts(np.array([[x, y]]), np.array([1]), mask_box(mask))
        best = (-1.0, 1.0)
        for scale in (own, *scales):
            self.factor = scale / own
            self.set_slice(z)
            cands = segment_prompts(self.predictor, self._rgb, self._scaled(prompts))
            best = max(best, (float(cands.scores[cands.chosen]), self.factor))
            if best[0] >= CONFIDENT_SEED:
                break
        self.factor = best[1]

    def seed(self, z: int, prompts: Prompts, mask: np.ndarray | None) -> SliceResult:
        self.set_slice(z)
        if mask is not None and prompts.empty:  # the given mask is the slice's result
            return SliceResult(z, mask.copy(), 1.0, mask_to_logits(self.predictor, mask))
        scaled = self._scaled(prompts)
        if mask is not None:  # points correct the given mask
            _, scores, low = self.predictor.predict(
                point_coords=scaled.points if len(scaled.points) else None,
                point_labels=scaled.labels if len(scaled.points) else None,
                box=scaled.box,
                mask_input=mask_to_logits(self.predictor, mask),
                multimask_output=False,
            )
            return SliceResult(z, self._full(low[:1]), float(scores[0]), low[:1])
        cands = segment_prompts(self.predictor, self._rgb, scaled)
        low = cands.low_res[cands.chosen][None]
        return SliceResult(z, self._full(low), float(cands.scores[cands.chosen]), low)

    def follow(self, z: int, previous: SliceResult, margin: float) -> SliceResult:
        """Segment slice ``z`` from the neighbouring slice's result."""
        self.set_slice(z)
        x, y = innermost_point(previous.mask)
        f = self.factor
        _, scores, low = self.predictor.predict(
            point_coords=np.array([[x * f, y * f]]),
            point_labels=np.array([1]),
            box=mask_box(previous.mask, margin) * f,
            mask_input=previous.low_res,
            multimask_output=False,
        )
        return SliceResult(z, self._full(low[:1]), float(scores[0]), low[:1])


def _signal(stack, z: int, mask: np.ndarray) -> float:
    plane = np.asarray(stack[z], np.float32)
    return float(plane[mask].mean() - np.median(plane)) if mask.any() else 0.0


def iter_propagation(
    predictor: SamPredictor,
    stack,
    prompts: Mapping[int, Prompts],
    masks: Mapping[int, np.ndarray] | None = None,
    *,
    contrast_limits: tuple[float, float] | None = None,
    rules: StopRules = StopRules(),
    z_range: tuple[int, int] | None = None,
    box_margin: float = 0.25,
    prepare_slice: Callable[[int, np.ndarray], None] | None = None,
    walker: _Walker | None = None,
    choose_scale: bool = True,
) -> Iterator[SliceResult]:
    """Yield the slices of one object as they are segmented: the prompted slices first,
    then the gaps between them (filled from both ends, without stopping), then outwards,
    one slice up and one down in turn, until each side stops (see :class:`StopRules`)
    or reaches ``z_range`` (inclusive). With ``choose_scale`` the walk runs at the scale
    where the seed is segmented most confidently (see ``SEED_SCALES``). A slice where a side stopped is yielded with
    ``kept=False``. ``prepare_slice(z, rgb)`` runs before a slice is embedded (the
    widget puts an embedding store's entry into the cache there)."""
    masks = masks or {}
    seeds = sorted(set(prompts) | set(masks))
    lo_z, hi_z = z_range if z_range is not None else (0, stack.shape[0] - 1)
    walker = walker or _Walker(predictor, stack, contrast_limits, prepare_slice)
    done: dict[int, SliceResult] = {}
    if choose_scale:
        z = seeds[len(seeds) // 2]
        walker.choose_scale(z, prompts.get(z, Prompts()), masks.get(z))
    for z in seeds:
        done[z] = walker.seed(z, prompts.get(z, Prompts()), masks.get(z))
        yield done[z]
    for a, b in zip(seeds, seeds[1:]):  # fill gaps from both ends
        lo, hi = a, b
        while hi - lo > 1:
            for side in (1, -1):
                if hi - lo <= 1:
                    break
                src, z = (lo, lo + 1) if side == 1 else (hi, hi - 1)
                if done[src].mask.any():
                    done[z] = walker.follow(z, done[src], box_margin)
                else:  # this end lost the object: the other end fills the rest
                    done[z] = SliceResult(z, np.zeros_like(done[src].mask), float("nan"), done[src].low_res)
                yield done[z]
                lo, hi = (z, hi) if side == 1 else (lo, z)
    seed_signal = min(_signal(stack, z, done[z].mask) for z in seeds) if rules.min_signal > 0 else 0.0
    fronts = {1: seeds[-1], -1: seeds[0]}
    while fronts:
        for side in (1, -1):
            if side not in fronts:
                continue
            src = fronts[side]
            z = src + side
            if not (lo_z <= z <= hi_z) or not done[src].mask.any():
                del fronts[side]
                continue
            res = walker.follow(z, done[src], box_margin)
            if rules.stops(done[src].mask, res.mask, res.score) or (
                rules.min_signal > 0 and _signal(stack, z, res.mask) < rules.min_signal * seed_signal
            ):
                res.kept = False
                del fronts[side]
            else:
                done[z] = res
                fronts[side] = z
            yield res


#: Propagation methods (see the module's docstring); ``"auto"`` picks ``"head"`` where it
#: applies (a model with an instance head, positive points only) and ``"decoder"`` elsewhere.
METHODS = ("auto", "head", "decoder")


def choose_method(
    model, prompts: Mapping[int, Prompts], masks: Mapping[int, np.ndarray] | None, method: str = "auto"
) -> str:
    """The method that propagates these prompts: ``method``, checked, or for ``"auto"``
    the head where it applies."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    points_only = not masks and all(
        p.box is None and len(p.labels) > 0 and bool((np.asarray(p.labels) > 0).all()) for p in prompts.values()
    )
    if method == "auto":
        return "head" if model.has_instance_head and points_only else "decoder"
    if method == "head" and not model.has_instance_head:
        raise ValueError("method='head' needs a model with an instance head; use method='decoder'")
    if method == "head" and not points_only:
        raise ValueError(
            "method='head' takes positive points only; for boxes, masks or negative points use method='decoder'"
        )
    return method


def _head_slices(
    predictor: SamPredictor, stack, contrast_limits, cancel, clicks: Mapping[int, np.ndarray]
) -> HeadSlices:
    """The head's maps of the stack's slices as the model's 3D settings prepare them (in-plane
    smoothing; by default the contrast limits of the smoothed stack), of a window around
    the ``clicks`` ((x, y) points by slice) where the slices are large (:func:`click_window`)."""
    sigma = recommended_thresholds(predictor.model, "auto", volume=True)["denoise_sigma"]
    limits = contrast_limits or volume_contrast_limits(stack, denoise_sigma=sigma)
    window = click_window(predictor, stack, clicks, limits, sigma, cancel)
    return HeadSlices(predictor, stack, limits, sigma, cancel=cancel, window=window)


def click_window(
    predictor: SamPredictor,
    stack,
    clicks: Mapping[int, np.ndarray],
    limits,
    denoise_sigma: float,
    cancel: Callable[[], bool] | None = None,
) -> tuple[int, int, int, int] | None:
    """The part (y0, y1, x0, x1) of the slices that the head reads around ``clicks``
    ((x, y) points by slice) when the slices are larger than the model's input and their
    objects would be too small at the whole-slice scale, as everything mode tiles such
    slices: the objects are measured on a full-resolution crop at the clicks, and the
    window is as large as a tile with its halo at the scale that makes them about
    ``TARGET_OBJECT_INPUT_PX`` wide (and holds every click). None: whole slices.
    ``cancel()`` is checked before that crop is embedded (a True raises ``Cancelled``)."""
    model = predictor.model
    h, w = stack.shape[1:3]
    points = [np.asarray(p, np.float64).reshape(-1, 2) for p in clicks.values()]
    if max(h, w) <= model.img_size or not points or not sum(len(p) for p in points):
        return None
    z = max(clicks, key=lambda k: len(clicks[k]))
    xy = np.concatenate(points)
    cx, cy = xy.mean(0)

    def around(side_y: int, side_x: int) -> tuple[int, int, int, int]:
        y0 = int(min(max(cy - side_y / 2, 0), h - side_y))
        x0 = int(min(max(cx - side_x / 2, 0), w - side_x))
        return y0, y0 + side_y, x0, x0 + side_x

    y0, y1, x0, x1 = around(min(model.img_size, h), min(model.img_size, w))
    rgb = denoised_rgb(np.asarray(stack[z])[y0:y1, x0:x1], denoise_sigma, limits)
    if rgb.min() == rgb.max():
        return None
    if cancel is not None and cancel():
        raise Cancelled("cancelled before the objects at the click were measured")
    width, _ = head_widths(predictor, rgb, recommended_thresholds(model, "auto"))
    if width * model.img_size / max(h, w) >= MIN_OBJECT_INPUT_PX:
        return None
    side = int(model.img_size / upscale_for_width(model, width, (h, w)))
    spread = xy.max(0) - xy.min(0)  # clicks far apart: a window that holds them all
    side_y = min(h, max(side, int(spread[1] + 4 * max(width, 8))))
    side_x = min(w, max(side, int(spread[0] + 4 * max(width, 8))))
    return around(side_y, side_x)


def iter_head_propagation(
    predictor: SamPredictor,
    stack,
    prompts: Mapping[int, Prompts],
    *,
    contrast_limits: tuple[float, float] | None = None,
    z_range: tuple[int, int] | None = None,
    cancel: Callable[[], bool] | None = None,
    slices: HeadSlices | None = None,
    previews: bool = True,
    scale=None,
) -> Iterator[SliceResult]:
    """The ``"head"`` method in the form of :func:`iter_propagation`: the slices of each
    estimate of the object as it grows (with ``previews``; a slice an estimate no longer
    holds comes with ``kept=False``), then the result's. ``cancel()`` is checked before
    each embedding and a True raises :class:`~napari_tinysam.everything.Cancelled`.
    ``scale``: the stack's voxel size (z, y, x), as in :func:`segment_volume`."""
    params = None if scale is None else volume_thresholds(predictor.model, scale)
    clicks = {z: np.asarray(p.points, np.float64) for z, p in prompts.items()}
    slices = slices or _head_slices(predictor, stack, contrast_limits, cancel, clicks)
    shown: set[int] = set()
    empty = np.zeros((1, 0, 0), np.float32)
    for est in iter_head_object(predictor, stack, clicks, slices, z_range=z_range, params=params):
        if not (est.final or previews):
            continue
        for z in sorted(shown - set(est.sections)):
            yield SliceResult(z, np.zeros(stack.shape[1:3], bool), float("nan"), empty, kept=False)
        for z, mask in sorted(est.sections.items()):
            yield SliceResult(z, mask, est.scores[z], empty)
        shown = set(est.sections)


def _as_prompt_sets(z, point_coords, point_labels, box, mask, shape):
    """The per-slice prompts of :func:`segment_object_in_volume`'s arguments, checked."""
    depth, h, w = shape
    many = isinstance(z, Sequence) and not isinstance(z, str)
    zs = [int(v) for v in z] if many else [int(z)]

    def per_slice(value, name):
        if not many:
            return [value]
        if value is None:
            return [None] * len(zs)
        if len(value) != len(zs):
            raise ValueError(f"{name} must give one entry per prompted slice ({len(zs)}), got {len(value)}")
        return list(value)

    pts, labs, boxes, masks = (
        per_slice(v, n)
        for v, n in ((point_coords, "point_coords"), (point_labels, "point_labels"), (box, "box"), (mask, "mask"))
    )
    prompts: dict[int, Prompts] = {}
    given: dict[int, np.ndarray] = {}
    for zi, p, lab, b, m in zip(zs, pts, labs, boxes, masks):
        if not 0 <= zi < depth:
            raise ValueError(f"slice z={zi} is outside the stack (0..{depth - 1})")
        if zi in prompts:
            raise ValueError(f"slice z={zi} is prompted twice; give each slice once")
        if (p is None) != (lab is None):
            raise ValueError("point_coords and point_labels must be given together")
        points = np.zeros((0, 2)) if p is None else np.asarray(p, np.float64).reshape(-1, 2)
        labels = np.zeros(0, np.int64) if lab is None else np.asarray(lab, np.int64).reshape(-1)
        if len(points) != len(labels):
            raise ValueError(f"{len(points)} points but {len(labels)} point labels on slice z={zi}")
        outside = points_outside(points, h, w)
        if outside.any():
            raise ValueError(f"point {points[outside][0].tolist()} (x, y) lies outside the slice ({w} x {h} pixels)")
        if len(labels) and not (labels > 0).any() and b is None and m is None:
            raise ValueError(f"slice z={zi} has only negative points: add a positive point or a box")
        bx = None if b is None else np.asarray(b, np.float64).reshape(4)
        prompts[zi] = Prompts(points, labels, bx)
        if m is not None:
            m = np.asarray(m, bool)
            if m.shape != (h, w):
                raise ValueError(f"mask on slice z={zi} has shape {m.shape}, the slices are {(h, w)}")
            if not m.any():
                raise ValueError(f"mask on slice z={zi} is empty: give a mask with the object in it")
            given[zi] = m
        elif prompts[zi].empty:
            raise ValueError(f"slice z={zi} has no prompt: give points, a box or a mask")
    return prompts, given


def segment_object_in_volume(
    model_or_predictor,
    stack,
    z,
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    *,
    contrast_limits: tuple[float, float] | None = None,
    iou_threshold: float = 0.5,
    z_range: tuple[int, int] | None = None,
    progress: Callable[[int, np.ndarray, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    method: str = "auto",
    scale=None,
) -> VolumeMask:
    """Segment one object through a (Z, H, W) stack from prompts on slice ``z``.

    ``method="head"`` (the ``"auto"`` choice for a model with an instance head and
    positive points only): the points seed a 3D watershed over the instance head's maps
    of the slices around them, and the object is what grows from them; it ends where the
    head's object ends, or before a second rise of its cross-section (the next nucleus
    above or below). The window of slices grows until the object ends a slice inside
    it. ``progress`` is called for every slice once the object is known. ``scale``: the
    stack's voxel size (z, y, x) in any one unit (a napari layer's ``scale``); given, the
    smoothing across slices is converted to this stack's z spacing as in
    :func:`~napari_tinysam.everything.segment_volume`.

    ``method="decoder"`` (boxes, masks, negative points, or models without a head):
    the prompted slice is segmented as the annotator does it (``point_coords`` (N, 2) as
    (x, y) with ``point_labels`` (N,) 1/0, and/or ``box`` (4,) XYXY; or ``mask`` (H, W):
    an existing mask, kept as it is, or corrected by the points given with it). Then each
    next slice, up and down, is prompted with the previous slice's result (its box, its
    innermost point and its low-resolution logits) until the object ends: the mask is
    empty, its overlap with the previous slice's is below ``iou_threshold`` (IoU when it
    grows, the share inside the previous mask when it shrinks), it grows 2.5-fold, or
    the decoder's confidence is low; or until ``z_range`` (first, last).

    Several prompted slices of one object: give ``z`` as a list and the prompts as lists
    with one entry (or None) per slice; the slices between them are filled from both ends.

    Only the slices reached are embedded (cached in the predictor's embedding cache).
    Slices are scaled with ``contrast_limits`` (default: the stack's 0.5 / 99.5
    percentiles). ``progress(z, mask, score)`` is called for every slice added to the
    object; ``cancel()`` returning True stops the walk (the result holds what was done
    and has ``cancelled`` set).

    Returns a :class:`VolumeMask`: the (Z, H, W) bool mask, with per-slice confidence
    in ``.scores`` and the slices embedded for it in ``.embedded``.
    """
    predictor = model_or_predictor if isinstance(model_or_predictor, SamPredictor) else SamPredictor(model_or_predictor)
    shape = tuple(getattr(stack, "shape", ()))
    if len(shape) != 3:
        raise ValueError(
            f"propagation needs a (Z, H, W) stack, got shape {shape}; for a 2D image use "
            "SamPredictor.predict or the annotator on that slice"
        )
    if scale is not None:
        anisotropy(scale)  # checked before any slice is read
    prompts, given = _as_prompt_sets(z, point_coords, point_labels, box, mask, shape)
    if z_range is not None:
        lo, hi = (int(v) for v in z_range)
        if not (0 <= lo <= hi < shape[0]) or any(not lo <= zi <= hi for zi in prompts):
            raise ValueError(f"z_range {z_range} must lie in 0..{shape[0] - 1} and hold the prompted slices")
        z_range = (lo, hi)
    out = np.zeros(shape, bool).view(VolumeMask)
    out.scores = np.full(shape[0], np.nan, np.float32)
    out.method = choose_method(predictor.model, prompts, given, method)
    if out.method == "head":
        try:
            slices = _head_slices(predictor, stack, contrast_limits, cancel, {z: p.points for z, p in prompts.items()})
        except Cancelled:  # before the window around the clicks was measured: nothing embedded
            out.cancelled, out.scale = True, _model_scale(predictor, shape[1:])
            return out
        out.embedded, out.visited = slices.embedded, slices.visited
        y0, y1, x0, x1 = slices.part or (0, shape[1], 0, shape[2])
        out.scale = _model_scale(predictor, (y1 - y0, x1 - x0))
        try:
            for res in iter_head_propagation(
                predictor, stack, prompts, z_range=z_range, slices=slices, previews=False, scale=scale
            ):
                out[res.z] = res.mask
                out.scores[res.z] = res.score
                if progress is not None:
                    progress(res.z, res.mask, res.score)
        except Cancelled:
            out.cancelled = True
        return out
    limits = contrast_limits if contrast_limits is not None else volume_contrast_limits(stack)
    walker = _Walker(predictor, stack, limits, None)
    out.embedded, out.visited = walker.embedded, walker.visited
    for res in iter_propagation(
        predictor,
        stack,
        prompts,
        given,
        contrast_limits=limits,
        rules=StopRules(iou_threshold=iou_threshold),
        z_range=z_range,
        walker=walker,
    ):
        if res.kept:
            out[res.z] = res.mask
            out.scores[res.z] = res.score
            if progress is not None:
                progress(res.z, res.mask, res.score)
        if cancel is not None and cancel():
            out.cancelled = True
            break
    out.scale = walker.scale
    return out
