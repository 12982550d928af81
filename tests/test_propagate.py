"""One object through a stack: propagation from a click, filling between prompted
slices, cancelling, bad input, and committing a 3D object with exact undo."""

from __future__ import annotations

import numpy as np
import pytest

from napari_tinysam import SamPredictor, load_model, segment_object_in_volume
from napari_tinysam.annotate import commit_object, undo_commit

RADII = [0, 0, 5, 8, 11, 12, 11, 8, 5, 0, 0]  # a nucleus that grows, then shrinks, through z


def disc_stack() -> tuple[np.ndarray, np.ndarray]:
    """(11, 96, 128) noisy stack: the disc of RADII centred at (x, y) = (50, 48), and a
    second nucleus through every slice."""
    yy, xx = np.mgrid[:96, :128]
    truth = np.stack([(yy - 48) ** 2 + (xx - 50) ** 2 <= r * r if r else np.zeros((96, 128), bool) for r in RADII])
    other = (yy - 30) ** 2 + (xx - 105) ** 2 <= 81
    stack = 100 + 800 * truth + 600 * other[None] + np.random.default_rng(0).normal(0, 20, truth.shape)
    return stack.astype(np.uint16), truth


@pytest.fixture(scope="module")
def predictor():
    return SamPredictor(load_model("default"))


def _iou(a, b):
    return np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum())


def test_one_click_recovers_the_object_and_stops_at_its_ends(predictor):
    stack, truth = disc_stack()
    seen = []
    res = segment_object_in_volume(predictor, stack, 5, [[50, 48]], [1], progress=lambda z, m, s: seen.append(z))
    assert res.shape == stack.shape and res.dtype == bool
    assert res.z_range == (2, 8)
    assert _iou(np.asarray(res), truth) > 0.8
    assert sorted(seen) == list(range(2, 9))  # every slice of the object, reported once
    # only the slices the object spans plus one each side were embedded (slices 0 and 10 never)
    assert set(res.embedded) <= set(range(1, 10)) and {1, 9} <= set(res.visited)
    assert np.isfinite(res.scores[2:9]).all() and np.isnan(res.scores[[0, 1, 9, 10]]).all()
    assert 2 <= res.least_confident <= 8
    # z_range bounds the walk
    res = segment_object_in_volume(predictor, stack, 5, [[50, 48]], [1], z_range=(4, 6))
    assert res.z_range == (4, 6)


def test_fills_between_two_prompted_slices(predictor):
    stack, truth = disc_stack()
    res = segment_object_in_volume(predictor, stack, [3, 7], [[[50, 48]], [[50, 48]]], [[1], [1]], z_range=(3, 7))
    assert res.z_range == (3, 7)
    for z in range(3, 8):
        assert _iou(res[z], truth[z]) > 0.7, z


def test_given_mask_is_kept_on_its_slice(predictor):
    stack, truth = disc_stack()
    res = segment_object_in_volume(predictor, stack, 5, mask=truth[5])
    assert np.array_equal(res[5], truth[5]) and res.z_range == (2, 8)


def test_cancel_stops_after_the_current_slice(predictor):
    stack, _ = disc_stack()
    res = segment_object_in_volume(predictor, stack, 5, [[50, 48]], [1], cancel=lambda: True)
    assert res.cancelled and res.z_range == (5, 5)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((5, [[50, 48]], [1]), {"z_range": (6, 8)}, "z_range"),
        ((11, [[50, 48]], [1]), {}, "outside the stack"),
        ((5, [[500, 48]], [1]), {}, "outside the slice"),
        ((5, [[50, 48]], [0]), {}, "only negative"),
        ((5,), {}, "no prompt"),
        ((5,), {"mask": np.zeros((96, 128), bool)}, "empty"),
        ((5,), {"mask": np.ones((5, 5), bool)}, "shape"),
    ],
)
def test_bad_prompts_are_explained(predictor, args, kwargs, message):
    stack, _ = disc_stack()
    with pytest.raises(ValueError, match=message):
        segment_object_in_volume(predictor, stack, *args, **kwargs)


def test_a_2d_image_is_refused(predictor):
    stack, _ = disc_stack()
    with pytest.raises(ValueError, match="needs a \\(Z, H, W\\) stack"):
        segment_object_in_volume(predictor, stack[5], 0, [[50, 48]], [1])


def test_commit_object_writes_one_id_and_undo_is_exact():
    _, truth = disc_stack()
    labels = np.zeros(truth.shape, np.int32)
    labels[4, 40:50, 40:50] = 7  # an object already there
    before = labels.copy()
    masks = {(z,): truth[z] for z in range(2, 9)}
    records = commit_object(labels, masks)
    assert set(np.unique(labels)) == {0, 7, 8}
    assert (labels[4, 40:50, 40:50] == 7).all()  # not overwritten
    assert np.array_equal(labels[2:9] == 8, truth[2:9] & (before[2:9] == 0))
    for r in reversed(records):
        undo_commit(labels, r)
    assert np.array_equal(labels, before)
    with pytest.raises(ValueError, match="shape"):
        commit_object(labels, {(3,): np.ones((5, 5), bool)})
    assert np.array_equal(labels, before)
