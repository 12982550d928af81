"""Interactive refinement: several points on one object act as a sequence of clicks, each
refining the mask chosen for the points before it (SAM's interactive protocol)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_tinysam import load_model
from napari_tinysam.annotate import (
    ClickHistory,
    Prompts,
    Zoom,
    commit_object,
    commit_objects,
    is_embedded,
    replace_object,
    segment_objects,
    segment_prompts,
    slice_rgb,
    split_objects,
    undo_commit,
)
from napari_tinysam.distill.data import load_folder
from napari_tinysam.evaluation import corrective_point, innermost_point
from napari_tinysam.predictor import SamPredictor, to_uint8_rgb
from tests.stacks import noisy_nuclei_field


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


def _clicks(predictor, rgb, gt, n, zoom=None):
    """A first click at the object's innermost point, then ``n`` corrective clicks, each at
    the innermost point of the largest error region of the mask so far."""
    pts, labels = [innermost_point(gt)], [1]
    history = ClickHistory()
    results = [segment_prompts(predictor, rgb, Prompts(np.array(pts), np.array(labels)), history, zoom)]
    for _ in range(n):
        nxt = corrective_point(results[-1].mask, gt)
        if nxt is None:
            break
        pts.append(nxt[0])
        labels.append(nxt[1])
        results.append(segment_prompts(predictor, rgb, Prompts(np.array(pts), np.array(labels)), history, zoom))
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
        point_coords=pts[:2],
        point_labels=lab[:2],
        mask_input=first.low_res[first.chosen][None],
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


@pytest.mark.parametrize("zoom", [None, Zoom()], ids=["slice", "zoom"])
def test_benchmark_and_annotator_score_the_same_clicks(field, data_dir, zoom):
    # the quality benchmark decodes corrective clicks batched over objects, the annotator
    # one object at a time with its history: per object they must agree, so the benchmark's
    # 3-click number is what a user clicking that way gets
    from types import SimpleNamespace

    from napari_tinysam.evaluation import evaluate_prompts

    predictor, rgb, labels = field
    image = load_folder(data_dir / "bbbc039" / "train" / "images", limit=1)[0].image
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    ids = ids[np.argsort(areas)][[0, 1, 2, *range(3, len(ids), 8)]][:16]  # the smallest three, then every size
    kept = np.zeros_like(labels)
    for n, i in enumerate(ids, 1):
        kept[labels == i] = n
    res = evaluate_prompts(predictor.model, [SimpleNamespace(image=image, labels=kept)], per_object=True, zoom=zoom)
    detail = res["objects_detail"]
    assert len(detail["click3"]) == len(ids) == res["objects"]
    zoomed = 0
    for n in range(1, len(ids) + 1):
        gt = kept == n
        *_, results = _clicks(predictor, rgb, gt, 3, zoom)
        zoomed += results[0].window is not None
        assert detail["area"][n - 1] == gt.sum()
        # same decisions and the same decoder: equal up to float rounding (decoding from
        # scratch instead would miss this by up to 0.08 on these objects)
        assert abs(detail["click"][n - 1] - _iou(results[0].mask, gt)) < 1e-3
        assert abs(detail["click3"][n - 1] - _iou(results[-1].mask, gt)) < 1e-3
    assert np.mean(detail["click3"]) == pytest.approx(res["click3"])
    assert zoomed >= (3 if zoom else 0) and (zoom or not zoomed)


def test_zoom_segments_small_objects_in_a_magnified_window(field):
    predictor, rgb, labels = field
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    small = labels == ids[areas >= 100][np.argmin(areas[areas >= 100])]  # a small nucleus, not a fragment
    large = labels == ids[np.argmax(areas)]
    zoom = Zoom()
    click = Prompts(np.array([innermost_point(small)]), np.array([1]))
    res = segment_prompts(predictor, rgb, click, zoom=zoom)
    assert res.window is not None
    y0, x0, h, w = res.window
    assert res.masks.shape == (3, *labels.shape) and not res.masks[:, :y0].any() and not res.masks[:, y0 + h :].any()
    # the slice's aspect ratio, magnified at most max_zoom times, holding the object
    assert (
        h / w == pytest.approx(labels.shape[0] / labels.shape[1], rel=0.02) and h >= labels.shape[0] / zoom.max_zoom - 1
    )
    rows, cols = np.nonzero(small)
    assert y0 <= rows.min() and rows.max() < y0 + h and x0 <= cols.min() and cols.max() < x0 + w
    # exactly the masks of the same click on the window alone, pasted at the slice's size
    crop = SamPredictor(predictor.model, cache=predictor.cache)
    crop.set_image(rgb[y0 : y0 + h, x0 : x0 + w])
    masks, scores, _ = crop.predict(point_coords=click.points - [x0, y0], point_labels=click.labels)
    assert np.array_equal(res.masks[:, y0 : y0 + h, x0 : x0 + w], masks) and np.allclose(res.scores, scores)
    # a large nucleus needs no second look: the slice's masks
    click = Prompts(np.array([innermost_point(large)]), np.array([1]))
    res = segment_prompts(predictor, rgb, click, zoom=zoom)
    assert res.window is None
    assert np.array_equal(res.masks, segment_prompts(predictor, rgb, click).masks)


def test_zoom_without_encoding_asks_for_the_window(field):
    predictor, rgb, labels = field
    fresh = SamPredictor(predictor.model)  # an empty cache
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    small = labels == ids[areas >= 100][np.argmin(areas[areas >= 100])]
    click = Prompts(np.array([innermost_point(small)]), np.array([1]))
    history = ClickHistory()
    first = segment_prompts(fresh, rgb, click, history, Zoom(), encode=False)
    assert first.window is None and first.pending_window is not None and fresh.encoder_calls == 1
    assert np.array_equal(first.masks, segment_prompts(fresh, rgb, click).masks)  # the slice's masks meanwhile
    fresh.set_image(first.pending_window)  # what the annotator's worker does
    assert is_embedded(fresh, first.pending_window)
    later = segment_prompts(fresh, rgb, click, history, Zoom(), encode=False)
    assert later.window is not None and later.pending_window is None and fresh.encoder_calls == 2


def test_a_click_on_the_outer_half_of_an_edge_pixel_gets_the_magnified_look_too():
    """A small nucleus cut by the left border, clicked on the outer half of its edge pixel
    (napari gives -0.5 .. 0 there), is magnified as a click inside that pixel is."""
    from napari_tinysam import samples

    labels = samples.nuclei_2d_labels()
    rgb = slice_rgb(samples.nuclei_2d(), None)
    predictor = SamPredictor(load_model("default"))
    nucleus = labels == 88  # 66 px on rows 351-363 of the first column
    windows, ious = [], []
    for x in (0.4, -0.4):
        res = segment_prompts(predictor, rgb, Prompts(np.array([[x, 357.0]]), np.array([1])), zoom=Zoom())
        windows.append(res.window)
        ious.append(_iou(res.masks[int(np.argmax(res.scores))], nucleus))
    assert windows[0] is not None and windows[1] == windows[0]
    assert min(ious) > 0.85


def test_clicks_on_a_noisy_field_find_their_nuclei_when_the_model_sees_it_smoothed():
    """At a low signal-to-noise ratio (the typical nucleus 2 standard deviations of the
    background's noise above it) one click on the raw field misses much of its nucleus;
    with ``smooth_for`` (the annotator's default) the model sees the field smoothed. A clean
    field is given to the model as it is either way."""
    from napari_tinysam import samples

    clean = samples.nuclei_2d()
    predictor = SamPredictor(load_model("default"))
    assert np.array_equal(slice_rgb(clean, None, smooth_for=predictor.model), to_uint8_rgb(clean))
    noisy, truth = noisy_nuclei_field(snr=2.0)
    scores = {}
    for smooth in (False, True):
        rgb = slice_rgb(noisy, None, smooth_for=predictor.model if smooth else None)
        ious = []
        for i in range(1, int(truth.max()) + 1, 3):
            gt = truth == i
            if gt.sum() >= 50:
                prompts = Prompts(np.array([innermost_point(gt)]), np.array([1]))
                ious.append(_iou(segment_prompts(predictor, rgb, prompts, ClickHistory()).mask, gt))
        scores[smooth] = float(np.mean(ious))
    assert scores[True] > 0.75 and scores[False] < scores[True] - 0.1, scores


def test_zoom_window_geometry():
    zoom = Zoom(target_area=900, max_zoom=2.0, min_zoom=1.25)
    # a 10x10 object in the corner of a 520x696 field seen at scale 1.1: magnified twice,
    # the window keeps the field's aspect ratio and stays inside it
    assert zoom.window((520, 696), (0, 0, 9, 9), 80, 1.1) == (0, 0, 260, 348)
    y0, x0, h, w = zoom.window((520, 696), (600, 300, 615, 312), 150, 1.1)
    assert (h, w) == (260, 348) and 0 <= y0 <= 300 and 312 < y0 + h <= 520 and x0 + w == 696
    # magnification asks for sqrt(target / area at the input), capped at max_zoom
    y0, x0, h, w = zoom.window((520, 696), (300, 200, 330, 230), 500, 1.0)
    assert h == round(520 / (900 / 500) ** 0.5)
    # no window for objects that are large already, or too large to fit with their margin
    assert zoom.window((520, 696), (300, 200, 330, 230), 700, 1.1) is None
    assert zoom.window((520, 696), (0, 0, 300, 250), 50, 1.1) is None
    # a slice the model already enlarges as far as it may (max_upscale) gains nothing
    assert zoom.window((57, 61), (20, 20, 29, 29), 80, 4.0, max_scale=4.0) is None
    assert zoom.window((57, 61), (20, 20, 29, 29), 80, 3.3, max_scale=4.0) is None  # 1.21x < min_zoom
    assert Zoom().window((120, 150), (20, 20, 29, 29), 80, 2.5, max_scale=4.0)[2:] == (75, 94)  # 1.6x, not 2x


def test_zoom_improves_small_objects(data_dir):
    # what the magnified window is for: on the small nuclei (under 300 pixels) of a few
    # training fields, one click and three corrective clicks get closer to the truth
    model = load_model("default")
    scores = {None: [], "zoom": []}
    for sample in load_folder(data_dir / "bbbc039" / "train" / "images", limit=6):
        predictor, rgb = SamPredictor(model), slice_rgb(sample.image, None)
        ids, areas = np.unique(sample.labels[sample.labels > 0], return_counts=True)
        for i in ids[areas < 300]:
            gt = sample.labels == i
            for key, zoom in ((None, None), ("zoom", Zoom())):
                *_, results = _clicks(predictor, rgb, gt, 3, zoom)
                scores[key].append(_iou(results[-1].mask, gt))
    assert len(scores[None]) >= 15
    assert np.mean(scores["zoom"]) > np.mean(scores[None]) + 0.03, (np.mean(scores[None]), np.mean(scores["zoom"]))


def test_split_objects_gives_each_positive_point_its_nearest_negatives():
    prompts = Prompts(
        np.array([[10, 10], [100, 100], [12, 14], [95, 90], [70, 72]]),
        np.array([1, 1, 0, 0, 0]),
        box=np.array([0, 0, 5, 5]),
    )
    objects = split_objects(prompts)
    assert len(objects) == 3
    assert objects[0].points.tolist() == [[10, 10], [12, 14]] and objects[0].labels.tolist() == [1, 0]
    assert objects[1].points.tolist() == [[100, 100], [95, 90], [70, 72]] and objects[1].labels.tolist() == [1, 0, 0]
    assert objects[2].box.tolist() == [0, 0, 5, 5] and len(objects[2].points) == 0
    assert split_objects(Prompts(np.array([[3, 3]]), np.array([0]))) == []


def test_segment_objects_gives_one_mask_per_point(field):
    predictor, rgb, gt = field
    ids = [i for i in np.unique(gt) if i and (gt == i).sum() > 150][:4]
    pts = np.array([innermost_point(gt == i) for i in ids])
    histories = {}
    objects = segment_objects(predictor, rgb, Prompts(pts, np.ones(len(pts), np.int64)), histories)
    assert len(objects) == len(ids) and len(histories) == len(ids)
    ious = [_iou(obj.mask, gt == i) for obj, i in zip(objects, ids)]
    assert min(ious) > 0.6, ious
    # each mask equals the object clicked on its own
    alone = segment_prompts(predictor, rgb, Prompts(pts[1:2], np.array([1])))
    assert np.array_equal(objects[1].mask, alone.mask)
    # a point removed: its object and its history go
    assert len(segment_objects(predictor, rgb, Prompts(pts[:2], np.ones(2, np.int64)), histories)) == 2
    assert len(histories) == 2


def test_an_existing_mask_as_prompt_refines_it(field):
    """A nucleus given as a coarse mask (its true mask cut in half, as a bad automatic
    result would be) comes back whole; a negative point then takes part of it away."""
    predictor, rgb, gt = field
    ids = [i for i in np.unique(gt) if i and (gt == i).sum() > 300]
    obj = gt == ids[0]
    rows = np.flatnonzero(obj.any(1))
    coarse = obj.copy()
    coarse[rows[len(rows) // 2] :] = False
    refined = segment_prompts(predictor, rgb, Prompts(mask=coarse))
    assert len(refined.masks) == 1
    assert _iou(refined.mask, obj) > max(0.8, _iou(coarse, obj) + 0.2)
    with pytest.raises(ValueError, match="no prompts"):
        segment_prompts(predictor, rgb, Prompts())


def test_replace_object_changes_only_that_id_and_undo_is_exact():
    labels = np.zeros((3, 20, 20), np.int32)
    labels[0, 2:8, 2:8] = 5
    labels[1, 2:8, 2:8] = 5
    labels[1, 8:12, 2:8] = 7  # a neighbour
    labels[2, 15:18, 15:18] = 5
    before = labels.copy()
    new = np.zeros((20, 20), bool)
    new[4:11, 4:10] = True  # moved, and overlapping the neighbour
    records = replace_object(labels, 5, {(1,): new})
    assert (labels[1][new & (before[1] != 7)] == 5).all() and (labels[1][before[1] == 7] == 7).all()
    assert (labels[1][(before[1] == 5) & ~new] == 0).all()
    assert np.array_equal(labels[[0, 2]], before[[0, 2]])  # other slices untouched
    for r in reversed(records):
        undo_commit(labels, r)
    assert np.array_equal(labels, before)
    # overwrite takes the neighbour's pixels; whole removes the object from other slices
    records = replace_object(labels, 5, {(1,): new}, overwrite=True, whole=True)
    assert (labels[1][new] == 5).all() and not (labels[[0, 2]] == 5).any()
    assert ((labels == 7) == ((before == 7) & ~new[None])).all()
    for r in reversed(records):
        undo_commit(labels, r)
    assert np.array_equal(labels, before)
    with pytest.raises(ValueError, match="does not exist"):
        replace_object(labels, 9, {(1,): new})
    with pytest.raises(ValueError, match="shape"):
        replace_object(labels, 5, {(1,): new[:5]})
    assert np.array_equal(labels, before)


def test_commits_past_the_labels_dtype_are_refused_before_anything_is_written():
    """napari's "new labels" button makes uint8 layers: the 256th object must not wrap
    around to 0 or stop half-way through a multi-object commit."""
    labels = np.zeros((2, 10, 10), np.uint8)
    labels[0, 0, 0] = 253
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[2:4, 2:4], b[6:8, 6:8] = True, True
    before = labels.copy()
    with pytest.raises(ValueError, match=r"uint8\) holds ids up to 255, and the next free id is 254 \(3 objects\)"):
        commit_objects(labels, [{(0,): a}, {(0,): b}, {(1,): a}])
    assert np.array_equal(labels, before)
    records = commit_objects(labels, [{(0,): a}, {(1,): b}])  # 254 and 255 fit
    assert (labels[0][a] == 254).all() and (labels[1][b] == 255).all()
    with pytest.raises(ValueError, match="astype"):
        commit_object(labels, {(1,): a})
    for r in reversed(records):
        undo_commit(labels, r)
    assert np.array_equal(labels, before)
    wide = before.astype(np.int32)
    wide[1, 0, 0] = 255
    commit_object(wide, {(1,): a})
    assert (wide[1][a] == 256).all()


def test_undo_keeps_what_was_painted_after_the_commit():
    """Edits made after a commit (napari's brush or eraser, inside the committed object's
    bounding box) survive its undo; everything else is restored exactly."""
    labels = np.zeros((12, 12), np.int32)
    labels[1, 1:3] = 4  # an object already there, overwritten by the commit
    mask = np.zeros((12, 12), bool)
    mask[1:8, 1:8] = True
    before = labels.copy()
    (record,) = commit_objects(labels[None], [{(0,): mask}], overwrite=True)
    assert (labels[mask] == 5).all()
    labels[8:10, 8:10] = 7  # painted beside the object, inside no commit
    labels[2, 2:6] = 7  # painted over the committed object
    labels[1, 1] = 0  # erased from it where object 4 was
    labels[6, 6] = 0  # erased from it, back to what it was before the commit
    assert undo_commit(labels[None], record) == 5  # the four painted pixels and the first erased one
    expected = before.copy()
    expected[8:10, 8:10] = 7
    expected[2, 2:6] = 7
    expected[1, 1] = 0
    assert np.array_equal(labels, expected)  # object 4's other pixel is back, the edits stay
    # a commit undone at once leaves the layer exactly as before
    (record,) = commit_objects(labels[None], [{(0,): mask}], overwrite=True)
    assert undo_commit(labels[None], record) == 0 and np.array_equal(labels, expected)


def test_replacing_a_tracked_object_in_one_time_point_keeps_the_others():
    """In a (T, Z, Y, X) layer a tracked object keeps its id over time: a 3D object
    propagated at t = 1 replaces the id's pixels of that stack only."""
    labels = np.zeros((2, 3, 10, 10), np.int32)
    labels[0, 1, 2:5, 2:5] = 5  # t = 0
    labels[1, 1, 2:5, 2:5] = 5  # t = 1, two slices
    labels[1, 2, 2:5, 2:5] = 5
    before = labels.copy()
    new = np.zeros((10, 10), bool)
    new[3:7, 3:7] = True
    records = replace_object(labels, 5, {(1, 1): new}, whole=True, within=(1,))
    assert np.array_equal(labels[0], before[0])  # the other time point untouched
    assert ((labels[1, 1] == 5) == new).all() and not (labels[1, 2] == 5).any()
    for r in reversed(records):
        undo_commit(labels, r)
    assert np.array_equal(labels, before)


def test_large_nuclei_in_a_small_crop_are_segmented_at_a_smaller_scale():
    """A 128x128 crop is enlarged 4x by the bundled model, past the nuclei sizes it was
    trained on: a click there fails (IoU under 0.4 for each of these nuclei). With
    ``rescale`` the unconfident object is decoded again on the slice seen smaller, the most
    confident scale is kept for all its clicks, and the masks come back at the crop's size."""
    from napari_tinysam import samples

    crop = np.s_[100:228, 100:228]
    rgb, labels = slice_rgb(samples.nuclei_2d()[crop], None), samples.nuclei_2d_labels()[crop]
    predictor = CountingPredictor(SamPredictor(load_model("default")))
    for i in (34, 38, 40):  # whole nuclei of the crop
        gt = labels == i
        prompts = Prompts(np.array([innermost_point(gt)], np.float64), np.array([1]))
        plain = segment_prompts(predictor, rgb, prompts, zoom=Zoom())
        history = ClickHistory()
        calls = predictor.calls
        res = segment_prompts(predictor, rgb, prompts, history, Zoom(), rescale=True)
        assert _iou(plain.mask, gt) < 0.4 and _iou(res.mask, gt) > 0.85
        assert res.mask.shape == gt.shape and res.factor < 1
        assert predictor.calls - calls == 3  # the own scale and the two smaller ones
        # a second point refines that mask at the same scale, in one decoder pass
        calls = predictor.calls
        x, y = innermost_point(gt)
        two = Prompts(np.array([[x, y], [x + 2, y + 2]], np.float64), np.array([1, 1]))
        refined = segment_prompts(predictor, rgb, two, history, Zoom(), rescale=True)
        assert predictor.calls - calls == 1 and refined.factor == res.factor and _iou(refined.mask, gt) > 0.8


def test_rescale_keeps_confident_objects_and_waits_for_its_embeddings(field):
    """On a full field (seen at about its own size) nothing changes; with ``encode=False``
    the smaller views of a small crop come back to be embedded, and once they are, the
    same call gives the rescaled object."""
    from napari_tinysam import samples

    predictor, rgb, labels = field
    gt = labels == np.bincount(labels.ravel())[1:].argmax() + 1
    prompts = Prompts(np.array([innermost_point(gt)], np.float64), np.array([1]))
    a = segment_prompts(predictor, rgb, prompts, zoom=Zoom())
    b = segment_prompts(predictor, rgb, prompts, zoom=Zoom(), rescale=True)
    assert b.factor == 1.0 and np.array_equal(a.mask, b.mask) and not b.pending_scales

    small = slice_rgb(samples.nuclei_2d()[100:228, 100:228], None)
    gt = samples.nuclei_2d_labels()[100:228, 100:228] == 34
    prompts = Prompts(np.array([innermost_point(gt)], np.float64), np.array([1]))
    fresh = SamPredictor(predictor.model)
    first = segment_prompts(fresh, small, prompts, zoom=Zoom(), encode=False, rescale=True)
    assert first.factor == 1.0 and len(first.pending_scales) == 2
    assert [p.shape[:2] for p in first.pending_scales] == [(48, 48), (80, 80)]  # 1.5x and 2.5x of 4x
    for view in first.pending_scales:
        assert not is_embedded(fresh, view)
        fresh.set_image(view)
    again = segment_prompts(fresh, small, prompts, zoom=Zoom(), encode=False, rescale=True)
    assert not again.pending_scales and again.factor < 1 and _iou(again.mask, gt) > 0.85
