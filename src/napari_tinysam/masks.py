"""Mask bookkeeping as plain functions: point grids, stability scores, boxes, NMS,
small-region cleanup, label painting and z-stitching."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) points (x, y) in [0, 1] at the cell centres ((i + 0.5) / n)."""
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks binarised at threshold +/- offset: (..., H, W) -> (...)."""
    inter = (logits > threshold + offset).flatten(-2).sum(-1, dtype=torch.int64)
    union = (logits > threshold - offset).flatten(-2).sum(-1, dtype=torch.int64)
    return torch.where(
        union > 0, inter.float() / union.clamp(min=1).float(), torch.zeros_like(inter, dtype=torch.float32)
    )


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of XYXY boxes (pixel-inclusive corners, as SAM's boxes): (N, 4), (M, 4) -> (N, M)."""
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt + 1, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, highest score first."""
    order = np.argsort(-scores, kind="stable")
    if len(order) == 0:
        return order
    iou = box_iou_matrix(boxes[order], boxes[order])
    suppressed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        suppressed |= iou[i] > iou_threshold
    return np.array(keep, dtype=np.int64)


def remove_small_regions(mask: np.ndarray, area_thresh: int, mode: str) -> tuple[np.ndarray, bool]:
    """Remove disconnected islands (``mode="islands"``) or fill holes (``"holes"``)
    smaller than ``area_thresh`` pixels; returns the mask and whether it changed."""
    correct_holes = mode == "holes"
    working = np.logical_xor(correct_holes, mask)
    lab, n = ndimage.label(working, structure=np.ones((3, 3)) if not correct_holes else None)
    if n == 0:
        return mask, False
    sizes = ndimage.sum_labels(working, lab, index=np.arange(1, n + 1))
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(n + 1) if i not in fill]
        if not fill:  # every region is small: keep the largest
            fill = [int(np.argmax(sizes)) + 1]
        return np.isin(lab, fill), True
    return np.logical_or(mask, np.isin(lab, small)), True


def shows_enough(kept, area, min_kept: float):
    """Whether an object that keeps ``kept`` of its ``area`` pixels once better (or
    earlier) objects hold theirs is still an object: it keeps a pixel and at least
    ``min_kept`` of its area, else what would show of it is a sliver. Numbers or arrays."""
    return (kept > 0) & (kept >= min_kept * area)


def paint_labels(
    masks: list[np.ndarray],
    boxes: list[tuple[int, int, int, int]],
    scores: np.ndarray,
    shape: tuple[int, int],
    min_kept: float = 0.0,
) -> tuple[np.ndarray, list[int]]:
    """Paint cropped masks into an int32 label image (0 = background).

    ``masks[i]`` is a bool crop placed at ``boxes[i] = (y0, x0, y1, x1)`` (exclusive
    ends). Masks are placed best score first, each on the pixels that no better mask
    holds, so where masks overlap the one with the higher score wins. A mask left with
    no pixel, or with fewer than ``min_kept`` times its own area, is dropped
    (:func:`shows_enough`), and its pixels stay free for the masks after it. Ids are 1..N
    in order of decreasing score among the masks kept; returns the label image and, for
    each input mask, its id (0 when dropped).
    """
    labels = np.zeros(shape, np.int32)
    ids = [0] * len(masks)
    next_id = 1
    # best first; of equal scores the later mask first (as if painted last)
    for i in np.argsort(scores, kind="stable")[::-1]:
        y0, x0, y1, x1 = boxes[i]
        view = labels[y0:y1, x0:x1]
        free = masks[i] & (view == 0)
        kept = int(np.count_nonzero(free))
        if not shows_enough(kept, np.count_nonzero(masks[i]), min_kept):
            continue
        view[free] = next_id
        ids[i] = next_id
        next_id += 1
    return labels, ids


def overlap_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every object of label image ``a`` and every object of ``b``.
    Returns (ids_a, ids_b, iou (len(ids_a), len(ids_b)))."""
    ids_a = np.unique(a[a > 0])
    ids_b = np.unique(b[b > 0])
    if len(ids_a) == 0 or len(ids_b) == 0:
        return ids_a, ids_b, np.zeros((len(ids_a), len(ids_b)))
    ia = np.searchsorted(ids_a, a.ravel()) + 1
    ia[a.ravel() == 0] = 0
    ib = np.searchsorted(ids_b, b.ravel()) + 1
    ib[b.ravel() == 0] = 0
    na, nb = len(ids_a) + 1, len(ids_b) + 1
    counts = np.bincount(ia * nb + ib, minlength=na * nb).reshape(na, nb)
    inter = counts[1:, 1:]
    area_a = counts[1:, :].sum(1)
    area_b = counts[:, 1:].sum(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return ids_a, ids_b, inter / np.maximum(union, 1)


def stitch_pair(previous: np.ndarray, current: np.ndarray, next_id: int, min_iou: float) -> tuple[np.ndarray, int]:
    """Relabel slice ``current`` so that objects matching one in ``previous`` (one-to-one,
    Hungarian matching on IoU, IoU >= ``min_iou``) take its id; other objects get new ids
    from ``next_id``. Returns the relabelled slice and the next free id."""
    ids_p, ids_c, iou = overlap_iou(previous, current)
    mapping: dict[int, int] = {}
    if iou.size:
        rows, cols = linear_sum_assignment(-iou)
        for r, c in zip(rows, cols):
            if iou[r, c] >= min_iou:
                mapping[int(ids_c[c])] = int(ids_p[r])
    for c in ids_c:
        if int(c) not in mapping:
            mapping[int(c)] = next_id
            next_id += 1
    lut = np.zeros(int(current.max()) + 1, np.int32)
    for c, t in mapping.items():
        lut[c] = t
    return lut[current], next_id
