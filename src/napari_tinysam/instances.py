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
from .predictor import ImageEmbedding, SamPredictor, predict_batch

#: Post-processing thresholds of the head (used when a model stores no tuned values).
HEAD_THRESHOLDS = {
    "foreground_thresh": 0.5,
    "center_thresh": 0.5,
    "boundary_thresh": 0.5,
    "min_size": 0.5,
}


@torch.no_grad()
def head_maps(model: Sam, embedding: ImageEmbedding) -> np.ndarray:
    """The head's three probability maps at the image's own resolution, (3, H, W) float32:
    the grid output mapped back exactly as masks are (resize to the padded input, crop to
    the valid part, resize to the original size)."""
    probs = model.instance_maps(embedding.features)[0].float().cpu()
    s, low = model.img_size, probs.shape[-1]
    (h, w), (ih, iw) = embedding.original_size, embedding.input_size
    ry = _upscale_matrix(low, s, ih, h)
    rx = _upscale_matrix(low, s, iw, w)
    return (ry @ probs @ rx.T).numpy()


def grid_cell_area(embedding: ImageEmbedding) -> float:
    """Area in image pixels of one cell of the low-resolution grid (4 x 4 input pixels)."""
    (h, w), (ih, iw) = embedding.original_size, embedding.input_size
    return 16.0 * (h / ih) * (w / iw)


def labels_from_maps(
    maps: np.ndarray,
    foreground_thresh: float,
    center_thresh: float,
    boundary_thresh: float,
    min_area: float,
) -> np.ndarray:
    """Seeded watershed on the boundary-distance map inside the foreground, seeds where
    both distances are below their thresholds; objects under ``min_area`` pixels are
    dropped. Returns int32 labels 1..N."""
    from skimage.segmentation import watershed

    fg = maps[0] > foreground_thresh
    seeds, n = ndimage.label((maps[1] < center_thresh) & (maps[2] < boundary_thresh) & fg)
    if n == 0:
        return np.zeros(fg.shape, np.int32)
    labels = watershed(maps[2], seeds, mask=fg)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_area
    keep[0] = False
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[labels]


def check_head_params(params: dict[str, Any]) -> None:
    for name in ("foreground_thresh", "center_thresh", "boundary_thresh"):
        if not 0.0 < params[name] < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {params[name]}")
    if params["min_size"] < 0:
        raise ValueError(f"min_size must be >= 0, got {params['min_size']}")


def head_only_labels(model: Sam, embedding: ImageEmbedding, **params) -> np.ndarray:
    """Head-only instance labels (H, W) int32 of an embedded image. ``min_size`` is in
    grid cells (one cell = 4 x 4 model-input pixels), so it follows the image's scale."""
    p = {**HEAD_THRESHOLDS, **{k: v for k, v in params.items() if v is not None}}
    maps = head_maps(model, embedding)
    return labels_from_maps(
        maps, p["foreground_thresh"], p["center_thresh"], p["boundary_thresh"],
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
    return np.array(ids, np.int64), np.array(points, np.float64).reshape(-1, 2), np.array(boxes, np.float64).reshape(-1, 4)


@torch.no_grad()
def decode_objects(
    predictor: SamPredictor,
    points: np.ndarray,
    boxes: np.ndarray | None,
    chunk: int = 16,
    margin: float = 0.5,
) -> list[tuple[np.ndarray, tuple[int, int, int, int], float] | None]:
    """One single-mask decode (token 0) per object: a positive point and, when given, its
    box. Each result is (bool crop, (y0, x0, y1, x1), predicted IoU), upscaled only inside
    the object's box grown by ``margin`` of its size, or None when the mask is empty."""
    model = predictor.model
    emb = predictor._require_embedding()
    h, w = emb.original_size
    s = model.img_size
    low_side = s // 4
    ry = _upscale_matrix(low_side, s, emb.input_size[0], h)
    rx = _upscale_matrix(low_side, s, emb.input_size[1], w)
    out: list = []
    for start in range(0, len(points), chunk):
        pts = points[start : start + chunk]
        bx = None if boxes is None else boxes[start : start + chunk]
        low, iou = predict_batch(predictor, pts[:, None], np.ones((len(pts), 1)), bx)
        low, iou = low[:, 0], iou[:, 0]
        for j in range(len(pts)):
            if bx is not None:
                x0, y0, x1, y1 = bx[j]
            else:
                x0 = x1 = pts[j, 0]
                y0 = y1 = pts[j, 1]
            my = max(8.0, margin * (y1 - y0 + 1))
            mx = max(8.0, margin * (x1 - x0 + 1))
            r0, r1 = max(0, int(y0 - my)), min(h, int(y1 + my) + 1)
            c0, c1 = max(0, int(x0 - mx)), min(w, int(x1 + mx) + 1)
            crop = (ry[r0:r1] @ low[j] @ rx[c0:c1].T) > model.mask_threshold
            out.append((crop.numpy(), (r0, c0, r1, c1), float(iou[j])) if bool(crop.any()) else None)
    return out
