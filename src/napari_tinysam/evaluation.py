"""Prompt-based quality measures against ground-truth instance labels (used by the
trainer's validation, the quality benchmark and the quantization report)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from scipy import ndimage

from .annotate import ClickHistory, Prompts, Zoom, segment_prompts, zoom_window
from .model import Sam
from .predictor import SamPredictor, predict_batch, to_uint8_rgb, upscale_logits


def innermost_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the maximum of the distance transform of a binary mask (H, W), pixels
    outside the image counting as background; the first in raster order on ties.

    The transform runs over the mask's bounding box padded by one background pixel: the
    nearest background pixel of any mask pixel lies inside that box, so the result is the
    same as over the whole image, and small objects in large images cost little."""
    found = ndimage.find_objects(mask.astype(np.uint8))
    if not found:
        return 0.0, 0.0
    sy, sx = found[0]
    dist = ndimage.distance_transform_edt(np.pad(mask[sy, sx], 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x + sx.start), float(y + sy.start)


#: object-area bins (pixels of the field) of the size-split quality tables: fragments and
#: debris, small, typical and large BBBC039 nuclei
AREA_BINS = ((0, 150), (150, 300), (300, 600), (600, None))


def area_bins(areas: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(label, selection) per non-empty bin of ``AREA_BINS`` for object areas (N,)."""
    out = []
    for lo, hi in AREA_BINS:
        sel = (areas >= lo) & (areas < (np.inf if hi is None else hi))
        if sel.any():
            out.append((f"{lo}-{hi}" if hi is not None else f">= {lo}", sel))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _objects(labels: np.ndarray, max_objects: int | None, rng: np.random.Generator):
    slices = ndimage.find_objects(labels)
    ids = [i + 1 for i, s in enumerate(slices) if s is not None]
    if max_objects is not None and len(ids) > max_objects:
        ids = sorted(rng.choice(ids, max_objects, replace=False).tolist())
    return ids, slices


def corrective_point(pred: np.ndarray, gt: np.ndarray) -> tuple[tuple[float, float], int] | None:
    """SAM's interactive protocol: the innermost point of the largest error region;
    positive when it is a missed part of the object, negative otherwise."""
    err = pred ^ gt
    if not err.any():
        return None
    lab, n = ndimage.label(err)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    largest = lab == (int(np.argmax(sizes)) + 1)
    x, y = innermost_point(largest)
    return (x, y), int(gt[int(y), int(x)])


def _prompts(labels: np.ndarray, ids: list[int], slices) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Ground-truth masks, innermost points (N, 1, 2) and tight boxes (N, 4) of objects."""
    gts = [labels == i for i in ids]
    pts = np.array([[innermost_point(g)] for g in gts])
    boxes = []
    for i in ids:
        sy, sx = slices[i - 1]
        boxes.append([sx.start, sy.start, sx.stop - 1, sy.stop - 1])
    return gts, pts, np.array(boxes, dtype=np.float64)


def _click_and_box(model: Sam, predictor: SamPredictor, pts: np.ndarray, boxes: np.ndarray):
    """Masks of one click per object (best of three by predicted IoU) and of each box
    (token 0): the click's low-resolution logits (N, 1, h, w), click masks and box masks
    (N, H, W) bool."""
    n = len(pts)
    with model.interactive_decoding():
        low, iou = predict_batch(predictor, pts, np.ones((n, 1)), tokens=model.mask_tokens(True))
        lowb, _ = predict_batch(predictor, boxes=boxes, tokens=model.mask_tokens(False))
    low_best = low[torch.arange(n, device=low.device), iou.argmax(1)][:, None]
    masks = (upscale_logits(predictor, low_best)[:, 0] > 0).cpu().numpy()
    mb = (upscale_logits(predictor, lowb)[:, 0] > 0).cpu().numpy()
    return low_best, masks, mb


@torch.no_grad()
def compare_models(
    model: Sam,
    reference: Sam,
    samples: Iterable,
    max_objects: int | None = None,
    seed: int = 0,
    chunk: int = 32,
) -> dict[str, float]:
    """The same click and box prompts on two models (e.g. quantized and float): mean IoU of
    each with the ground truth (``click``, ``box``, ``ref_click``, ``ref_box``) and mean IoU
    between their masks (``agree_click``, ``agree_box``)."""
    pa, pb = SamPredictor(model), SamPredictor(reference)
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {
        k: [] for k in ("click", "box", "ref_click", "ref_box", "agree_click", "agree_box")
    }
    for sample in samples:
        if sample.labels is None:
            continue
        pa.set_image(sample.image)
        pb.set_image(sample.image)
        ids, slices = _objects(sample.labels, max_objects, rng)
        for start in range(0, len(ids), chunk):
            gts, pts, boxes = _prompts(sample.labels, ids[start : start + chunk], slices)
            _, ca, ba = _click_and_box(model, pa, pts, boxes)
            _, cb, bb = _click_and_box(reference, pb, pts, boxes)
            for j, g in enumerate(gts):
                scores["click"].append(_iou(ca[j], g))
                scores["box"].append(_iou(ba[j], g))
                scores["ref_click"].append(_iou(cb[j], g))
                scores["ref_box"].append(_iou(bb[j], g))
                scores["agree_click"].append(_iou(ca[j], cb[j]))
                scores["agree_box"].append(_iou(ba[j], bb[j]))
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in scores.items()}
    out["objects"] = len(scores["click"])
    return out


def _zoom_objects(predictor, rgb, zoom, gts, pts, boxes, masks, click, box, curve) -> None:
    """Replace the scores of the objects that ``zoom`` magnifies by the annotator's
    prompt-by-prompt results (``click``, ``box`` and ``curve`` are updated in place).
    The predictor is on the slice ``rgb`` before and after."""
    for j, gt in enumerate(gts):
        points, labels = [tuple(pts[j][0])], [1]
        first = Prompts(np.array(points), np.array(labels))
        # both decisions while the predictor is on the slice (a session leaves it on a window)
        by_box = zoom_window(zoom, Prompts(box=boxes[j]), None, predictor) is not None
        by_click = zoom_window(zoom, first, masks[j], predictor) is not None
        if by_box:
            box[j] = _iou(segment_prompts(predictor, rgb, Prompts(box=boxes[j]), zoom=zoom).mask, gt)
        if by_click:
            history = ClickHistory()
            cur = segment_prompts(predictor, rgb, first, history, zoom)
            click[j] = _iou(cur.mask, gt)
            for k in range(len(curve)):
                nxt = corrective_point(cur.mask, gt)
                points.append(points[-1] if nxt is None else nxt[0])
                labels.append(labels[-1] if nxt is None else nxt[1])
                cur = segment_prompts(predictor, rgb, Prompts(np.array(points), np.array(labels)), history, zoom)
                curve[k][j] = _iou(cur.mask, gt)
        if by_box or by_click:
            predictor.set_image(rgb)  # from the cache


@torch.no_grad()
def evaluate_prompts(
    model: Sam,
    samples: Iterable,
    max_objects: int | None = None,
    corrective_clicks: int = 3,
    seed: int = 0,
    chunk: int = 32,
    predictor: SamPredictor | None = None,
    mask_feedback: bool = True,
    per_object: bool = False,
    zoom: Zoom | None = None,
) -> dict:
    """Mean IoU with the ground truth for three prompt protocols.

    - ``click``: one positive click at each object's innermost point (maximum of its
      distance transform), mask = the multimask output with the highest predicted IoU;
    - ``box``: the object's tight ground-truth box, single-mask output (token 0);
    - ``click3``: the click result refined by ``corrective_clicks`` clicks, each at the
      innermost point of the largest error region, with the previous low-resolution
      logits as mask input (SAM's interactive protocol, and the annotator's). With
      ``mask_feedback=False`` every point set is decoded from scratch instead.
      ``corrective`` lists the mean IoU after each corrective click.

    With ``zoom``, the objects that :class:`~napari_tinysam.annotate.Zoom` magnifies (by
    their click mask, or their box) are segmented as the annotator does it, prompt by
    prompt through :func:`~napari_tinysam.annotate.segment_prompts` in their window.

    With ``per_object``, ``objects_detail`` holds one list per key, in object order:
    ``area`` (pixels), ``click``, ``box`` and ``click3`` IoUs.

    ``samples`` have ``.image`` and ``.labels`` (see ``distill.data.Sample``).
    """
    with model.interactive_decoding():
        return _evaluate_prompts(
            model,
            samples,
            max_objects,
            corrective_clicks,
            seed,
            chunk,
            predictor,
            mask_feedback,
            per_object,
            zoom,
        )


def _evaluate_prompts(
    model, samples, max_objects, corrective_clicks, seed, chunk, predictor, mask_feedback, per_object, zoom
) -> dict:
    predictor = predictor or SamPredictor(model)
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {"click": [], "box": []}
    areas: list[int] = []
    curve: list[list[float]] = [[] for _ in range(corrective_clicks)]  # IoUs after each click
    for sample in samples:
        if sample.labels is None:
            continue
        rgb = to_uint8_rgb(sample.image)
        predictor.set_image(rgb)
        labels = sample.labels
        ids, slices = _objects(labels, max_objects, rng)
        for start in range(0, len(ids), chunk):
            batch = ids[start : start + chunk]
            gts, pts, boxes = _prompts(labels, batch, slices)
            areas += [int(g.sum()) for g in gts]
            low_best, masks, mb = _click_and_box(model, predictor, pts, boxes)
            click = [_iou(m, g) for m, g in zip(masks, gts)]
            box = [_iou(m, g) for m, g in zip(mb, gts)]
            chunk_curve: list[list[float]] = [[] for _ in range(corrective_clicks)]
            # corrective clicks
            if corrective_clicks:
                point_lists = [[(p[0][0], p[0][1])] for p in pts]
                label_lists = [[1] for _ in batch]
                cur_low, cur = low_best, masks
                for k in range(corrective_clicks):
                    for j in range(len(batch)):
                        nxt = corrective_point(cur[j], gts[j])
                        if nxt is None:  # perfect: repeat the last point, no change
                            point_lists[j].append(point_lists[j][-1])
                            label_lists[j].append(label_lists[j][-1])
                        else:
                            point_lists[j].append(nxt[0])
                            label_lists[j].append(nxt[1])
                    cur_low, _ = predict_batch(
                        predictor,
                        np.array(point_lists),
                        np.array(label_lists),
                        mask_input=cur_low if mask_feedback else None,
                        tokens=model.mask_tokens(False),
                    )
                    cur = (upscale_logits(predictor, cur_low)[:, 0] > 0).cpu().numpy()
                    chunk_curve[k] += [_iou(m, g) for m, g in zip(cur, gts)]
            if zoom is not None:
                _zoom_objects(predictor, rgb, zoom, gts, pts, boxes, masks, click, box, chunk_curve)
            scores["click"] += click
            scores["box"] += box
            for k in range(corrective_clicks):
                curve[k] += chunk_curve[k]
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in scores.items()}
    out["corrective"] = [float(np.mean(v)) if v else float("nan") for v in curve]
    out["click3"] = out["corrective"][-1] if curve else float("nan")
    out["objects"] = len(scores["click"])
    if per_object:
        out["objects_detail"] = {"area": areas, **scores, "click3": curve[-1] if curve else []}
    return out
