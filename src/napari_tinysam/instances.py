"""Instances from the instance head: maps, seeds, head-only labels, and one prompt per
object for the mask decoder (everything mode ``"auto"``).

The head predicts, on the low-resolution mask grid, foreground probability and two
normalised distances (to the object's centre and to its boundary, both 0 at the
innermost point and 1 in the background). Seeds are the connected components where both
distances are small inside the foreground; a seeded watershed on the boundary distance
grows them into instances (head-only labels). In ``"auto"`` mode each instance then
prompts the mask decoder once, with a positive point at its innermost pixel and its
box, so the decoder draws the boundary and 1 prompt per object replaces SAM's 1024.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .model import Sam
from .model.sam import _upscale_matrix
from .predictor import ImageEmbedding, SamPredictor, _batch_prompts_to_model, predict_batch

#: Post-processing thresholds of the head (used when a model stores no tuned values).
HEAD_THRESHOLDS = {
    "foreground_thresh": 0.5,
    "center_thresh": 0.5,
    "boundary_thresh": 0.5,
    "min_size": 0.5,
    "min_contrast": 0.2,
    "blob_contrast": 0.5,
}


@torch.no_grad()
def head_maps(model: Sam, embedding: ImageEmbedding) -> np.ndarray:
    """The head's three probability maps at the image's own resolution, (3, H, W) float32:
    the grid output mapped back exactly as masks are (resize to the padded input, crop to
    the valid part, resize to the original size)."""
    probs = model.instance_maps(embedding.features).float().cpu()
    return model.postprocess_masks(probs, embedding.input_size, embedding.original_size)[0].numpy()


def grid_cell_area(embedding: ImageEmbedding) -> float:
    """Area in image pixels of one cell of the low-resolution grid (4 x 4 input pixels)."""
    (h, w), (ih, iw) = embedding.original_size, embedding.input_size
    return 16.0 * (h / ih) * (w / iw)


def keep_objects(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Labels with only the ids where ``keep`` (bool, indexed by id; entry 0 ignored) is
    true, renumbered 1..N in id order."""
    keep = keep.copy()
    keep[0] = False
    lut = np.zeros(len(keep), np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[labels]


#: Depth of the centre-distance minima that seed separate objects in 2D: two touching
#: objects whose centres are separated by a rise of at least this much get one seed each,
#: even when the seed region joins them. On training images it lifted the auto mode's F1
#: by 0.015 (DSB2018) and 0.003 (BBBC039) over one seed per connected region; 0.05 and
#: 0.2 did no better (docs/benchmarks.md).
SEED_DEPTH = 0.1


def _deep_minima(centre: np.ndarray, region: np.ndarray, depth: float) -> np.ndarray:
    """``h_minima(centre, depth) & region`` for a centre map that is 1.0 outside
    ``region``, computed part by part: each part of the region (connected through faces,
    edges or corners, as the morphological reconstruction is) within its bounding box and
    a margin of one pixel, the rest of the box set to 1.0. Where the region's values stay
    at least ``depth`` below 1.0, the walls of 1.0 between parts keep the reconstruction
    of each part to itself, so the result is the same as on the whole image, and the
    reconstruction sorts a few small boxes instead of every pixel (0.16 s of the 0.79 s of
    an auto-mode field went to it). Otherwise the whole image is reconstructed."""
    from skimage.morphology import h_minima

    if not region.any():
        return np.zeros(region.shape, bool)
    if float(centre[region].max()) + depth > 1.0:
        return h_minima(centre, depth).astype(bool) & region
    parts, _ = ndimage.label(region, structure=np.ones((3,) * region.ndim, bool))
    out = np.zeros(region.shape, bool)
    for i, sl in enumerate(ndimage.find_objects(parts), 1):
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        own = parts[box] == i
        out[box] |= h_minima(np.where(own, centre[box], np.float32(1.0)), depth).astype(bool) & own
    return out


def labels_from_maps(
    maps: np.ndarray,
    foreground_thresh: float,
    center_thresh: float,
    boundary_thresh: float,
    min_area: float,
    seed_depth: float = SEED_DEPTH,
    extent_maps: np.ndarray | None = None,
) -> np.ndarray:
    """Seeded watershed inside the foreground. The seed region is where both distances are
    below their thresholds; its seeds are the minima of the centre distance at least
    ``seed_depth`` deep (0: one seed per connected part of the region), grown over the
    region by the centre distance and then over the foreground by the boundary distance.
    ``extent_maps`` (same shape; default ``maps``) give the foreground and boundary
    distance of that last step, so that seeds can come from smoother maps than the
    objects' outlines. Objects under ``min_area`` pixels are dropped. Works on 2D maps
    (3, H, W) and on 3D maps (3, Z, H, W). Returns int32 labels 1..N."""
    from skimage.segmentation import watershed

    fg = maps[0] > foreground_thresh
    region = (maps[1] < center_thresh) & (maps[2] < boundary_thresh) & fg
    if seed_depth > 0:
        centre = np.where(region, maps[1], 1.0).astype(np.float32)
        seeds, n = ndimage.label(_deep_minima(centre, region, seed_depth))
        if n:
            seeds = watershed(centre, seeds, mask=region)
    else:
        seeds, n = ndimage.label(region)
    if n == 0:
        return np.zeros(fg.shape, np.int32)
    if extent_maps is not None:
        maps, fg = extent_maps, (extent_maps[0] > foreground_thresh) | region
    labels = watershed(maps[2], seeds, mask=fg)
    return keep_objects(labels, np.bincount(labels.ravel(), minlength=n + 1) >= min_area)


#: A nucleus's cross-section rises to one maximum through z and falls. Walking out of
#: the clicked slices, a cross-section ``GROWTH`` times larger than the smallest one
#: since the largest, after the section fell below ``DECLINE`` of the largest, is the
#: next nucleus above or below (joined to this one by the smoothing across slices):
#: the object ends before it.
GROWTH = 1.2
DECLINE = 0.9
#: The object ends at a cross-section smaller than this share of the largest one it
#: starts from: the smoothing across slices leaves thin tails above and below a nucleus.
#: For one click through a stack, 0.15-0.3 gave a 3D IoU of 0.634-0.635 on training
#: stacks against 0.624 without (docs/benchmarks.md, 3D propagation).
MIN_SECTION = 0.2


def end_at_next_object(
    mask: np.ndarray, first: int, last: int, growth: float = GROWTH, decline: float = DECLINE
) -> np.ndarray:
    """Cut a (Z, H, W) object where, walking out of slices ``first``..``last`` (kept as
    they are), its cross-section falls below ``MIN_SECTION`` of the largest of those
    slices', grows again after it had declined (see ``GROWTH``) or stops overlapping the
    slice before it by half. Returns a new mask."""
    out = np.zeros_like(mask)
    out[first : last + 1] = mask[first : last + 1]
    area = mask.reshape(len(mask), -1).sum(1)
    largest = area[first : last + 1].max()
    for start, side in ((last, 1), (first, -1)):
        peak = low = int(area[start])
        z = start + side
        while 0 <= z < len(mask) and area[z] > MIN_SECTION * largest:
            a = int(area[z])
            if low < decline * peak and a > growth * low:
                break
            if (mask[z] & out[z - side]).sum() < 0.5 * min(a, area[z - side]):
                break
            out[z] = mask[z]
            if a >= peak:
                peak = low = a
            else:
                low = min(low, a)
            z += side
    return out


#: A part cut off an object (see :func:`split_stacked_objects`) with at least this share of
#: the rest's volume is a nucleus of its own; smaller parts are dropped. On training
#: stacks (10 noisy stand-ins from BBBC039 train, GoNuclear 1135 / 1136; mean 3D F1@0.5
#: of the two sources) 0.25 / 0.5 / 0.75 / 1.0 / every part dropped gave 0.7803 /
#: 0.7896 / 0.7882 / 0.7831 / 0.7857 against 0.7756 without cutting (docs/benchmarks.md).
STACKED_SHARE = 0.5


def split_stacked_objects(labels: np.ndarray, min_volume: float, share: float = STACKED_SHARE) -> np.ndarray:
    """3D labels (Z, H, W) with each object cut by :func:`end_at_next_object` from its
    largest cross-section: a part cut off that holds at least ``share`` of the rest's
    volume (and ``min_volume`` voxels) becomes an object of its own (a nucleus above or
    below, joined to it by the smoothing across slices) and is cut in turn; smaller
    parts (thin tails) are dropped. Returns new labels, ids 1..N."""
    out = labels.astype(np.int32, copy=True)
    next_id = int(out.max()) + 1
    queue = [(i + 1, box) for i, box in enumerate(ndimage.find_objects(out)) if box is not None]
    while queue:
        i, box = queue.pop()
        sub = out[box]  # a view: parts are relabelled in place
        obj = sub == i
        peak = int(np.argmax(obj.reshape(len(obj), -1).sum(1)))
        rest = obj & ~end_at_next_object(obj, peak, peak)
        if not rest.any():
            continue
        parts, n = ndimage.label(rest)
        keep = max(min_volume, share * int((obj & ~rest).sum()))
        for c, part_box in enumerate(ndimage.find_objects(parts), start=1):
            part = parts == c
            if part.sum() >= keep:
                sub[part] = next_id
                queue.append(
                    (next_id, tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, part_box)))
                )
                next_id += 1
            else:
                sub[part] = 0
    return keep_objects(out, np.bincount(out.ravel(), minlength=next_id) > 0)


def check_seed_thresholds(params: dict[str, Any]) -> None:
    for name in ("foreground_thresh", "center_thresh", "boundary_thresh"):
        if not 0.0 < params[name] < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {params[name]}")


def check_head_params(params: dict[str, Any]) -> None:
    check_seed_thresholds(params)
    if params["min_size"] < 0:
        raise ValueError(f"min_size must be >= 0, got {params['min_size']}")
    if not 0.0 <= params["min_contrast"] <= 1.0:
        raise ValueError(f"min_contrast must be in [0, 1], got {params['min_contrast']}")
    if params["blob_contrast"] < 0:
        raise ValueError(
            f"blob_contrast must be >= 0 (0: look for no missed small objects), got {params['blob_contrast']}"
        )


def object_contrast(
    gray: np.ndarray, labels: np.ndarray, occupied: np.ndarray | None = None, counts: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local contrast of every object of a label image (ids 1..N), (N,) float: its mean
    intensity minus the mean of the background ring around it (as wide as the object's
    equivalent radius, other objects and the ``occupied`` pixels excluded); objects
    without such a ring are compared with the mean background. 0 for absent ids. With
    ``counts``, also the pixels (N,) of each object and of what it was compared with."""
    n = int(labels.max())
    out, inside, around = np.zeros(n, np.float64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    fg = labels > 0 if occupied is None else (labels > 0) | occupied
    background = float(gray[~fg].mean()) if (~fg).any() else 0.0
    for i, sl in enumerate(ndimage.find_objects(labels), 1):
        if sl is None:
            continue
        m = labels[sl] == i
        rad = max(2, int(np.sqrt(m.sum() / np.pi)))
        grown = tuple(slice(max(0, a.start - rad), a.stop + rad) for a in sl)
        own = np.zeros(labels[grown].shape, bool)
        oy, ox = sl[0].start - grown[0].start, sl[1].start - grown[1].start
        own[oy : oy + m.shape[0], ox : ox + m.shape[1]] = m
        ring = ndimage.binary_dilation(own, iterations=rad) & ~fg[grown]
        outside = float(gray[grown][ring].mean()) if ring.any() else background
        out[i - 1] = float(gray[sl][m].mean()) - outside
        inside[i - 1], around[i - 1] = m.sum(), ring.sum() if ring.any() else (~fg).sum()
    return (out, inside, around) if counts else out


#: Immerkaer's operator: the difference of two Laplacians, blind to linear intensity
#: changes; on white noise of standard deviation s its response has standard deviation 6 s.
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def pixel_noise(gray: np.ndarray) -> float:
    """The standard deviation of the pixel noise of a 2D image (in its intensity units):
    the robust spread (1.4826 x median absolute value) of Immerkaer's operator's response
    over 6, so that edges and the insides of objects (a minority of the pixels) barely
    move it. Noise correlated between neighbouring pixels (blur) reads lower, as it is to
    the eye; 0 for a noise-free image."""
    response = ndimage.convolve(np.asarray(gray, np.float32), _NOISE_KERNEL, mode="reflect")
    return 1.4826 * float(np.median(np.abs(response))) / 6.0


#: Blocks (pixels on a side) whose means measure the background's noise (:func:`mean_noise`),
#: how far from every object they lie, and how many pairs of neighbouring such blocks
#: are enough.
NOISE_BLOCK = 8
NOISE_CLEARANCE = 2
NOISE_MIN_PAIRS = 16


def mean_noise(gray: np.ndarray, foreground: np.ndarray) -> float:
    """The background's noise as the standard deviation it gives the mean of n pixels
    times sqrt(n), for regions larger than its grain (0: not measurable): from the means
    of ``NOISE_BLOCK`` x ``NOISE_BLOCK`` blocks clear of ``foreground`` (by
    ``NOISE_CLEARANCE`` pixels), as the robust spread (1.4826 x median absolute deviation)
    of the differences between neighbouring blocks, so that smooth changes of the
    background (uneven illumination) do not count and noise correlated between pixels
    (blur) does. With too few such blocks (a small image, or one full of objects or of
    texture taken for objects) the pixel noise (:func:`pixel_noise`) stands in: blocks
    holding objects would count the objects as noise."""
    k = NOISE_BLOCK
    h, w = (gray.shape[0] // k) * k, (gray.shape[1] // k) * k
    if h < 2 * k or w < 2 * k:
        return 0.0
    means = gray[:h, :w].reshape(h // k, k, w // k, k).mean((1, 3), dtype=np.float64)
    near = ndimage.binary_dilation(foreground, iterations=NOISE_CLEARANCE) if foreground.any() else foreground
    clear = ~near[:h, :w].reshape(h // k, k, w // k, k).any((1, 3))
    if (clear[1:] & clear[:-1]).sum() + (clear[:, 1:] & clear[:, :-1]).sum() < NOISE_MIN_PAIRS:
        return pixel_noise(gray)
    # each direction about its own median: a gradient shifts the differences along it
    deviations = [
        np.abs(d - np.median(d))
        for d in (
            (means[1:] - means[:-1])[clear[1:] & clear[:-1]],
            (means[:, 1:] - means[:, :-1])[clear[:, 1:] & clear[:, :-1]],
        )
        if len(d)
    ]
    spread = 1.4826 * float(np.median(np.concatenate(deviations))) if deviations else 0.0
    return spread / np.sqrt(2.0) * k


def object_significance(
    gray: np.ndarray, labels: np.ndarray, contrast: np.ndarray, inside: np.ndarray, around: np.ndarray
) -> np.ndarray:
    """Each object's ``contrast`` in standard errors of the difference of the two means
    under the background's noise (:func:`mean_noise`), (N,); ``contrast``, ``inside`` and
    ``around`` as ``object_contrast(gray, labels, counts=True)`` measures them. Infinite
    where the noise is not measurable (or nil)."""
    noise = mean_noise(gray, labels > 0)
    if noise <= 0:
        return np.full(len(contrast), np.inf)
    error = noise * np.sqrt(1.0 / np.maximum(inside, 1) + 1.0 / np.maximum(around, 1))
    return np.asarray(contrast) / error


#: An image none of whose objects reaches this significance (:func:`object_significance`)
#: holds only the background's texture: no objects. Chosen on training images and pure
#: noise (docs/benchmarks.md): the most significant object reaches at most 3.0 in empty
#: fields of Gaussian, Poisson, blurred and unevenly lit noise, at least 7.2 in slices of
#: the GoNuclear training crops (noisy confocal planes, nuclei in a structured background)
#: and 20 in BBBC039 / DSB2018 training images.
EMPTY_SIGNIFICANCE = 5.0
#: An image smoothed before the model saw it (auto mode's denoising of noisy images) is
#: judged on the image as acquired less its background (a Gaussian of this many pixels:
#: smoothing turns uneven illumination into objects), and needs an object of this
#: significance: in smoothed noise the head's objects are its brightest grains, chosen
#: for their contrast. Fields of pure noise reached at most 5.1 (Gaussian, Poisson,
#: linear and bump-shaped illumination; 256 / 520 px), noisy fields of nuclei (SNR 1-3,
#: nuclei 15-30 px across) at least 20 (docs/benchmarks.md).
SMOOTHED_BACKGROUND_PX = 24.0
EMPTY_SIGNIFICANCE_SMOOTHED = 10.0


def _faint(contrast: np.ndarray, min_contrast: float) -> np.ndarray:
    """Which objects (bool per id) have a contrast below ``min_contrast`` times the median
    object's; none when the median is not positive."""
    typical = float(np.median(contrast)) if len(contrast) else 0.0
    if min_contrast <= 0 or typical <= 0:
        return np.zeros(len(contrast), bool)
    return contrast < min_contrast * typical


def adjust_by_contrast(
    labels: np.ndarray,
    gray: np.ndarray,
    min_contrast: float,
    blob_contrast: float = 0.0,
    min_blob_area: float = 0.0,
    raw: np.ndarray | None = None,
) -> np.ndarray:
    """The head's objects judged by their local contrast (:func:`object_contrast`, measured
    once): those below ``min_contrast`` times the median object's are removed (faint
    texture in the background that the head takes for objects). Where none of them stands
    out of the background's noise (:func:`object_significance` under
    ``EMPTY_SIGNIFICANCE``: an empty field, whose noise the contrast stretch makes look
    like nuclei), there are no objects. With ``blob_contrast`` > 0, the objects the head
    missed are then added (:func:`add_missed_blobs`, against the median contrast of the
    objects kept). ``raw``: the image before it was smoothed, if it was: significance is
    then judged on it less its smooth background (``SMOOTHED_BACKGROUND_PX``) against
    ``EMPTY_SIGNIFICANCE_SMOOTHED``. Returns labels numbered 1..N."""
    n = int(labels.max())
    if n == 0:
        return labels
    contrast, inside, around = object_contrast(gray, labels, counts=True)
    if raw is None:
        significance, least = object_significance(gray, labels, contrast, inside, around), EMPTY_SIGNIFICANCE
    else:
        flat = raw - ndimage.gaussian_filter(np.asarray(raw, np.float32), SMOOTHED_BACKGROUND_PX)
        significance = object_significance(flat, labels, *object_contrast(flat, labels, counts=True))
        least = EMPTY_SIGNIFICANCE_SMOOTHED
    if significance.max() < least:
        return np.zeros_like(labels)  # no object stands out of the noise: an empty field
    weak = _faint(contrast, min_contrast)
    if weak.any():
        labels = keep_objects(labels, np.concatenate([[False], ~weak]))
    typical = float(np.median(contrast[~weak]))
    return add_missed_blobs(labels, gray, blob_contrast, min_blob_area, min_contrast, typical)


#: Missed small objects (:func:`add_missed_blobs`) must lie this many pixels clear of
#: every object found, be at least this many cells of the low-resolution grid in area
#: (smaller ones were as often debris as objects), and are looked for in the image
#: smoothed by a Gaussian of this many pixels. Chosen with ``blob_contrast`` on training
#: images (docs/benchmarks.md).
BLOB_GAP = 3
BLOB_MIN_CELLS = 3.0
BLOB_SIGMA = 1.0


def add_missed_blobs(
    labels: np.ndarray,
    gray: np.ndarray,
    blob_contrast: float,
    min_area: float,
    min_contrast: float,
    typical: float | None = None,
) -> np.ndarray:
    """Objects the head misses, found in the image instead: slivers of nuclei cut by the
    image border (the head does not see their centre) and small nuclei a few cells of its
    grid wide, whose centre and boundary distances never reach the seed thresholds. They
    are the connected parts of the image (smoothed by ``BLOB_SIGMA``) brighter than the
    background by ``blob_contrast`` times the median local contrast of the objects in
    ``labels`` (:func:`object_contrast`; ``typical`` when it is known), ``BLOB_GAP``
    pixels clear of every one of them, of at least ``min_area`` pixels, whose own local
    contrast reaches ``min_contrast`` times that median. They are appended after the
    existing ids; ``blob_contrast`` 0, or no object to compare with, adds nothing."""
    n = int(labels.max())
    if blob_contrast <= 0 or n == 0:
        return labels
    if typical is None:
        typical = float(np.median(object_contrast(gray, labels)))
    if typical <= 0:
        return labels
    found = labels > 0
    near = ndimage.binary_dilation(found, iterations=BLOB_GAP)
    if near.all():
        return labels
    smooth = ndimage.gaussian_filter(gray.astype(np.float32), BLOB_SIGMA)
    background = float(np.median(smooth[~near]))
    blobs, m = ndimage.label((smooth > background + blob_contrast * typical) & ~near)
    if m == 0:
        return labels
    blobs = keep_objects(blobs, np.bincount(blobs.ravel(), minlength=m + 1) >= min_area)
    if blobs.max() == 0:
        return labels
    faint = object_contrast(gray, blobs, occupied=found) < min_contrast * typical
    blobs = keep_objects(blobs, np.concatenate([[False], ~faint]))
    out = labels.copy()
    out[blobs > 0] = blobs[blobs > 0] + n
    return out


def head_only_labels(model: Sam, embedding: ImageEmbedding, **params) -> np.ndarray:
    """Head-only instance labels (H, W) int32 of an embedded image. ``min_size`` is in
    grid cells (one cell = 4 x 4 model-input pixels), so it follows the image's scale."""
    p = {**HEAD_THRESHOLDS, **{k: v for k, v in params.items() if v is not None}}
    maps = head_maps(model, embedding)
    return labels_from_maps(
        maps,
        p["foreground_thresh"],
        p["center_thresh"],
        p["boundary_thresh"],
        p["min_size"] * grid_cell_area(embedding),
    )


def object_prompts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per object of a label image: ids (N,), innermost point (N, 2) as (x, y) and
    inclusive XYXY box (N, 4)."""
    ids, points, boxes = [], [], []
    for i, sl in enumerate(ndimage.find_objects(labels), 1):
        if sl is None:
            continue
        m = labels[sl] == i
        edt = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(edt)), edt.shape)
        ids.append(i)
        points.append((x + sl[1].start + 0.5, y + sl[0].start + 0.5))
        boxes.append((sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1))
    return (
        np.array(ids, np.int64),
        np.array(points, np.float64).reshape(-1, 2),
        np.array(boxes, np.float64).reshape(-1, 4),
    )


#: Window sides (image tokens) tried for windowed decoding, smallest first.
WINDOWS = (16, 24, 32)


def _crop_region(box, h: int, w: int, margin: float) -> tuple[int, int, int, int]:
    """The object's box grown by ``margin`` of its size (at least 8 px), clipped to the
    image: the region in which its mask is upscaled, (r0, c0, r1, c1)."""
    x0, y0, x1, y1 = box
    my = max(8.0, margin * (y1 - y0 + 1))
    mx = max(8.0, margin * (x1 - x0 + 1))
    return max(0, int(y0 - my)), max(0, int(x0 - mx)), min(h, int(y1 + my) + 1), min(w, int(x1 + mx) + 1)


def _window_origin(region, emb: ImageEmbedding, grid: int, token: int, sizes) -> tuple[int, int, int] | None:
    """(side, row, col) of the smallest window of ``sizes`` image tokens that holds the
    region (image pixels) with one token to spare on each side, centred on it and shifted
    to stay inside the grid; None when none does."""
    (h, w), (ih, iw) = emb.original_size, emb.input_size
    r0, c0, r1, c1 = region
    ty0, ty1 = r0 * ih / h / token - 1, r1 * ih / h / token + 1
    tx0, tx1 = c0 * iw / w / token - 1, c1 * iw / w / token + 1
    for k in sizes:
        if k >= grid:
            return None
        if ty1 - ty0 <= k and tx1 - tx0 <= k:
            oy = int(np.clip(round((ty0 + ty1 - k) / 2), 0, grid - k))
            ox = int(np.clip(round((tx0 + tx1 - k) / 2), 0, grid - k))
            return k, oy, ox
    return None


@torch.no_grad()
def decode_objects(
    predictor: SamPredictor,
    points: np.ndarray,
    boxes: np.ndarray | None,
    chunk: int = 16,
    margin: float = 0.5,
    windowed: bool = True,
) -> list[tuple[np.ndarray, tuple[int, int, int, int], float] | None]:
    """One single-mask decode (token 0) per object: a positive point and, when given, its
    box. Each result is (bool crop, (y0, x0, y1, x1), predicted IoU), upscaled only inside
    the object's box grown by ``margin`` of its size, or None when the mask is empty.

    With ``windowed`` an object whose region fits a window of ``WINDOWS`` image tokens is
    decoded on that window of the embedding only (``Sam.decode_windows``): the decoder's
    work then follows the object's size, not the image's; larger objects see the whole
    embedding."""
    model = predictor.model
    single = model.mask_tokens(False)  # token 0 only: the others' masks are not computed
    emb = predictor._require_embedding()
    h, w = emb.original_size
    s = model.img_size
    grid = emb.features.shape[-1]
    token = s // grid
    ry = _upscale_matrix(s // 4, s, emb.input_size[0], h)
    rx = _upscale_matrix(s // 4, s, emb.input_size[1], w)
    n = len(points)
    regions = [
        _crop_region(boxes[j] if boxes is not None else (*points[j], *points[j]), h, w, margin) for j in range(n)
    ]
    groups: dict[int | None, list[tuple[int, int, int]]] = {}
    for j in range(n):
        win = _window_origin(regions[j], emb, grid, token, WINDOWS) if windowed else None
        groups.setdefault(None if win is None else win[0], []).append((j, *(win[1:] if win else (0, 0))))
    out: list = [None] * n
    for k, members in groups.items():
        for start in range(0, len(members), chunk):
            part = members[start : start + chunk]
            idx = [m[0] for m in part]
            pts = points[idx]
            bx = None if boxes is None else boxes[idx]
            if k is None:
                low, iou = predict_batch(predictor, pts[:, None], np.ones((len(pts), 1)), bx, tokens=single)
            else:
                p, b = _batch_prompts_to_model(predictor, pts[:, None], np.ones((len(pts), 1)), bx)
                origins = torch.tensor([m[1:] for m in part], dtype=torch.long)
                low, iou = model.decode_windows(emb.features, p, b, origins, k, tokens=single)
            low, iou = low[:, 0], iou[:, 0]
            side = low.shape[-1]
            for i, j in enumerate(idx):
                r0, c0, r1, c1 = regions[j]
                oy, ox = 4 * part[i][1], 4 * part[i][2]  # the low-res grid is 4x the tokens'
                crop = (ry[r0:r1, oy : oy + side] @ low[i] @ rx[c0:c1, ox : ox + side].T) > model.mask_threshold
                out[j] = (crop.numpy(), (r0, c0, r1, c1), float(iou[i])) if bool(crop.any()) else None
    return out
