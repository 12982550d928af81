"""Interactive annotation logic, independent of napari: prompts on one slice -> mask
candidates, committing a mask into a label volume under a new id, and exact undo.

The napari widgets translate layers and events into these calls; scripts can use them
directly on arrays.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .everything import auto_denoise_sigma, denoised_rgb
from .predictor import SamPredictor, image_key, points_outside, to_uint8_rgb


@dataclass
class Prompts:
    """The prompts of one object on one 2D slice, in that slice's pixel coordinates.

    points: (N, 2) as (x, y) = (column, row); labels: (N,) 1 positive / 0 negative;
    box: (4,) XYXY or None; mask: (H, W) bool, an earlier mask of the object (one being
    refined), or None: its box and its logits start the decoding, points correct it.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    box: np.ndarray | None = None
    mask: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return len(self.points) == 0 and self.box is None and self.mask is None


@dataclass
class Candidates:
    """Mask candidates for one prompt set: masks (C, H, W) bool, scores (C,), their
    low-resolution logits (C, s/4, s/4), and ``chosen``: the one shown (first the one with
    the highest predicted IoU; the user may pick another)."""

    masks: np.ndarray
    scores: np.ndarray
    low_res: np.ndarray
    chosen: int = -1
    #: (y0, x0, h, w) of the magnified window the masks were decoded in (see ``Zoom``)
    window: tuple[int, int, int, int] | None = None
    #: the factor by which the slice (or window) was resized before the model saw it
    #: (``segment_prompts(..., rescale=True)``); its low-resolution logits are at that scale
    factor: float = 1.0
    #: the RGB of a window that would give sharper masks but is not embedded yet
    #: (``segment_prompts(..., encode=False)``); embed it and call again
    pending_window: np.ndarray | None = None
    #: the slice resized to the scales still to be tried for an unconfident object
    #: (``segment_prompts(..., rescale=True, encode=False)``); embed them and call again
    pending_scales: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.chosen < 0:
            self.chosen = self.best

    @property
    def best(self) -> int:
        return int(np.argmax(self.scores))

    @property
    def mask(self) -> np.ndarray:
        """The chosen mask (H, W) bool."""
        return self.masks[self.chosen]


#: Scales (model-input pixels per slice pixel) tried for an object besides the model's
#: own, when that is larger: a model trained on nuclei of one size enlarges small slices
#: up to its ``max_upscale``, which blows large nuclei in small slices past what it was
#: trained on (a 24 px disc in a 96 x 128 slice: 22 px mask at 4x, 416 px at 1.5x). The
#: predicted IoU picks the scale (one more embedding of the slice each, tried only when
#: the model's own scale gives an unconfident mask): for a propagation's seed, and for a
#: click with ``segment_prompts(..., rescale=True)``.
SEED_SCALES = (1.5, 2.5)
#: An object segmented with at least this predicted IoU at the model's own scale keeps it
#: (no further embeddings of the slice).
CONFIDENT_SEED = 0.75


def smaller_scales(model, shape: tuple[int, int], below: float = 1.0) -> tuple[float, list[float]]:
    """The model's own scale for a slice of ``shape`` (model-input pixels per slice pixel:
    the longest side brought to the input, at most ``max_upscale``) and the scales of
    :data:`SEED_SCALES` to try besides it: those under ``own / below`` at which the slice's
    short side keeps at least 32 pixels."""
    h, w = shape[:2]
    own = min(model.img_size / max(h, w), model.max_upscale or np.inf)
    return own, [s for s in SEED_SCALES if s < own / below and s * min(h, w) >= 32]


def logits_to_masks(predictor: SamPredictor, low: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Low-resolution logits (C, s/4, s/4) of the predictor's current image -> masks
    (C, H, W) bool at ``shape``, an image that the current one is a resized copy of."""
    up = predictor.model.postprocess_masks(torch.as_tensor(low)[None], predictor.input_size, tuple(shape))
    return predictor.model.binarize(up[0])


def resize_rgb(rgb: np.ndarray, factor: float) -> np.ndarray:
    """A uint8 RGB image (H, W, 3) resized by ``factor`` (bilinear, antialiased)."""
    if factor == 1.0:
        return rgb
    h, w = rgb.shape[:2]
    t = torch.as_tensor(rgb).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, (max(2, round(h * factor)), max(2, round(w * factor))), mode="bilinear", antialias=True)
    return np.ascontiguousarray(t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())


def click_denoise_sigma(model, rgb: np.ndarray) -> float:
    """The smoothing (Gaussian sigma, slice pixels) that clicks with ``model`` want on the
    uint8 RGB slice ``rgb``: everything mode's auto smoothing for the slice's pixel noise
    (:func:`~napari_tinysam.everything.auto_denoise_sigma`; 0 for a clean slice) divided by
    the square root of the model's enlargement of the slice (a slice the model enlarges 4x
    gets half). Chosen on noisy training fields, crops of them and GoNuclear slices: the
    undivided smoothing blurs the small objects of enlarged slices (docs/benchmarks.md)."""
    own, _ = smaller_scales(model, rgb.shape)
    return auto_denoise_sigma(rgb) / math.sqrt(max(1.0, own))


def slice_rgb(image2d: np.ndarray, contrast_limits: tuple[float, float] | None, smooth_for=None) -> np.ndarray:
    """What the model sees of a slice: uint8 RGB scaled by the layer's contrast limits;
    with ``smooth_for`` (a model), a noisy slice smoothed by :func:`click_denoise_sigma`
    for that model's clicks (a clean one is left as it is)."""
    rgb = to_uint8_rgb(image2d, contrast_limits)
    sigma = click_denoise_sigma(smooth_for, rgb) if smooth_for is not None else 0.0
    return denoised_rgb(image2d, sigma, contrast_limits) if sigma > 0 else rgb


def is_embedded(predictor: SamPredictor, rgb: np.ndarray) -> bool:
    """Whether the embedding of this exact slice is in the predictor's cache."""
    return image_key(predictor.model, rgb) in predictor.cache


#: Magnitude of the low-resolution logits that stand for a given mask (SAM's own
#: confident logits are of this order).
MASK_LOGIT = 8.0


def mask_to_logits(predictor: SamPredictor, mask: np.ndarray) -> np.ndarray:
    """Low-resolution logits (1, s/4, s/4) that stand for ``mask`` (H, W) on the
    predictor's current image: the mask resized to the model input, padded like the
    image, averaged down and mapped to +-``MASK_LOGIT``."""
    model = predictor.model
    (h, w) = predictor.input_size
    m = torch.as_tensor(np.asarray(mask, np.float32))[None, None]
    m = F.interpolate(m, (h, w), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, model.img_size - w, 0, model.img_size - h))
    m = F.adaptive_avg_pool2d(m, model.img_size // 4)[0]
    return ((m.numpy() * 2 - 1) * MASK_LOGIT).astype(np.float32)


def mask_box(mask: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """The XYXY box of a non-empty ``mask`` (H, W), grown by ``margin`` times its longer
    side plus a pixel, and clipped to the slice."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    pad = margin * max(y1 - y0 + 1, x1 - x0 + 1) + 1
    h, w = mask.shape
    return np.array([max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, w - 1), min(y1 + pad, h - 1)], np.float64)


def _prefix_key(prompts: Prompts, n_points: int) -> bytes:
    box = b"" if prompts.box is None else np.asarray(prompts.box, np.float64).tobytes()
    if prompts.mask is not None:
        box += hashlib.blake2b(np.packbits(np.asarray(prompts.mask, bool)).tobytes(), digest_size=16).digest()
    pts = np.asarray(prompts.points[:n_points], np.float64).tobytes()
    return box + b"|" + pts + b"|" + np.asarray(prompts.labels[:n_points], np.int64).tobytes()


@dataclass(frozen=True)
class Zoom:
    """A second, magnified look at small objects (the focus crop of interactive
    segmentation methods such as FocalClick).

    An object whose first mask (a click's chosen mask, or its box) would cover fewer than
    ``target_area`` pixels of the model's input is segmented again, with all its prompts,
    in a window of the slice magnified ``z = sqrt(target_area / area at the input)``
    times (at most ``max_zoom``; no window below ``min_zoom``, so objects over
    ``target_area / min_zoom**2`` pixels at the input keep the slice's masks). The window
    keeps the slice's aspect ratio and ``margin`` times the object's size around its box,
    and must hold every prompt; it costs one more encoder pass per object (cached like a
    slice). The low-resolution masks then have about ``z`` times more cells across the
    object, which is what small objects lack. Defaults chosen on BBBC039 training fields
    (README, "Prompt quality").
    """

    target_area: float = 1600.0
    max_zoom: float = 2.0
    min_zoom: float = 1.25
    margin: float = 0.5

    def window(
        self,
        shape: tuple[int, int],
        bbox: tuple[float, float, float, float],
        area: float,
        input_scale: float,
        max_scale: float = math.inf,
    ) -> tuple[int, int, int, int] | None:
        """(y0, x0, h, w) of the window for an object of ``area`` pixels inside ``bbox``
        (x0, y0, x1, y1, inclusive) on a slice of ``shape`` that the model sees scaled by
        ``input_scale`` and may see at most ``max_scale`` (the model's ``max_upscale``);
        None when the object needs no magnification or cannot get enough."""
        height, width = shape
        z = min(self.max_zoom, max_scale / input_scale, math.sqrt(self.target_area / (max(area, 1.0) * input_scale**2)))
        bw, bh = bbox[2] - bbox[0] + 1, bbox[3] - bbox[1] + 1
        pad = 2 * (self.margin * max(bw, bh) + 4)
        z = min(z, width / (bw + pad), height / (bh + pad))
        if z < self.min_zoom:
            return None
        h, w = min(height, round(height / z)), min(width, round(width / z))
        y0 = int(np.clip(round((bbox[1] + bbox[3] + 1) / 2 - h / 2), 0, height - h))
        x0 = int(np.clip(round((bbox[0] + bbox[2] + 1) / 2 - w / 2), 0, width - w))
        return y0, x0, h, w


def _holds(window: tuple[int, int, int, int], prompts: Prompts) -> bool:
    y0, x0, h, w = window
    xy = np.asarray(prompts.points, np.float64).reshape(-1, 2)
    if prompts.box is not None:
        xy = np.concatenate([xy, np.asarray(prompts.box, np.float64).reshape(2, 2)])
    return not points_outside(xy - [x0, y0], h, w).any()


def zoom_window(
    zoom: Zoom, prompts: Prompts, first_mask: np.ndarray | None, predictor: SamPredictor
) -> tuple[int, int, int, int] | None:
    """The window ``zoom`` gives an object on the predictor's current slice: sized by the
    box drawn, or else by the first click's chosen mask (H, W) (the click itself when that
    mask is empty; not needed with a box); None when the object needs no magnification or
    a prompt lies outside the window."""
    shape = predictor.original_size
    input_scale = predictor.input_size[0] / shape[0]
    max_scale = predictor.model.max_upscale or math.inf
    if prompts.box is not None:
        x0, y0, x1, y1 = (float(v) for v in prompts.box)
        window = zoom.window(
            shape, (x0, y0, x1, y1), (x1 - x0 + 1) * (y1 - y0 + 1) * math.pi / 4, input_scale, max_scale
        )
    else:
        assert first_mask is not None, "a click's window is sized by its first mask"
        rows, cols = np.flatnonzero(first_mask.any(1)), np.flatnonzero(first_mask.any(0))
        if len(rows):
            bbox = (float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1]))
            window = zoom.window(shape, bbox, float(first_mask.sum()), input_scale, max_scale)
        else:
            x, y = (float(v) for v in prompts.points[0])
            window = zoom.window(shape, (x, y, x, y), 1.0, input_scale, max_scale)
    return window if window is not None and _holds(window, prompts) else None


@dataclass
class ClickHistory:
    """The masks of one object's prompt prefixes on one embedded slice, kept across calls
    of :func:`segment_prompts` (use one per object; ``clear`` it for the next)."""

    features: object = None  # the embedding the masks were decoded on
    steps: dict[bytes, tuple[int | None, Candidates]] = field(default_factory=dict)  # key -> (parent's choice, masks)

    def clear(self) -> None:
        self.features = None
        self.steps.clear()


def _decode_prefixes(
    predictor: SamPredictor,
    prompts: Prompts,
    history: ClickHistory,
    upto: int,
    window: tuple[int, int, int, int] | None,
    shape: tuple[int, int],
    factor: float = 1.0,
) -> tuple[Candidates, list[bytes]]:
    """Decode the prompt prefixes up to ``upto`` points as a sequence of clicks on the
    predictor's current image (the slice, or ``window`` of it, resized by ``factor``),
    reusing ``history``. Masks are returned at the slice's size."""
    offset = np.zeros(2) if window is None else np.array([window[1], window[0]], np.float64)
    tag = b"" if window is None else np.asarray(window, np.int64).tobytes()
    if factor != 1.0:
        tag += np.float64(factor).tobytes()
    box = None if prompts.box is None else (np.asarray(prompts.box, np.float64) - np.tile(offset, 2)) * factor
    given = prompts.mask
    if given is not None and window is not None:
        y0, x0, h, w = window
        given = given[y0 : y0 + h, x0 : x0 + w]
    previous: Candidates | None = None
    keys = []
    for n in range(_first_prefix(prompts), upto + 1):
        keys.append(tag + _prefix_key(prompts, n))
        parent = None if previous is None else previous.chosen
        parent_used, cands = history.steps.get(keys[-1], (None, None))
        if cands is None or parent_used != parent:  # new, or the user picked another mask before it
            if previous is not None:
                mask_input = previous.low_res[previous.chosen][None]
            elif given is not None and given.any():  # an existing object being refined
                mask_input = mask_to_logits(predictor, given)
            else:
                mask_input = None
            masks, scores, low = predictor.predict(
                point_coords=(prompts.points[:n] - offset) * factor if n else None,
                point_labels=prompts.labels[:n] if n else None,
                box=box if box is not None or previous is not None or mask_input is None else mask_box(given) * factor,
                mask_input=mask_input,
                multimask_output=previous is None and prompts.box is None and prompts.mask is None,
            )
            if factor != 1.0:  # the masks at the window's own size, from their logits
                masks = logits_to_masks(predictor, low, tuple(shape if window is None else window[2:]))
            if window is not None:
                y0, x0, h, w = window
                full = np.zeros((len(masks), *shape), masks.dtype)
                full[:, y0 : y0 + h, x0 : x0 + w] = masks
                masks = full
            cands = Candidates(masks, scores, low, window=window, factor=factor)
            history.steps[keys[-1]] = (parent, cands)
        previous = cands
    assert previous is not None
    return previous, keys


def _first_prefix(prompts: Prompts) -> int:
    """The fewest points decoded on their own: none with a box or a mask, else one."""
    return 0 if prompts.box is not None or prompts.mask is not None else 1


def segment_prompts(
    predictor: SamPredictor,
    rgb: np.ndarray,
    prompts: Prompts,
    history: ClickHistory | None = None,
    zoom: Zoom | None = None,
    encode: bool = True,
    *,
    set_image: bool = True,
    rescale: bool = False,
) -> Candidates:
    """Masks for one object's prompts on a slice (embedding from the cache or computed now).

    The prompts are taken as a sequence of clicks, SAM's interactive way: the box, or the
    first point, gives the first masks (a single point: TinySAM's three candidates; a box:
    the single-mask output); each further point refines the mask chosen for the prompts
    before it, whose low-resolution logits go in as mask input, and gives one mask (see
    the README for what this is worth against decoding every point set from scratch).

    ``history`` keeps the masks of the earlier prompts, so that each added point costs one
    decoder pass and a candidate the user picked (``Candidates.chosen``) is the one refined
    by later points. Without it every prefix is decoded again: the same masks.

    With ``zoom``, a small object is segmented in a magnified window of the slice (see
    :class:`Zoom`): its window's embedding is computed now, or, with ``encode=False``
    when it is not cached, the slice's masks come back with ``pending_window`` set.

    With ``rescale``, an object whose first mask is unconfident (predicted IoU under
    :data:`CONFIDENT_SEED`) on a slice that the model enlarges (a small image: up to its
    ``max_upscale``) is segmented again on the slice seen at the smaller scales of
    :data:`SEED_SCALES`, and the most confident scale is kept for all its prompts (large
    nuclei in a small crop: blown up 4x they are past the sizes the model was trained
    on). Those embeddings are computed now, or with ``encode=False`` come back in
    ``pending_scales``.

    ``set_image=False``: the predictor is already on ``rgb`` (its digest is not taken
    again; :func:`segment_objects` digests a slice once for all its objects).
    """
    if prompts.empty:
        raise ValueError("no prompts on this slice: add a point or draw a box")
    if set_image:
        predictor.set_image(rgb)
    history = ClickHistory() if history is None else history
    features = predictor.get_image_embedding()  # the same tensor while this slice stays embedded
    if history.features is not features:
        history.clear()
        history.features = features
    shape = tuple(rgb.shape[:2])
    n = len(prompts.points)
    window, first_keys, factor, pending_scales = None, [], 1.0, []
    if zoom is not None or rescale:
        first, first_keys = _decode_prefixes(predictor, prompts, history, _first_prefix(prompts), None, shape)
        if zoom is not None:
            window = zoom_window(zoom, prompts, first.mask, predictor)
        if rescale:
            factor, small, scale_keys, pending_scales = _pick_scale(predictor, rgb, prompts, history, first, encode)
            first_keys += scale_keys
            if factor != 1.0:  # a large object: no magnified window
                window = None
                predictor.set_image(small)
    pending = None
    if window is not None:
        y0, x0, h, w = window
        crop = np.ascontiguousarray(rgb[y0 : y0 + h, x0 : x0 + w])
        if encode or is_embedded(predictor, crop):
            predictor.set_image(crop)
        else:
            pending, window = crop, None
    result, keys = _decode_prefixes(predictor, prompts, history, n, window, shape, factor)
    # prompts moved or deleted: their masks no longer apply
    keep = set(keys) | set(first_keys)
    history.steps = {k: v for k, v in history.steps.items() if k in keep}
    result.pending_window = pending
    result.pending_scales = pending_scales
    return result


def _pick_scale(
    predictor: SamPredictor, rgb: np.ndarray, prompts: Prompts, history: ClickHistory, first: Candidates, encode: bool
) -> tuple[float, np.ndarray | None, list[bytes], list[np.ndarray]]:
    """The factor by which to resize the slice for an object whose first masks (at the
    model's own scale) are ``first`` (see ``segment_prompts(..., rescale=True)``), that
    slice resized, the history keys decoded, and the resized slices not embedded yet
    (``encode=False``; the factor is then 1 until they are). The predictor is left on the
    slice."""
    score = float(first.scores[first.chosen])
    shape = rgb.shape[:2]
    own, scales = smaller_scales(predictor.model, shape, below=1.2)
    if score >= CONFIDENT_SEED or not scales:
        return 1.0, None, [], []
    on_slice = predictor.get_embedding()
    best: tuple[float, float, np.ndarray | None] = (score, 1.0, None)
    keys: list[bytes] = []
    pending = []
    for scale in scales:
        small = resize_rgb(rgb, scale / own)
        if not (encode or is_embedded(predictor, small)):
            pending.append(small)
            continue
        predictor.set_image(small)
        cands, k = _decode_prefixes(predictor, prompts, history, _first_prefix(prompts), None, shape, scale / own)
        keys += k
        if float(cands.scores[cands.chosen]) > best[0]:
            best = (float(cands.scores[cands.chosen]), scale / own, small)
    predictor.set_embedding(on_slice)
    if pending:
        return 1.0, None, keys, pending
    return best[1], best[2], keys, []


def split_objects(prompts: Prompts) -> list[Prompts]:
    """One object per positive point, each with the negative points nearest to it, and one
    for the box (the "each point is its own object" mode)."""
    pts = np.asarray(prompts.points, np.float64).reshape(-1, 2)
    labels = np.asarray(prompts.labels, np.int64)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels != 1)
    members = [[i] for i in pos]
    for j in neg if len(pos) else ():
        members[int(np.argmin(((pts[pos] - pts[j]) ** 2).sum(1)))].append(j)
    objects = [Prompts(pts[m], labels[m]) for m in members]
    if prompts.box is not None:
        objects.append(Prompts(box=prompts.box))
    return objects


def segment_objects(
    predictor: SamPredictor,
    rgb: np.ndarray,
    prompts: Prompts,
    histories: dict[bytes, ClickHistory] | None = None,
    *,
    rescale: bool = False,
    encode: bool = True,
) -> list[Candidates]:
    """Masks for every object of :func:`split_objects` on one slice (embedding from the
    cache or computed now). ``histories`` (object key -> :class:`ClickHistory`), kept
    across calls, makes a point added to one object cost one decoder pass. ``rescale``
    and ``encode``: as in :func:`segment_prompts`, for each object."""
    histories = {} if histories is None else histories
    out, keys = [], []
    objects = split_objects(prompts)
    if objects:  # the slice is digested once, not once per object
        predictor.set_image(rgb)
        on_slice = predictor.get_embedding()
    for obj in objects:
        keys.append(_prefix_key(obj, min(1, len(obj.points))))
        history = histories.setdefault(keys[-1], ClickHistory())
        out.append(segment_prompts(predictor, rgb, obj, history, encode=encode, set_image=False, rescale=rescale))
        predictor.set_embedding(on_slice)  # a rescaled object left the predictor on its smaller view
    for key in set(histories) - set(keys):  # objects whose point was removed
        del histories[key]
    return out


@dataclass
class UndoRecord:
    """What a commit overwrote: the slice index, the patch origin, its old values and
    the values the commit left there."""

    index: tuple[int, ...]
    origin: tuple[int, int]
    previous: np.ndarray
    label: int
    after: np.ndarray


def next_free_id(labels: np.ndarray) -> int:
    """The id for a new object: one more than the largest id in the whole volume."""
    return int(labels.max()) + 1 if labels.size else 1


def check_new_ids(labels: np.ndarray, count: int = 1, first: int | None = None) -> None:
    """Raise ``ValueError`` unless ``count`` new ids from ``first`` (default: the next
    free id) fit the labels' data type: napari makes new Labels layers uint8 (ids up to
    255), and an id past the type's range would wrap around or fail half-way."""
    first = next_free_id(labels) if first is None else first
    top = 1 if labels.dtype == bool else np.iinfo(labels.dtype).max
    if count and first + count - 1 > top:
        raise ValueError(
            f"the Labels layer's data type ({labels.dtype}) holds ids up to {top}, and the next free id is "
            f"{first}{f' ({count} objects)' if count > 1 else ''}; use a Labels layer of a larger type, or "
            "convert this one, e.g. in napari's console: layer.data = layer.data.astype('int32')"
        )


def commit_mask(
    labels: np.ndarray,
    index: tuple[int, ...],
    mask: np.ndarray,
    overwrite: bool = False,
    label: int | None = None,
) -> UndoRecord | None:
    """Write ``mask`` (H, W) bool into ``labels[index]`` under a new id, in place.

    Pixels of other objects are kept unless ``overwrite``. Returns an undo record
    (None when nothing was written).
    """
    plane = labels[index]
    if plane.shape != mask.shape:
        raise ValueError(
            f"labels slice has shape {plane.shape} but the mask has shape {mask.shape}; "
            "the Labels layer must have the image's shape"
        )
    write = mask if overwrite else mask & (plane == 0)
    if not write.any():
        return None
    rows = np.flatnonzero(write.any(1))
    cols = np.flatnonzero(write.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    label = next_free_id(labels) if label is None else label
    check_new_ids(labels, 1, label)
    previous = plane[y0:y1, x0:x1].copy()
    plane[y0:y1, x0:x1][write[y0:y1, x0:x1]] = label
    return UndoRecord(tuple(index), (int(y0), int(x0)), previous, label, plane[y0:y1, x0:x1].copy())


def _check_shapes(labels: np.ndarray, masks: dict[tuple[int, ...], np.ndarray]) -> None:
    for index, mask in masks.items():
        if labels[index].shape != mask.shape:
            raise ValueError(
                f"labels slice {index} has shape {labels[index].shape} but the mask has shape {mask.shape}; "
                "the Labels layer must have the image's shape"
            )


def commit_objects(
    labels: np.ndarray, objects: list[dict[tuple[int, ...], np.ndarray]], overwrite: bool = False
) -> list[UndoRecord]:
    """Write several objects (each ``index -> (H, W) bool``) under consecutive new ids, in
    place; every shape is checked before anything is written. Returns the undo records of
    all of them (undo them in reverse order: one step)."""
    for masks in objects:
        _check_shapes(labels, masks)
    label = next_free_id(labels)  # one scan of the volume; each written object takes the next id
    check_new_ids(labels, len(objects), label)
    records = []
    for masks in objects:
        written = commit_object(labels, masks, overwrite, label)
        label += bool(written)
        records += written
    return records


def commit_object(
    labels: np.ndarray,
    masks: dict[tuple[int, ...], np.ndarray],
    overwrite: bool = False,
    label: int | None = None,
) -> list[UndoRecord]:
    """Write one object's masks on several slices (``index -> (H, W) bool``) into
    ``labels`` under one new id, in place: every shape is checked before anything is
    written. Returns the undo records (undo them in reverse order)."""
    _check_shapes(labels, masks)
    label = next_free_id(labels) if label is None else label
    check_new_ids(labels, 1, label)
    records = [commit_mask(labels, index, mask, overwrite, label) for index, mask in masks.items()]
    return [r for r in records if r is not None]


def replace_object(
    labels: np.ndarray,
    label: int,
    masks: dict[tuple[int, ...], np.ndarray],
    overwrite: bool = False,
    whole: bool = False,
    within: tuple[int, ...] = (),
) -> list[UndoRecord]:
    """Replace object ``label`` by ``masks`` (``index -> (H, W) bool``), in place: on each
    given slice its old pixels outside the new mask become background and the new mask
    takes its id (over other objects only if ``overwrite``); with ``whole``, the object's
    pixels on slices not given are removed too (a new 3D object replaces the old one),
    on the slices whose index starts with ``within`` only (in a (T, Z, Y, X) layer,
    ``within=(t,)`` keeps the id's pixels at other time points, a tracked object's).
    Everything is checked before anything is written. Returns the undo records."""
    _check_shapes(labels, masks)
    old = labels == label
    if not old.any():
        raise ValueError(f"label {label} does not exist in this Labels layer; pick an id it holds")
    lead = labels.ndim - 2
    todo = dict(masks)
    if whole:
        for index in zip(*np.nonzero(old.reshape(*old.shape[:lead], -1).any(-1))):
            index = tuple(int(i) for i in index)
            if index[: len(within)] == tuple(within):
                todo.setdefault(index, np.zeros(labels.shape[lead:], bool))
    records = []
    for index, mask in todo.items():
        plane = labels[index]
        was = old[index]
        write = mask & (plane != label) & (overwrite | (plane == 0))
        change = write | (was & ~mask)
        if not change.any():
            continue
        rows, cols = np.flatnonzero(change.any(1)), np.flatnonzero(change.any(0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        previous = plane[y0:y1, x0:x1].copy()
        plane[was & ~mask] = 0
        plane[write] = label
        records.append(UndoRecord(tuple(index), (int(y0), int(x0)), previous, label, plane[y0:y1, x0:x1].copy()))
    return records


def record_patch(labels: np.ndarray, record: UndoRecord) -> np.ndarray:
    """The part of ``labels`` that ``record`` covers (a view: writes go to ``labels``)."""
    y0, x0 = record.origin
    h, w = record.previous.shape
    return labels[record.index][y0 : y0 + h, x0 : x0 + w]


def undo_commit(labels: np.ndarray, record: UndoRecord) -> int:
    """Restore what a commit (:func:`commit_mask`, :func:`replace_object`) overwrote: each
    pixel it changed that still holds what it wrote. Pixels edited since (napari's brush,
    its eraser) keep the edit; their number is returned (0: the layer is exactly as it
    was before the commit, given the records are undone last first)."""
    patch = record_patch(labels, record)
    changed = record.previous != record.after
    ours = changed & (patch == record.after)
    kept = int((changed & ~ours & (patch != record.previous)).sum())
    patch[ours] = record.previous[ours]
    return kept
