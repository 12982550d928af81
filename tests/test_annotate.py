"""Interactive refinement: several points on one object act as a sequence of clicks, each
refining the mask chosen for the points before it (SAM's interactive protocol)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_tinysam import load_model
from napari_tinysam.annotate import ClickHistory, Prompts, segment_prompts, slice_rgb
from napari_tinysam.distill.data import load_folder
from napari_tinysam.evaluation import corrective_point, innermost_point
from napari_tinysam.predictor import SamPredictor


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def field(data_dir):
    sample = load_folder(data_dir / "bbbc039" / "train" / "images", limit=1)[0]
    predictor = SamPredictor(load_model("default"))
    return predictor, slice_rgb(sample.image, None), sample.labels


class CountingPredictor:
    """The real predictor, counting decoder calls."""

    def __init__(self, predictor: SamPredictor) -> None:
        self.inner, self.calls = predictor, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, **kw):
        self.calls += 1
        return self.inner.predict(**kw)


def _clicks(predictor, rgb, gt, n):
    """A first click at the object's innermost point, then ``n`` corrective clicks, each at
    the innermost point of the largest error region of the mask so far."""
    pts, labels = [innermost_point(gt)], [1]
    history = ClickHistory()
    results = [segment_prompts(predictor, rgb, Prompts(np.array(pts), np.array(labels)), history)]
    for _ in range(n):
        nxt = corrective_point(results[-1].mask, gt)
        if nxt is None:
            break
        pts.append(nxt[0])
        labels.append(nxt[1])
        results.append(segment_prompts(predictor, rgb, Prompts(np.array(pts), np.array(labels)), history))
    return np.array(pts), np.array(labels), history, results


def test_each_point_refines_the_chosen_mask_with_one_decoder_pass(field):
    predictor, rgb, labels = field
    counting = CountingPredictor(predictor)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    gt = labels == ids[np.argmax(counts)]
    pts, lab, history, results = _clicks(counting, rgb, gt, 3)
    assert len(results) >= 2
    assert counting.calls == len(results)  # one decoder pass per click, earlier ones kept in the history
    first = results[0]
    assert first.masks.shape[0] == 3 and first.chosen == first.best
    # the second click is decoded with the first click's chosen logits as mask input
    masks, scores, _ = predictor.predict(
        point_coords=pts[:2], point_labels=lab[:2], mask_input=first.low_res[first.chosen][None],
        multimask_output=False,
    )
    assert np.array_equal(results[1].masks, masks) and np.allclose(results[1].scores, scores)
    # a pure function of the prompts: the same masks without a history
    again = segment_prompts(predictor, rgb, Prompts(pts, lab))
    assert np.array_equal(again.masks, results[-1].masks)


def test_corrective_clicks_improve_masks_on_average(field):
    predictor, rgb, labels = field
    ids = np.unique(labels[labels > 0])
    first, last = [], []
    for i in ids[:: max(1, len(ids) // 15)]:
        gt = labels == i
        *_, results = _clicks(predictor, rgb, gt, 3)
        first.append(_iou(results[0].mask, gt))
        last.append(_iou(results[-1].mask, gt))
    assert np.mean(last) > np.mean(first) + 0.02, (np.mean(first), np.mean(last))


def test_picking_another_candidate_changes_what_later_points_refine(field):
    predictor, rgb, labels = field
    ids = np.unique(labels[labels > 0])
    gt = labels == ids[len(ids) // 2]
    pts, lab, history, results = _clicks(predictor, rgb, gt, 1)
    first = results[0]
    two = Prompts(pts[:2], lab[:2])
    before = segment_prompts(predictor, rgb, two, history)
    other = (first.chosen + 1) % 3
    first.chosen = other  # the user cycled to another candidate of the first click
    after = segment_prompts(predictor, rgb, two, history)
    expected, _, _ = predictor.predict(
        point_coords=pts[:2], point_labels=lab[:2], mask_input=first.low_res[other][None], multimask_output=False
    )
    assert np.array_equal(after.masks, expected)
    assert not np.array_equal(after.low_res, before.low_res)
    # deleting the second point returns to the first click's masks; its entry is dropped
    back = segment_prompts(predictor, rgb, Prompts(pts[:1], lab[:1]), history)
    assert back is first
    assert [c for _, c in history.steps.values()] == [first]  # only the one-point prefix is kept


def test_benchmark_and_annotator_score_the_same_clicks(field, data_dir):
    # the quality benchmark decodes corrective clicks batched over objects, the annotator
    # one object at a time with its history: per object they must agree, so the benchmark's
    # 3-click number is what a user clicking that way gets
    from types import SimpleNamespace

    from napari_tinysam.evaluation import evaluate_prompts

    predictor, rgb, labels = field
    image = load_folder(data_dir / "bbbc039" / "train" / "images", limit=1)[0].image
    ids = np.unique(labels[labels > 0])[::6][:16]
    kept = np.zeros_like(labels)
    for n, i in enumerate(ids, 1):
        kept[labels == i] = n
    res = evaluate_prompts(predictor.model, [SimpleNamespace(image=image, labels=kept)], per_object=True)
    detail = res["objects_detail"]
    assert len(detail["click3"]) == len(ids) == res["objects"]
    for n in range(1, len(ids) + 1):
        gt = kept == n
        *_, results = _clicks(predictor, rgb, gt, 3)
        assert detail["area"][n - 1] == gt.sum()
        # same decisions and the same decoder: equal up to float rounding (decoding from
        # scratch instead would miss this by up to 0.08 on these objects)
        assert abs(detail["click"][n - 1] - _iou(results[0].mask, gt)) < 1e-3
        assert abs(detail["click3"][n - 1] - _iou(results[-1].mask, gt)) < 1e-3
    assert np.mean(detail["click3"]) == pytest.approx(res["click3"])
