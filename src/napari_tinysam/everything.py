"""Automatic "segment everything": SAM's grid mode and TinySAM's hierarchical mode, for
2D images and, slice by slice, for 3D stacks.

Both modes prompt the model with a grid of single positive points, keep the masks whose
predicted IoU and stability score pass the thresholds, remove duplicates with box NMS
and optionally clean small islands and holes. Candidate masks are filtered on their
low-resolution logits first; only survivors are upscaled, and only inside their own
bounding box, so no full-size logits of a whole batch are ever held.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .instances import (
    BLOB_MIN_CELLS,
    HEAD_THRESHOLDS,
    adjust_by_contrast,
    check_head_params,
    check_seed_thresholds,
    decode_objects,
    grid_cell_area,
    head_maps,
    head_only_labels,
    keep_objects,
    labels_from_maps,
    object_prompts,
    pixel_noise,
    split_stacked_objects,
)
from .masks import (
    box_nms,
    build_point_grid,
    paint_labels,
    remove_small_regions,
    shows_enough,
    stitch_pair,
)
from .model import Sam
from .model.sam import _upscale_matrix
from .predictor import SamPredictor, to_uint8_rgb

Progress = Callable[[int, int], None]


class Cancelled(Exception):
    """Raised when a run is cancelled; nothing partial is returned."""


def _check_cancel(cancel: Callable[[], bool] | None, where: str) -> None:
    if cancel is not None and cancel():
        raise Cancelled(f"cancelled {where}")


@dataclass
class _Masks:
    """Candidate masks as tight crops: ``crops[i]`` is a bool array placed at
    ``places[i] = (y0, x0, y1, x1)`` (exclusive ends) of the image."""

    crops: list[np.ndarray] = field(default_factory=list)
    places: list[tuple[int, int, int, int]] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    stability: list[float] = field(default_factory=list)
    points: list[tuple[float, float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.crops)

    def extend(self, other: _Masks) -> None:
        for name in ("crops", "places", "iou", "stability", "points"):
            getattr(self, name).extend(getattr(other, name))

    def select(self, idx) -> _Masks:
        out = _Masks()
        for name in ("crops", "places", "iou", "stability", "points"):
            seq = getattr(self, name)
            setattr(out, name, [seq[i] for i in idx])
        return out

    def boxes_xyxy(self) -> np.ndarray:
        """Inclusive XYXY boxes of the masks (crops are tight)."""
        if not self.places:
            return np.zeros((0, 4))
        p = np.array(self.places, dtype=np.float64)
        return np.stack([p[:, 1], p[:, 0], p[:, 3] - 1, p[:, 2] - 1], 1)


def _tight(mask: np.ndarray, y0: int, x0: int) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    rows = np.flatnonzero(mask.any(1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return mask[r0:r1, c0:c1], (y0 + r0, x0 + c0, y0 + r1, x0 + c1)


def _support(valid: torch.Tensor, nonzero: torch.Tensor) -> torch.Tensor:
    """Which output rows (K, H) receive weight from the low-resolution rows in ``valid``
    (K, s), given the upscaling matrix's nonzero pattern (H, s)."""
    return (valid.float() @ nonzero.T) > 0


def _candidates_from_points(
    predictor: SamPredictor,
    points: np.ndarray,
    params: dict[str, Any],
    coverage: np.ndarray | None,
) -> _Masks:
    """Decode single-point prompts in batches and keep the masks that pass the filters.

    points: (N, 2) (x, y) pixels. When ``coverage`` (H, W) bool is given, pixels where a
    kept mask's logits exceed ``high_score_thresh`` are marked in it.
    """
    model = predictor.model
    emb = predictor._embedding
    h, w = emb.original_size
    out = _Masks()
    thr, off = model.mask_threshold, params["stability_score_offset"]
    low_thr = thr - off
    ry = rx = None
    # Decode in chunks of at most 16 prompts (points_per_batch bounds memory as in SAM).
    # At input 768 one chunk's image-token tensors are then about 38 MB each. Larger chunks
    # share the first block's image side over more prompts: 32 was 5% faster in one
    # 2-thread process, but in a one-thread Dask worker 32 took 19 s where 16 took 12 for
    # the same field. Tensors of 75 MB came fresh from the kernel on every operation
    # (an add cost 30-35 ms, against under 2 ms at 38 MB once runtime.tune_allocator ran).
    chunk = min(params["points_per_batch"], 16)
    for start in range(0, len(points), chunk):
        pts = points[start : start + chunk]
        coords = torch.as_tensor(predictor.transform_coords(pts), dtype=torch.float32)[:, None]
        prompt_idx, low, iou = model.decode_filtered(
            emb.features, (coords, torch.ones(len(pts), 1)), params["pred_iou_thresh"]
        )
        if len(prompt_idx) == 0:
            continue
        t = iou.shape[1]
        low = low.reshape(-1, *low.shape[-2:])
        iou = iou.reshape(-1)
        keep = torch.nonzero(iou > params["pred_iou_thresh"]).flatten()
        if ry is None:
            s = model.img_size
            ry = _upscale_matrix(low.shape[-2], s, emb.input_size[0], h)
            rx = _upscale_matrix(low.shape[-1], s, emb.input_size[1], w)
            nz_y, nz_x = (ry != 0).float(), (rx != 0).float()
        sel = low[keep]
        above = sel > low_thr
        rows = _support(above.any(2), nz_y)  # (K, H)
        cols = _support(above.any(1), nz_x)  # (K, W)
        for j, k in enumerate(keep.tolist()):
            r = torch.nonzero(rows[j]).flatten()
            c = torch.nonzero(cols[j]).flatten()
            if len(r) == 0 or len(c) == 0:
                continue
            y0, y1, x0, x1 = int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1
            crop = ry[y0:y1] @ sel[j] @ rx[x0:x1].T  # exact full-size logits in the box
            union = int((crop > low_thr).sum())
            inter = int((crop > thr + off).sum())
            stab = inter / union if union else 0.0
            if stab < params["stability_score_thresh"]:
                continue
            tight = _tight((crop > thr).numpy(), y0, x0)
            if tight is None:
                continue
            if coverage is not None:
                coverage[y0:y1, x0:x1] |= (crop > params["high_score_thresh"]).numpy()
            out.crops.append(tight[0])
            out.places.append(tight[1])
            out.iou.append(float(iou[k]))
            out.stability.append(stab)
            px, py = pts[int(prompt_idx[k // t])]
            out.points.append((float(px), float(py)))
    return out


def _postprocess(masks: _Masks, params: dict[str, Any], nms: bool = True) -> _Masks:
    """NMS, then (when ``min_mask_region_area`` > 0) removal of small islands and holes
    followed by a second NMS that prefers unchanged masks, as SAM does. ``nms=False``
    for masks that are disjoint by construction (head-only instances): no NMS at all."""
    if len(masks) == 0:
        return masks
    if nms:
        keep = box_nms(masks.boxes_xyxy(), np.array(masks.iou), params["box_nms_thresh"])
        masks = masks.select(keep)
    area = params["min_mask_region_area"]
    if area <= 0:
        return masks
    cleaned = _Masks()
    unchanged = []
    for i in range(len(masks)):
        y0, x0, _, _ = masks.places[i]
        m = np.pad(masks.crops[i], 1)
        m, ch1 = remove_small_regions(m, area, "holes")
        m, ch2 = remove_small_regions(m, area, "islands")
        tight = _tight(m, y0 - 1, x0 - 1)
        if tight is None:
            continue
        cleaned.crops.append(tight[0])
        cleaned.places.append(tight[1])
        cleaned.iou.append(masks.iou[i])
        cleaned.stability.append(masks.stability[i])
        cleaned.points.append(masks.points[i])
        unchanged.append(0.0 if (ch1 or ch2) else 1.0)
    if len(cleaned) == 0 or not nms:
        return cleaned
    keep = box_nms(cleaned.boxes_xyxy(), np.array(unchanged), params["box_nms_thresh"])
    return cleaned.select(sorted(keep.tolist()))


#: SAM's automatic-mask-generator thresholds (used for models that store no tuned values).
SAM_THRESHOLDS = {
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0,
    "box_nms_thresh": 0.7,
}

#: Defaults of ``mode="auto"`` for models with an instance head and no tuned values.
AUTO_THRESHOLDS = {
    "pred_iou_thresh": 0.5,
    "box_nms_thresh": 0.7,
    "min_agreement": 0.3,
    **HEAD_THRESHOLDS,
}

#: Dense points of hierarchical round 2 are skipped where the head's foreground
#: probability is below this (confident background), when the model has a head.
BACKGROUND_THRESH = 0.1

#: Overlapping masks become labels best first; a mask that keeps less than this share of
#: its own pixels beside better-scored ones is dropped (``paint_labels``'s ``min_kept``):
#: what would show of it is a sliver, a false object that a user would delete by hand.
#: Grid and hierarchical modes leave many (on BBBC039 training fields 18 of 106 objects
#: per field); auto mode's objects seldom overlap. Chosen on training fields
#: (docs/benchmarks.md).
MIN_KEPT = 0.3

MODES = ("auto", "hierarchical", "grid")

#: ``segment_volume`` in ``"auto"`` mode: the head's maps of every slice, smoothed across
#: slices (``z_sigma`` slices) and within them (``xy_sigma`` pixels), give seeds and a
#: seeded watershed in 3D. Averaging neighbouring slices is what finds nuclei in noisy
#: stacks that no single slice shows clearly; the thresholds are lower than in 2D because
#: smoothing lowers the peaks. The seeds then grow over maps smoothed less
#: (``extent_z_sigma``, ``extent_xy_sigma``): smoothing across slices spreads each
#: nucleus's sections past its ends, so objects grown over the smoothed maps run too long
#: in z. ``seed_depth`` > 0 splits a seed region at centre-distance minima as in 2D
#: (:data:`~napari_tinysam.instances.SEED_DEPTH`); 0 keeps one seed per connected region,
#: which never cuts a nucleus in two where a slice of it is missing. ``denoise_sigma`` > 0
#: smooths every slice in its plane (a Gaussian of that many pixels) before the head sees
#: it: in noisy confocal stacks the head takes pixel noise for texture and misses bright
#: nuclei that a slightly smoothed slice shows plainly. Tuned on training stacks
#: (docs/benchmarks.md).
VOLUME_THRESHOLDS = {
    "foreground_thresh": 0.3,
    "center_thresh": 0.6,
    "boundary_thresh": 0.6,
    "z_sigma": 2.0,
    "xy_sigma": 1.0,
    "extent_z_sigma": 1.0,
    "extent_xy_sigma": 0.5,
    "seed_depth": 0.0,
    "min_volume": 50.0,
    "denoise_sigma": 0.0,
}


#: Voxel aspect (z spacing over the in-plane pixel size) of the stacks that the 3D
#: settings' lengths across slices (``z_sigma``, ``extent_z_sigma``) are tuned for: the
#: GoNuclear confocal crops (about 0.28 um between slices, 0.127 um pixels). With a
#: stack's ``scale`` they are converted to its slices. On those crops resampled in z,
#: every other slice and twice as many slices (3D F1 of 1135 / 1136), the converted
#: lengths gave 0.735 / 0.533 and 0.735 / 0.629 against 0.688 / 0.630 and 0.478 / 0.343
#: with the lengths left in slices (docs/benchmarks.md).
TUNED_ANISOTROPY = 2.2
Z_LENGTHS = ("z_sigma", "extent_z_sigma")


def anisotropy(scale) -> float:
    """z spacing over the in-plane pixel size (the mean of y and x) of a voxel size
    ``scale`` (z, y, x) in any one unit, e.g. a napari layer's ``scale`` (its last three
    values are taken)."""
    try:
        values = np.asarray(scale, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.size < 3 or not np.isfinite(values[-3:]).all() or (values[-3:] <= 0).any():
        raise ValueError(f"scale must be the voxel size (z, y, x), three positive numbers; got {scale!r}")
    z, y, x = values[-3:]
    return float(z / ((y + x) / 2))


def volume_thresholds(model: Sam, scale=None) -> dict[str, float]:
    """The model's settings for 3D instances (``recommended_thresholds(model, "auto",
    volume=True)``) with the lengths across slices converted from the z spacing they were
    tuned for (:data:`TUNED_ANISOTROPY`) to that of a stack of voxel size ``scale`` (z, y,
    x); None leaves them in slices as tuned."""
    params = recommended_thresholds(model, "auto", volume=True)
    if scale is not None:
        factor = TUNED_ANISOTROPY / anisotropy(scale)
        params.update({k: params[k] * factor for k in Z_LENGTHS})
    return params


def default_mode(model: Sam) -> str:
    """``"auto"`` for models with an instance head, else TinySAM's ``"hierarchical"``."""
    return "auto" if model.has_instance_head else "hierarchical"


def recommended_thresholds(model: Sam, mode: str | None = None, volume: bool = False) -> dict[str, float]:
    """Thresholds of ``mode`` (default: the model's default mode) for ``model``: the values
    tuned for it and stored in its checkpoint (``meta["everything"]`` for the point-grid
    modes, ``meta["auto"]`` for auto, ``meta["auto_volume"]`` for auto on whole stacks
    with ``volume``), else the generic defaults (SAM's for the grid modes).
    ``segment_everything`` and ``segment_volume`` use these for every threshold left at
    None."""
    mode = mode or default_mode(model)
    meta = getattr(model, "meta", None) or {}
    if mode == "auto" and volume:
        base, tuned = VOLUME_THRESHOLDS, meta.get("auto_volume", {})
    elif mode == "auto":
        base, tuned = AUTO_THRESHOLDS, meta.get("auto", {})
    else:
        base, tuned = dict(SAM_THRESHOLDS), meta.get("everything", {})
        if model.has_instance_head:
            base["background_thresh"] = BACKGROUND_THRESH
    return {k: float(tuned.get(k, v)) for k, v in base.items()}


def _check_params(mode: str, params: dict[str, Any], model: Sam) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if mode == "auto" and not model.has_instance_head:
        raise ValueError(
            "mode='auto' needs a model with an instance head (the bundled 'default' has one; "
            "official checkpoints have none); this model supports mode='hierarchical' and 'grid'"
        )
    if params["head_only"] and mode != "auto":
        raise ValueError("head_only=True applies to mode='auto' only")
    n = params["points_per_side"]
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"points_per_side must be a positive integer, got {n!r}")
    if mode == "hierarchical" and n < 4:
        raise ValueError(
            f"hierarchical mode needs points_per_side >= 4 (its first round uses "
            f"points_per_side / 4 per side), got {n}; use mode='grid' for coarser grids"
        )
    if params["points_per_batch"] < 1:
        raise ValueError("points_per_batch must be >= 1")
    for name in ("pred_iou_thresh", "stability_score_thresh", "min_agreement", "background_thresh"):
        if name in params and not 0.0 <= params[name] <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {params[name]}")
    if not 0.0 < params["box_nms_thresh"] <= 1.0:
        raise ValueError(f"box_nms_thresh must be in (0, 1], got {params['box_nms_thresh']}")
    if params["stability_score_offset"] <= 0:
        raise ValueError("stability_score_offset must be > 0")
    if params["min_mask_region_area"] < 0:
        raise ValueError("min_mask_region_area must be >= 0")
    if mode == "auto":
        check_head_params(params)


def _auto_masks(
    predictor: SamPredictor, params: dict[str, Any], gray: np.ndarray, raw: np.ndarray | None = None
) -> _Masks:
    """Everything mode ``"auto"``: instances of the head, each prompting the decoder once
    (positive point at its innermost pixel, and its box). A decoded mask replaces its head
    instance when its predicted IoU reaches ``pred_iou_thresh`` and it overlaps the
    instance by IoU >= ``min_agreement``; otherwise the head instance stays. With
    ``head_only`` the head instances are the result (no decoder). ``gray``: the image the
    model saw; ``raw``: the same before it was smoothed, if it was (its noise judges
    whether any object stands out, :func:`~napari_tinysam.instances.adjust_by_contrast`)."""
    model, emb = predictor.model, predictor._embedding
    maps = head_maps(model, emb)
    head = labels_from_maps(
        maps,
        params["foreground_thresh"],
        params["center_thresh"],
        params["boundary_thresh"],
        params["min_size"] * grid_cell_area(emb),
    )
    head = adjust_by_contrast(
        head, gray, params["min_contrast"], params["blob_contrast"], BLOB_MIN_CELLS * grid_cell_area(emb), raw
    )
    ids, points, boxes = object_prompts(head)
    decoded = [None] * len(ids) if params["head_only"] else decode_objects(predictor, points, boxes)
    out = _Masks()
    slices = ndimage.find_objects(head)
    for i, pt, dec in zip(ids, points, decoded):
        sl = slices[i - 1]
        place = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
        own = head[sl] == i
        crop, score = own, float(maps[0][sl][own].mean())
        if dec is not None and dec[2] >= params["pred_iou_thresh"]:
            mask, (y0, x0, y1, x1), iou = dec
            inter = mask[place[0] - y0 : place[2] - y0, place[1] - x0 : place[3] - x0] & own
            agreement = inter.sum() / (mask.sum() + own.sum() - inter.sum())
            tight = _tight(mask, y0, x0)
            if agreement >= params["min_agreement"] and tight is not None:
                crop, place = tight
                score = iou
        out.crops.append(crop)
        out.places.append(place)
        out.iou.append(score)
        out.stability.append(1.0)
        out.points.append((float(pt[0]), float(pt[1])))
    return out


def segment_everything(
    model_or_predictor: Sam | SamPredictor,
    image: np.ndarray,
    mode: str | None = None,
    points_per_side: int = 32,
    points_per_batch: int = 64,
    pred_iou_thresh: float | None = None,
    stability_score_thresh: float | None = None,
    stability_score_offset: float | None = None,
    high_score_thresh: float = 8.5,
    box_nms_thresh: float | None = None,
    min_mask_region_area: int = 0,
    head_only: bool = False,
    foreground_thresh: float | None = None,
    center_thresh: float | None = None,
    boundary_thresh: float | None = None,
    min_size: float | None = None,
    min_agreement: float | None = None,
    min_contrast: float | None = None,
    blob_contrast: float | None = None,
    background_thresh: float | None = None,
    return_records: bool = False,
    contrast_limits: tuple[float, float] | None = None,
    tile_shape: int | tuple[int, int] | None = None,
    halo: int | tuple[int, int] | None = None,
    input_size: int | None = None,
    denoise_sigma: float | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
):
    """Segment every object of a 2D image.

    Args:
        model_or_predictor: a ``Sam`` or a ``SamPredictor`` (whose embedding cache is used).
        image: (H, W) or (H, W, 3), any real dtype (scaled as ``SamPredictor.set_image``).
        mode: ``None`` picks ``"auto"`` for models with an instance head (the bundled
            ``default``) and ``"hierarchical"`` otherwise.
            ``"auto"``: the instance head's seeds and a seeded watershed give one
            instance per object; each prompts the mask decoder once (a point at its
            innermost pixel and its box); ``head_only=True`` skips the decoder.
            ``"grid"`` is SAM's automatic mask generator without crop layers: one
            positive point at every cell centre ((i + 0.5) / n) of an n x n grid, the
            three multimask outputs of each. ``"hierarchical"`` is TinySAM's strategy:
            round 1 prompts a sparse grid with n / 4 points per side; masks that pass the
            filters mark as covered the pixels where their logits exceed
            ``high_score_thresh``; round 2 prompts only the points of the dense n x n grid
            that are not covered. When the model has a head, neither round prompts points
            where it is confident of background (foreground probability below
            ``background_thresh``). Both rounds are merged
            before NMS and postprocessing. Unlike the reference, round 2 uses the dense
            grid's own points (the reference's sit at sparse points +/- a stride, off the
            grid), an image fully covered after round 1 simply has no round 2 (the
            reference crashes), and masks are filtered before they are upscaled.
        pred_iou_thresh, stability_score_thresh, stability_score_offset: SAM's filters.
        box_nms_thresh: IoU above which the lower-scored of two boxes is dropped.
        min_mask_region_area: islands and holes smaller than this (pixels) are removed.
        foreground_thresh, center_thresh, boundary_thresh: the head's seed and mask
            thresholds; min_size: smallest head instance, in low-resolution grid cells
            (4 x 4 model-input pixels); min_agreement: smallest IoU between a decoded mask
            and its head instance for the mask to replace it; min_contrast: head instances
            whose local contrast (mean inside minus the background ring around them) is
            below this fraction of the median object's are dropped as background texture;
            blob_contrast: objects the head misses (slivers of nuclei at the image
            border, small nuclei) are added from the image where it is this fraction of
            the median object's contrast above the background, clear of every object
            found (0: none; ``"auto"`` only).
        return_records: also return SAM-style records (not with tiling).
        tile_shape, halo: segment tile by tile (pixels; an int or (rows, columns)): each
            tile grown by ``halo`` on every side is segmented on its own at the model's
            usual scaling, and an object is kept by the tile whose inner part holds its
            centroid. ``None`` in ``"auto"`` mode: an image larger than the model's input
            is tiled when the instance head finds its objects too small at the
            whole-image scale (narrower than ``MIN_OBJECT_INPUT_PX`` model-input
            pixels), with tiles sized from the objects' median width.
        input_size: the square model input (pixels, a multiple of 16) at which an image,
            or each tile, is embedded when it fills the model's input (its longest side
            brought to ``img_size`` rather than enlarged by at most ``max_upscale``);
            smaller images keep their scale, and tiles are sized at ``img_size``.
            ``None``: in ``"auto"`` mode the model's tuned value
            (``meta["auto"]["input_size"]``; the bundled model embeds at 896 what it
            prompts at 768), else the model's own ``img_size``. TinyViT models only.
        denoise_sigma: smooth the image in its plane by a Gaussian of this many pixels
            before the model sees it (0: not at all). ``None``: in ``"auto"`` mode chosen
            from the image's pixel noise (:func:`auto_denoise_sigma`: none for clean
            fields, more the noisier the image), else 0.
        progress: ``progress(done, total)`` after each tile (1 of 1 without tiling).
        cancel: checked before the image and before each tile; when it returns True,
            :class:`Cancelled` is raised (nothing partial is returned).

    Every threshold left at ``None`` takes the model's tuned value for the mode (see
    :func:`recommended_thresholds`); SAM's values only for models that store none.

    Returns:
        An (H, W) int32 label image, 0 = background, ids 1..N in order of decreasing
        predicted IoU. Where masks overlap, the mask with the higher predicted IoU wins
        the pixel; a mask left with less than :data:`MIN_KEPT` of its pixels is dropped,
        not shown as a sliver. With ``return_records``: (labels, records), one record per id, each
        with segmentation (H, W) bool (the mask before overlaps were resolved), area,
        bbox (XYWH), predicted_iou, stability_score, point_coords and label.
    """
    predictor = model_or_predictor if isinstance(model_or_predictor, SamPredictor) else SamPredictor(model_or_predictor)
    model = predictor.model
    mode = mode or default_mode(model)
    given = dict(
        pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_score_thresh,
        stability_score_offset=stability_score_offset,
        box_nms_thresh=box_nms_thresh,
        foreground_thresh=foreground_thresh,
        center_thresh=center_thresh,
        boundary_thresh=boundary_thresh,
        min_size=min_size,
        min_agreement=min_agreement,
        min_contrast=min_contrast,
        blob_contrast=blob_contrast,
        background_thresh=background_thresh,
    )
    params = {**SAM_THRESHOLDS, **(recommended_thresholds(model, mode) if mode in MODES else {})}
    params.update({k: v for k, v in given.items() if v is not None})
    params.update(
        points_per_side=points_per_side,
        points_per_batch=points_per_batch,
        high_score_thresh=high_score_thresh,
        min_mask_region_area=min_mask_region_area,
        head_only=head_only,
        input_size=input_size,
    )
    _check_params(mode, params, model)
    tiles = _check_tiling(tile_shape, halo, return_records)
    if denoise_sigma is not None and not denoise_sigma >= 0:
        raise ValueError(f"denoise_sigma must be >= 0 (pixels; 0: no smoothing), got {denoise_sigma}")
    rgb = to_uint8_rgb(image, contrast_limits)
    h, w = rgb.shape[:2]
    if rgb.min() == rgb.max():  # a constant image holds no objects
        labels = np.zeros((h, w), np.int32)
        return (labels, []) if return_records else labels
    sigma = denoise_sigma if denoise_sigma is not None else auto_denoise_sigma(rgb) if mode == "auto" else 0.0
    raw = None
    if sigma > 0:
        raw, rgb = rgb.mean(-1, dtype=np.float32), denoised_rgb(image, sigma, contrast_limits)
    _check_cancel(cancel, "before the image")
    if tiles is None and mode == "auto" and max(h, w) > model.img_size and not return_records:
        tiles = _tiles_for_small_objects(predictor, rgb, params)
    if tiles is not None:
        return _segment_tiled(predictor, rgb, mode, params, *tiles, progress, cancel, raw=raw)
    masks = _segment_masks(predictor, rgb, mode, params, raw=raw)
    if progress is not None:
        progress(1, 1)
    labels, ids = paint_labels(masks.crops, masks.places, np.array(masks.iou), (h, w), MIN_KEPT)
    if not return_records:
        return labels
    records = []
    for i in np.argsort([-v for v in masks.iou], kind="stable"):
        if ids[i] == 0:
            continue
        y0, x0, y1, x1 = masks.places[i]
        seg = np.zeros((h, w), bool)
        seg[y0:y1, x0:x1] = masks.crops[i]
        records.append(
            {
                "segmentation": seg,
                "area": int(masks.crops[i].sum()),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "predicted_iou": masks.iou[i],
                "stability_score": masks.stability[i],
                "point_coords": [list(masks.points[i])],
                "label": ids[i],
            }
        )
    return labels, records


def auto_input_size(model: Sam) -> int:
    """The square input at which auto mode embeds images that fill the model's input: the
    value tuned for the model (``meta["auto"]["input_size"]``), else its own input size."""
    meta = getattr(model, "meta", None) or {}
    return int(meta.get("auto", {}).get("input_size", model.img_size))


def _sized_predictor(
    predictor: SamPredictor, shape: tuple[int, int], mode: str, input_size: int | None
) -> SamPredictor:
    """The predictor that segments an image or a tile of ``shape``: at ``input_size`` (None:
    :func:`auto_input_size` in auto mode) when the image fills the model's input (its
    longest side brought to ``img_size``, not held back by ``max_upscale``), sharing the
    predictor's embedding cache; otherwise ``predictor`` itself. Smaller images (slices
    of stacks) are embedded at the scale they have either way."""
    model = predictor.model
    if input_size is None:
        if mode != "auto":
            return predictor
        input_size = auto_input_size(model)
    if input_size == model.img_size:
        return predictor
    limit = model.max_upscale
    if limit is not None and max(shape) * limit <= model.img_size:
        return predictor
    return SamPredictor(model.at_input_size(input_size), cache=predictor.cache)


@torch.no_grad()
def _segment_masks(
    predictor: SamPredictor, rgb: np.ndarray, mode: str, params: dict[str, Any], raw: np.ndarray | None = None
) -> _Masks:
    """Candidate masks of one uint8 RGB image (no tiling) or tile, filtered and NMS'd;
    ``raw``: its grey image before it was smoothed, if it was (auto mode)."""
    h, w = rgb.shape[:2]
    predictor = _sized_predictor(predictor, (h, w), mode, params["input_size"])
    model = predictor.model
    predictor.set_image(rgb)
    scale = np.array([w, h], dtype=np.float64)
    dense = build_point_grid(params["points_per_side"]) * scale
    if mode == "auto":
        masks = _auto_masks(predictor, params, rgb.mean(-1, dtype=np.float32), raw)
    elif mode == "grid":
        masks = _candidates_from_points(predictor, dense, params, None)
    else:
        coverage = np.zeros((h, w), bool)
        sparse = build_point_grid(max(1, params["points_per_side"] // 4)) * scale
        foreground = head_maps(model, predictor._embedding)[0] if model.has_instance_head else None

        def pixels(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return (np.clip(points[:, 1].astype(np.int64), 0, h - 1), np.clip(points[:, 0].astype(np.int64), 0, w - 1))

        def background(points: np.ndarray) -> np.ndarray:
            """Points where the head is confident of background (none without a head)."""
            if foreground is None:
                return np.zeros(len(points), bool)
            return foreground[pixels(points)] < params["background_thresh"]

        masks = _candidates_from_points(predictor, sparse[~background(sparse)], params, coverage)
        remaining = dense[~(coverage[pixels(dense)] | background(dense))]
        if len(remaining):
            masks.extend(_candidates_from_points(predictor, remaining, params, None))
    return _postprocess(masks, params, nms=not (mode == "auto" and params["head_only"]))


#: Objects narrower than this many model-input pixels (6 cells of the low-resolution
#: grid) at the whole-image scale are too small for the model: everything mode then tiles.
MIN_OBJECT_INPUT_PX = 24.0
#: Tiles are scaled so that a typical object is about this wide in model-input pixels
#: (the size of the nuclei the bundled model was trained on).
TARGET_OBJECT_INPUT_PX = 32.0


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 0 for v in pair):
        raise ValueError(f"{name} must be a non-negative integer or a pair of them (rows, columns), got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_tiling(tile_shape, halo, return_records: bool):
    """(tile, halo) pairs from the user's settings, or None for automatic tiling."""
    if tile_shape is None:
        if halo is not None:
            raise ValueError("halo needs tile_shape (the tile's size without its halo)")
        return None
    tile = _pair(tile_shape, "tile_shape")
    if min(tile) < 32:
        raise ValueError(f"tile_shape must be at least 32 pixels per side, got {tile_shape!r}")
    if return_records:
        raise ValueError("return_records is not available with tiling; use the label image")
    return tile, _pair(0 if halo is None else halo, "halo")


def head_widths(predictor: SamPredictor, rgb: np.ndarray, params: dict[str, Any]) -> tuple[float, float]:
    """Median width (image pixels; 0 when the head finds nothing) of the head's instances
    in ``rgb``, and the image's scale (model-input pixels per image pixel)."""
    predictor.set_image(rgb)
    emb = predictor._embedding
    head = head_only_labels(predictor.model, emb, **{k: params[k] for k in HEAD_THRESHOLDS})
    areas = np.bincount(head.ravel())[1:]
    areas = areas[areas > 0]
    width = 2.0 * np.sqrt(np.median(areas) / np.pi) if len(areas) else 0.0
    return float(width), emb.input_size[0] / rgb.shape[0]


def upscale_for_width(model: Sam, width: float, shape: tuple[int, int]) -> float:
    """The scale (model-input pixels per image pixel) at which objects ``width`` image
    pixels wide become about ``TARGET_OBJECT_INPUT_PX`` wide, between the whole-image scale
    of an image of ``shape`` and the model's ``max_upscale`` (1 when no width is known)."""
    upscale = TARGET_OBJECT_INPUT_PX / width if width else 1.0
    return min(max(upscale, model.img_size / max(shape)), model.max_upscale or 1.0)


def _tiles_for_small_objects(predictor: SamPredictor, rgb: np.ndarray, params: dict[str, Any]):
    """Tiles (tile, halo) when the instance head finds the objects of an image larger than
    the model's input too small at the whole-image scale (median width under
    ``MIN_OBJECT_INPUT_PX``), or finds none; None when the whole image is fine.

    The objects' width is then measured again on a centre crop at full resolution (at the
    whole-image scale they are too small to measure), and tiles are sized so that a
    typical object becomes about ``TARGET_OBJECT_INPUT_PX`` wide (at most the model's
    ``max_upscale``), with a halo of 1.5 object widths."""
    model = predictor.model
    h, w = rgb.shape[:2]
    width, scale = head_widths(predictor, rgb, params)
    if width * scale >= MIN_OBJECT_INPUT_PX:
        return None
    side = min(model.img_size, h, w)
    y, x = (h - side) // 2, (w - side) // 2
    width, _ = head_widths(predictor, np.ascontiguousarray(rgb[y : y + side, x : x + side]), params)
    tile_side = int(model.img_size / upscale_for_width(model, width, (h, w)))  # with its halo: the model's input
    margin = min(int(np.ceil(1.5 * width)) if width else tile_side // 8, tile_side // 4)
    inner = tile_side - 2 * margin
    return (inner, inner), (margin, margin)


def _segment_tiled(predictor, rgb, mode, params, tile, halo, progress, cancel=None, raw=None) -> np.ndarray:
    """Everything mode tile by tile: each tile with its halo is segmented on its own; an
    object belongs to the tile whose inner part holds its centroid, so objects cut by one
    tile's edge come whole from the neighbour whose halo holds them, and none twice.
    Objects are painted in tile order without overwriting earlier ones; one left with less
    than :data:`MIN_KEPT` of its pixels is dropped."""
    (th, tw) = tile
    starts = _tile_starts(rgb.shape[:2], tile, halo)
    out = np.zeros(rgb.shape[:2], np.int32)
    next_id = 1
    for k, ((y, x), (y0, x0, y1, x1)) in enumerate(starts):
        _check_cancel(cancel, f"before tile {k + 1} of {len(starts)}")
        crop = rgb[y0:y1, x0:x1]
        if crop.min() != crop.max():
            part = None if raw is None else np.ascontiguousarray(raw[y0:y1, x0:x1])
            masks = _segment_masks(predictor, np.ascontiguousarray(crop), mode, params, raw=part)
            labels, _ = paint_labels(masks.crops, masks.places, np.array(masks.iou), crop.shape[:2], MIN_KEPT)
            next_id = _place_tile(out, labels, (y0, x0), (y, x, th, tw), next_id)
        if progress is not None:
            progress(k + 1, len(starts))
    # ids of objects that lost every pixel to earlier ones are dropped: renumber 1..N
    return keep_objects(out, np.bincount(out.ravel(), minlength=next_id) > 0)


def _tile_starts(shape: tuple[int, int], tile: tuple[int, int], halo: tuple[int, int]):
    """Each tile of a plane of ``shape``: its inner part (y, x) and its extent with the
    halo (y0, x0, y1, x1)."""
    (h, w), (th, tw), (hy, hx) = shape, tile, halo
    return [
        ((y, x), (max(0, y - hy), max(0, x - hx), min(h, y + th + hy), min(w, x + tw + hx)))
        for y in range(0, h, th)
        for x in range(0, w, tw)
    ]


def _place_tile(
    out: np.ndarray, labels: np.ndarray, origin: tuple[int, int], inner: tuple[int, int, int, int], next_id: int
) -> int:
    """Paint into ``out`` (2D, or 3D with the tiles in its last two axes) the objects of
    one tile's ``labels`` (ids 1..n; the tile with its halo starts at ``origin`` in the
    plane) whose centroid lies in the tile's inner part (y, x, height, width), under new
    ids from ``next_id``, without overwriting earlier objects; one left with less than
    :data:`MIN_KEPT` of its pixels is dropped. Returns the next free id."""
    n = int(labels.max())
    if not n:
        return next_id
    (y0, x0), (y, x, th, tw) = origin, inner
    centres = np.array(ndimage.center_of_mass(labels > 0, labels, np.arange(1, n + 1)))
    cy, cx = centres[:, -2] + y0, centres[:, -1] + x0
    own = (cy >= y) & (cy < y + th) & (cx >= x) & (cx < x + tw)
    lut = np.zeros(n + 1, np.int32)
    lut[1:][own] = np.arange(next_id, next_id + int(own.sum()))
    next_id += int(own.sum())
    region = out[..., y0 : y0 + labels.shape[-2], x0 : x0 + labels.shape[-1]]
    new = lut[labels]
    free = (new > 0) & (region == 0)
    # as within a tile: an object mostly under earlier tiles' objects is dropped
    whole = np.bincount(new.ravel(), minlength=next_id)
    kept = np.bincount(new[free], minlength=next_id)
    free &= shows_enough(kept, whole, MIN_KEPT)[new]
    region[free] = new[free]
    return next_id


def denoise_slice(image: np.ndarray, sigma: float) -> np.ndarray:
    """A slice (H, W) or (H, W, C) smoothed in the image plane by a Gaussian of ``sigma``
    pixels (float32), or returned unchanged for ``sigma`` 0."""
    image = np.asarray(image)
    if sigma <= 0:
        return image
    sigmas = (sigma, sigma) + (0,) * (image.ndim - 2)
    return ndimage.gaussian_filter(image.astype(np.float32), sigmas)


def denoised_rgb(image: np.ndarray, sigma: float, contrast_limits=None) -> np.ndarray:
    """The uint8 RGB image the model sees of ``image`` (2D or RGB) smoothed in its plane by
    ``sigma`` pixels (:func:`denoise_slice`; 0: not at all), scaled as :func:`to_uint8_rgb`
    scales the smoothed image (by its own percentiles without ``contrast_limits``). An
    8-bit RGB image without contrast limits, which is used as it is, is smoothed as it is."""
    image = np.asarray(image)
    if sigma > 0 and contrast_limits is None and image.dtype == np.uint8 and image.ndim == 3:
        return to_uint8_rgb(np.clip(np.rint(denoise_slice(image[..., :3], sigma)), 0, 255).astype(np.uint8))
    return to_uint8_rgb(denoise_slice(image, sigma), contrast_limits)


#: Auto mode smooths a noisy image before the model sees it (:func:`auto_denoise_sigma`):
#: with the pixel noise of the 8-bit image the model is given (grey levels, 0-255 between
#: the contrast limits) at or under ``NOISE_FREE_LEVELS`` nothing is done; above, a
#: Gaussian of ``noise / LEVELS_PER_SIGMA`` pixels, at most ``MAX_DENOISE_SIGMA``.
#: Chosen on noisy training fields and clean training images (docs/benchmarks.md).
NOISE_FREE_LEVELS = 6.0
LEVELS_PER_SIGMA = 13.0
MAX_DENOISE_SIGMA = 3.0


def auto_denoise_sigma(rgb: np.ndarray) -> float:
    """The smoothing (Gaussian sigma, pixels) that auto mode gives an image from the pixel
    noise of its uint8 (H, W, 3) version (:func:`~napari_tinysam.instances.pixel_noise`):
    0 for images whose noise stays under :data:`NOISE_FREE_LEVELS` grey levels (the
    fields of a good camera, whose objects the model finds as they are), more the noisier
    the image (the head takes strong pixel noise for texture and finds nothing)."""
    noise = pixel_noise(rgb.mean(-1, dtype=np.float32))
    if noise <= NOISE_FREE_LEVELS:
        return 0.0
    return float(min(noise / LEVELS_PER_SIGMA, MAX_DENOISE_SIGMA))


def volume_contrast_limits(
    stack, percentiles=(0.5, 99.5), max_slices: int = 8, max_samples: int = 2_000_000, denoise_sigma: float = 0.0
):
    """Contrast limits for a whole stack, so that every slice is scaled the same way:
    percentiles of up to ``max_slices`` evenly spaced slices (subsampled to at most
    ``max_samples`` values), each smoothed first when ``denoise_sigma`` > 0 (as
    :func:`volume_head_maps` sees them). Reads only those slices, so it works on Zarr and
    dask arrays too."""
    idx = np.unique(np.linspace(0, stack.shape[0] - 1, min(stack.shape[0], max_slices)).astype(int))
    sample = np.stack([denoise_slice(stack[int(i)], denoise_sigma) for i in idx]).reshape(-1)
    if sample.size > max_samples:
        sample = sample[:: sample.size // max_samples + 1]
    lo, hi = np.percentile(sample, percentiles)
    return float(lo), float(hi)


def check_volume(stack) -> bool:
    """Validate a (Z, H, W) or RGB (Z, H, W, 3) stack (an array or its shape); returns
    whether it is RGB."""
    shape = tuple(stack) if isinstance(stack, tuple) else tuple(stack.shape)
    if len(shape) == 4 and shape[-1] in (3, 4):
        return True
    if len(shape) == 3:
        return False
    raise ValueError(
        f"expected a (Z, H, W) stack or an RGB (Z, H, W, 3) stack, got shape {shape}; "
        "for data with more axes (time, channels) pass one 3D stack, e.g. data[t] or data[:, c]"
    )


def link_slice(
    previous: np.ndarray | None,
    labels: np.ndarray,
    next_id: int,
    stitch: bool,
    stitch_iou: float,
    before: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Give one slice's labels (ids 1..n) volume-wide ids: linked to ``previous`` (the
    slice before, already relabelled) when ``stitch``, otherwise offset to be unique.
    With ``before`` (the slice two back), an object that ``previous`` does not continue
    can still continue an object of ``before`` that ``previous`` lost (a nucleus missed
    in one slice keeps its id). Returns the relabelled slice and the next free id."""
    if not (stitch and previous is not None):
        out = np.where(labels > 0, labels + next_id - 1, 0).astype(np.int32)
        return out, (int(out.max()) + 1 if out.max() > 0 else next_id)
    out, new_next = stitch_pair(previous, labels, next_id, stitch_iou)
    if before is None:
        return out, new_next
    fresh = out >= next_id
    lost = np.setdiff1d(np.unique(before[before > 0]), np.unique(previous))
    if not fresh.any() or len(lost) == 0:
        return out, new_next
    candidates = np.where(np.isin(before, lost), before, 0)
    relinked, new_next = stitch_pair(candidates, np.where(fresh, out, 0), next_id, stitch_iou)
    out[fresh] = relinked[fresh]
    return out, new_next


def link_volume(labels: np.ndarray, stitch_iou: float = 0.5) -> np.ndarray:
    """Link per-slice labels (Z, H, W), ids 1..n in each slice, into volume-wide ids, in
    place (as ``segment_volume`` does); returns the array."""
    next_id = 1
    for z in range(labels.shape[0]):
        labels[z], next_id = link_slice(
            labels[z - 1] if z else None, labels[z], next_id, True, stitch_iou, labels[z - 2] if z > 1 else None
        )
    return labels


def slice_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keywords of :func:`segment_everything` for the slices of a stack segmented one by
    one: without the missed-object pass unless ``blob_contrast`` is given. In noisy
    stacks it takes specks of noise in single slices for objects: the per-slice 3D F1 on
    the GoNuclear training crops 1135 / 1136 fell from 0.093 / 0.045 to 0.012 / 0.005
    with it (docs/benchmarks.md)."""
    return {**kwargs, "blob_contrast": kwargs.get("blob_contrast") or 0.0}


def segment_volume(
    model: Sam | SamPredictor,
    stack: np.ndarray,
    mode: str | None = None,
    stitch: bool = True,
    stitch_iou: float = 0.5,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    contrast_limits: tuple[float, float] | None = None,
    per_slice: bool = False,
    scale=None,
    **kwargs,
) -> np.ndarray:
    """Everything mode on a (Z, H, W) or (Z, H, W, 3) stack.

    Slices are scaled with the same contrast limits (given, or the stack's 0.5 / 99.5
    percentiles). In ``"auto"`` mode (the default for models with an instance head) the
    head's maps of every slice are smoothed across slices and turned into 3D instances by
    a seeded watershed in 3D (:func:`volume_from_maps`; keywords ``foreground_thresh``,
    ``center_thresh``, ``boundary_thresh``, ``z_sigma``, ``xy_sigma``, ``extent_z_sigma``,
    ``extent_xy_sigma``, ``seed_depth``, ``min_volume``, ``denoise_sigma``, None = the
    model's tuned values for stacks; ``denoise_sigma`` smooths each slice in its plane
    before the head sees it, and the percentiles are then taken of the smoothed slices).
    ``scale``: the voxel size (z, y, x) in any one unit (a napari layer's ``scale``);
    given, the model's smoothing across slices is converted from the z spacing it was
    tuned for (:data:`TUNED_ANISOTROPY`) to this stack's, so finely or coarsely sampled
    stacks are smoothed over the same depth; keywords given explicitly are in this
    stack's slices and are used as they are. Slices larger than the model's input whose
    objects the head finds too small at the whole-slice scale are tiled in the plane
    (:func:`volume_tiles`; ``tile_shape`` / ``halo`` in pixels set the tiles by hand):
    each tile with its halo through every slice is segmented as a stack of its own, and
    an object belongs to the tile whose inner part holds its centroid.

    Other modes, or ``per_slice=True``, segment every slice with
    :func:`segment_everything` (extra keywords go there; ``blob_contrast`` defaults to 0
    there, :func:`slice_keywords`) and, with ``stitch=True``, link
    objects of neighbouring slices by one-to-one matching (Hungarian, IoU >=
    ``stitch_iou``), so an object spanning several slices has one id; otherwise ids are
    unique per volume but not linked (``scale`` plays no part there).

    ``progress(done, total)`` is called after each slice; ``cancel()`` is checked before
    each slice and a ``True`` raises :class:`Cancelled` (nothing partial is returned).
    Returns (Z, H, W) int32 labels.
    """
    stack = np.asarray(stack)
    check_volume(stack)
    if not 0.0 < stitch_iou <= 1.0:
        raise ValueError(f"stitch_iou must be in (0, 1], got {stitch_iou}")
    if scale is not None:
        anisotropy(scale)  # checked before any slice is read
    predictor = model if isinstance(model, SamPredictor) else SamPredictor(model)
    if (mode or default_mode(predictor.model)) == "auto" and not per_slice:
        return _volume_auto(predictor, stack, contrast_limits, kwargs, progress, cancel, scale)
    limits = contrast_limits or volume_contrast_limits(stack)
    z = stack.shape[0]
    out = np.zeros(stack.shape[:3], np.int32)
    next_id = 1
    for i in range(z):
        _check_cancel(cancel, f"before slice {i} of {z}")
        lab = segment_everything(predictor, stack[i], mode=mode, contrast_limits=limits, **slice_keywords(kwargs))
        out[i], next_id = link_slice(
            out[i - 1] if i else None, lab, next_id, stitch, stitch_iou, out[i - 2] if i > 1 else None
        )
        if progress is not None:
            progress(i + 1, z)
    return out


def _volume_auto(
    predictor: SamPredictor, stack: np.ndarray, contrast_limits, kwargs: dict, progress, cancel, scale=None
) -> np.ndarray:
    kwargs = dict(kwargs)
    tiles = _check_tiling(kwargs.pop("tile_shape", None), kwargs.pop("halo", None), False)
    params = volume_params(predictor.model, kwargs, scale)
    sigma = params.pop("denoise_sigma")
    limits = contrast_limits or volume_contrast_limits(stack, denoise_sigma=sigma)
    if tiles is None:
        tiles = volume_tiles(predictor, stack, limits, sigma)
    if tiles is None:
        return volume_from_maps(volume_head_maps(predictor, stack, limits, progress, cancel, sigma), **params)
    # tile by tile, each tile (with its halo) through every slice: the head sees small
    # objects at a scale it finds them at, and the maps of one tile are in memory at a time
    z = stack.shape[0]
    starts = _tile_starts(stack.shape[1:3], *tiles)
    out = np.zeros(stack.shape[:3], np.int32)
    next_id = 1
    for k, ((y, x), (y0, x0, y1, x1)) in enumerate(starts):
        done = k * z
        step = None if progress is None else (lambda i, _n, done=done: progress(done + i, z * len(starts)))
        maps = volume_head_maps(predictor, stack[:, y0:y1, x0:x1], limits, step, cancel, sigma)
        next_id = _place_tile(out, volume_from_maps(maps, **params), (y0, x0), (y, x, *tiles[0]), next_id)
    return keep_objects(out, np.bincount(out.ravel(), minlength=next_id) > 0)


def volume_tiles(predictor: SamPredictor, stack: np.ndarray, limits, denoise_sigma: float):
    """Tiles (tile, halo) in the plane for a stack whose slices are larger than the
    model's input and whose objects the instance head finds too small at the whole-slice
    scale, as :func:`segment_everything` tiles a large image (measured on the middle
    slice, as the head sees it); None when whole slices are fine."""
    model = predictor.model
    if max(stack.shape[1:3]) <= model.img_size:
        return None
    middle = denoised_rgb(stack[stack.shape[0] // 2], denoise_sigma, limits)
    if middle.min() == middle.max():
        return None
    return _tiles_for_small_objects(predictor, middle, recommended_thresholds(model, "auto"))


def volume_params(model: Sam, kwargs: dict[str, Any], scale=None) -> dict[str, float]:
    """The settings of 3D instances from the head's maps for ``model``: its tuned values
    for stacks (converted to the voxel size ``scale``, :func:`volume_thresholds`) with the
    keywords of :data:`VOLUME_THRESHOLDS` given in ``kwargs`` (not None) in their place;
    ``denoise_sigma`` among them. Checked: a model without a head, an unknown keyword or
    a bad value raise here, before any slice is read."""
    if not model.has_instance_head:
        _check_params("auto", {}, model)  # raises: names the modes this model supports
    # segment_everything's settings (decoder filters, 2D sizes) are accepted so that one
    # set of settings serves both scopes, but the 3D path does not use them
    unknown = set(kwargs) - set(VOLUME_THRESHOLDS) - set(inspect.signature(segment_everything).parameters)
    if unknown:
        raise TypeError(
            f"segment_volume got unexpected keyword arguments {sorted(unknown)} for mode='auto'; "
            f"it takes {sorted(VOLUME_THRESHOLDS)} (or per_slice=True for segment_everything's)"
        )
    params = volume_thresholds(model, scale)
    params.update({k: float(v) for k, v in kwargs.items() if k in VOLUME_THRESHOLDS and v is not None})
    check_seed_thresholds(params)
    for name in (
        "z_sigma",
        "xy_sigma",
        "extent_z_sigma",
        "extent_xy_sigma",
        "seed_depth",
        "min_volume",
        "denoise_sigma",
    ):
        if params[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {params[name]}")
    return params


def volume_head_maps(
    predictor: SamPredictor,
    stack: np.ndarray,
    limits: tuple[float, float],
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    denoise_sigma: float = 0.0,
) -> np.ndarray:
    """The instance head's maps of every slice, (3, Z, H, W) float16, each slice smoothed
    in its plane by a Gaussian of ``denoise_sigma`` pixels (:func:`denoise_slice`) and
    scaled by ``limits``; a constant slice is background. ``progress`` after each slice,
    ``cancel`` checked before each (raises :class:`Cancelled`)."""
    model = predictor.model
    z, h, w = stack.shape[:3]
    maps = np.zeros((3, z, h, w), np.float16)
    for i in range(z):
        _check_cancel(cancel, f"before slice {i} of {z}")
        rgb = denoised_rgb(stack[i], denoise_sigma, limits)
        if rgb.min() == rgb.max():
            maps[0, i], maps[1:, i] = 0.0, 1.0
        else:
            predictor.set_image(rgb)
            maps[:, i] = head_maps(model, predictor._embedding)
        if progress is not None:
            progress(i + 1, z)
    return maps


def smooth_maps(maps: np.ndarray, z_sigma: float, xy_sigma: float) -> np.ndarray:
    """The head's maps of a stack (3, Z, H, W) smoothed by a Gaussian of ``z_sigma`` slices
    and ``xy_sigma`` pixels, float32."""
    return np.stack([ndimage.gaussian_filter(m.astype(np.float32), (z_sigma, xy_sigma, xy_sigma)) for m in maps])


def volume_instances(maps: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The 3D instances of :func:`volume_from_maps` (``params``: its keywords) before
    stacked objects are cut, and the maps (3, Z, H, W) they were grown over."""
    z_sigma, xy_sigma = params["z_sigma"], params["xy_sigma"]
    seed_maps = smooth_maps(maps, z_sigma, xy_sigma)
    ez = params.get("extent_z_sigma")
    exy = params.get("extent_xy_sigma")
    ez, exy = z_sigma if ez is None else ez, xy_sigma if exy is None else exy
    extent = seed_maps if (ez, exy) == (z_sigma, xy_sigma) else smooth_maps(maps, ez, exy)
    labels = labels_from_maps(
        seed_maps,
        params["foreground_thresh"],
        params["center_thresh"],
        params["boundary_thresh"],
        params["min_volume"],
        seed_depth=params.get("seed_depth", 0.0),
        extent_maps=None if extent is seed_maps else extent,
    )
    return labels, extent


def volume_from_maps(
    maps: np.ndarray,
    foreground_thresh: float,
    center_thresh: float,
    boundary_thresh: float,
    z_sigma: float,
    xy_sigma: float,
    min_volume: float,
    extent_z_sigma: float | None = None,
    extent_xy_sigma: float | None = None,
    seed_depth: float = 0.0,
) -> np.ndarray:
    """3D instance labels (Z, H, W) int32 from the head's maps of every slice (3, Z, H, W):
    seeds from the maps smoothed with a Gaussian of ``z_sigma`` slices and ``xy_sigma``
    pixels, grown by a seeded watershed in 3D (:func:`labels_from_maps`) over the maps
    smoothed with ``extent_z_sigma`` and ``extent_xy_sigma`` (default: the same). A seed
    region splits at centre-distance minima at least ``seed_depth`` deep (0: one seed per
    connected region). Objects under ``min_volume`` voxels are dropped; objects are cut
    where their cross-section rises again through z (:func:`split_stacked_objects`: a
    nucleus above or below joined to them by the smoothing) and lose thin tails."""
    params = dict(
        foreground_thresh=foreground_thresh,
        center_thresh=center_thresh,
        boundary_thresh=boundary_thresh,
        z_sigma=z_sigma,
        xy_sigma=xy_sigma,
        min_volume=min_volume,
        extent_z_sigma=extent_z_sigma,
        extent_xy_sigma=extent_xy_sigma,
        seed_depth=seed_depth,
    )
    labels, _ = volume_instances(maps, params)
    return split_stacked_objects(labels, min_volume)
