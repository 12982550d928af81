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
    res = segment_object_in_volume(
        predictor, stack, 5, [[50, 48]], [1], progress=lambda z, m, s: seen.append(z), method="decoder"
    )
    assert res.method == "decoder" and res.shape == stack.shape and res.dtype == bool
    assert res.z_range == (2, 8)
    assert _iou(np.asarray(res), truth) > 0.8
    assert sorted(seen) == list(range(2, 9))  # every slice of the object, reported once
    # only the slices the object spans plus one each side were embedded (slices 0 and 10 never)
    assert set(res.embedded) <= set(range(1, 10)) and {1, 9} <= set(res.visited)
    assert np.isfinite(res.scores[2:9]).all() and np.isnan(res.scores[[0, 1, 9, 10]]).all()
    assert 2 <= res.least_confident <= 8
    # z_range bounds the walk
    res = segment_object_in_volume(predictor, stack, 5, [[50, 48]], [1], z_range=(4, 6), method="decoder")
    assert res.z_range == (4, 6)


def test_the_head_grows_the_clicked_object_in_3d_from_the_slices_around_it(predictor):
    stack, truth = disc_stack()
    # 20 empty slices above and below: only the slices around the object are embedded
    pad = np.full((20, *stack.shape[1:]), 100, np.uint16) + np.random.default_rng(1).normal(
        0, 20, (20, *stack.shape[1:])
    ).astype(np.uint16)
    tall, tall_truth = (
        np.concatenate([pad, stack, pad]),
        np.concatenate([np.zeros_like(pad, bool), truth, np.zeros_like(pad, bool)]),
    )
    seen = []
    res = segment_object_in_volume(predictor, tall, 25, [[50, 48]], [1], progress=lambda z, m, s: seen.append(z))
    assert res.method == "head"  # the default for a model with a head and clicks only
    first, last = res.z_range
    assert (first, last) == (22, 28)  # the disc's slices
    assert _iou(np.asarray(res), tall_truth) > 0.65
    assert seen == list(range(first, last + 1))
    assert not (res[:, 30, 105]).any()  # the other nucleus, through every slice, is not part of it
    embedded = set(res.embedded)
    assert 25 in embedded and not embedded & {*range(0, 12), *range(39, 51)}
    assert np.isfinite(res.scores[first : last + 1]).all() and np.isnan(res.scores[:first]).all()
    # the same object from a click on another of its slices
    other = segment_object_in_volume(predictor, tall, 23, [[50, 48]], [1])
    assert _iou(np.asarray(other), np.asarray(res)) > 0.8
    # z_range bounds it; cancelling before the first slice returns nothing
    assert segment_object_in_volume(predictor, tall, 25, [[50, 48]], [1], z_range=(24, 26)).z_range == (24, 26)
    cancelled = segment_object_in_volume(predictor, tall, 25, [[50, 48]], [1], cancel=lambda: True)
    assert cancelled.cancelled and not cancelled.any()


def test_the_head_shows_the_clicked_slice_after_its_own_embedding_then_grows(predictor):
    from napari_tinysam.head_object import iter_head_object
    from napari_tinysam.propagate import _head_slices

    stack, truth = disc_stack()
    slices = _head_slices(predictor, stack, None, None, {5: np.array([[50.0, 48.0]])})
    estimates = iter_head_object(predictor, stack, {5: np.array([[50.0, 48.0]])}, slices)
    first = next(estimates)
    assert slices.visited == [5] and set(first.sections) == {5} and not first.final
    assert _iou(first.sections[5], truth[5]) > 0.6
    second = next(estimates)
    assert slices.visited == [5, 4] and set(second.sections) <= {4, 5} and 5 in second.sections
    *_, last = estimates
    assert last.final and min(last.sections) == 2 and max(last.sections) == 8


def test_the_head_follows_the_voxel_size_of_a_finely_sampled_stack(predictor):
    """Slices 0.73 pixels apart, a nucleus missing from three of them: with the stack's
    scale the smoothing across slices spans them and one click gives the whole nucleus."""
    from tests.stacks import gapped_nuclei_stack

    stack, truth = gapped_nuclei_stack()
    nucleus = truth == 1
    for z in (12, 24):  # a click below or above the slices where it does not show
        half = segment_object_in_volume(predictor, stack, z, [[30, 30]], [1])
        whole = segment_object_in_volume(predictor, stack, z, [[30, 30]], [1], scale=(0.73, 1.0, 1.0))
        assert half.method == whole.method == "head"
        assert _iou(np.asarray(half), nucleus) < 0.55 and _iou(np.asarray(whole), nucleus) > 0.7
        assert whole.z_range[0] <= 4 and whole.z_range[1] >= 32
    with pytest.raises(ValueError, match="voxel size"):
        segment_object_in_volume(predictor, stack, 12, [[30, 30]], [1], scale=(1, 1))


def test_a_click_where_the_head_sees_nothing_still_gives_an_object_there(predictor):
    stack, _ = disc_stack()
    res = segment_object_in_volume(predictor, stack, 5, [[10, 10]], [1], method="head")
    assert res[5, 10, 10] and res.sum() < 200


def test_the_method_follows_the_prompts():
    from types import SimpleNamespace

    from napari_tinysam.annotate import Prompts
    from napari_tinysam.propagate import choose_method

    with_head, without = SimpleNamespace(has_instance_head=True), SimpleNamespace(has_instance_head=False)
    click = {5: Prompts(np.array([[50.0, 48.0]]), np.array([1]))}
    boxed = {5: Prompts(np.zeros((0, 2)), np.zeros(0, np.int64), np.array([40.0, 40, 60, 60]))}
    negative = {5: Prompts(np.array([[50.0, 48.0], [60, 60]]), np.array([1, 0]))}
    assert choose_method(with_head, click, None) == "head"
    assert choose_method(without, click, None) == "decoder"
    assert choose_method(with_head, boxed, None) == choose_method(with_head, negative, None) == "decoder"
    assert choose_method(with_head, {}, {5: np.ones((4, 4), bool)}) == "decoder"
    with pytest.raises(ValueError, match="positive points only"):
        choose_method(with_head, boxed, None, "head")
    with pytest.raises(ValueError, match="needs a model with an instance head"):
        choose_method(without, click, None, "head")
    with pytest.raises(ValueError, match="method must be one of"):
        choose_method(with_head, click, None, "magic")


def test_fills_between_two_prompted_slices(predictor):
    stack, truth = disc_stack()
    res = segment_object_in_volume(
        predictor, stack, [3, 7], [[[50, 48]], [[50, 48]]], [[1], [1]], z_range=(3, 7), method="decoder"
    )
    assert res.z_range == (3, 7)
    for z in range(3, 8):
        assert _iou(res[z], truth[z]) > 0.7, z


def test_given_mask_is_kept_on_its_slice(predictor):
    stack, truth = disc_stack()
    res = segment_object_in_volume(predictor, stack, 5, mask=truth[5])
    assert np.array_equal(res[5], truth[5]) and res.z_range == (2, 8)


def test_cancel_stops_after_the_current_slice(predictor):
    stack, _ = disc_stack()
    res = segment_object_in_volume(predictor, stack, 5, [[50, 48]], [1], cancel=lambda: True, method="decoder")
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


@pytest.mark.parametrize("method", ["head", "decoder"])
def test_a_click_on_the_outer_half_of_an_edge_pixel_is_on_the_slice(predictor, method):
    """Pixel centres are at integers (napari's data coordinates), so the last column
    reaches x = w - 0.5: a click there, on a nucleus cut by the border, segments it."""
    stack, truth = disc_stack()
    stack, truth = stack[:, :, :56], truth[:, :, :56]  # the disc (x 38-62) cut at x = 56
    res = segment_object_in_volume(predictor, stack, 5, [[55.5, 48]], [1], method=method)
    assert _iou(res[5], truth[5]) > 0.6
    with pytest.raises(ValueError, match="outside the slice"):
        segment_object_in_volume(predictor, stack, 5, [[56.1, 48]], [1], method=method)


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


def test_an_object_ends_before_the_next_nucleus_above_it():
    from napari_tinysam.head_object import end_at_next_object

    radii = [4, 6, 8, 6, 4, 6, 8, 6, 4]  # two nuclei stacked in z, joined at slice 4
    yy, xx = np.mgrid[:32, :32]
    merged = np.stack([(yy - 16) ** 2 + (xx - 16) ** 2 <= r * r for r in radii])
    assert end_at_next_object(merged, 2, 2).any((1, 2)).tolist() == [True] * 5 + [False] * 4
    # a thin tail (under a fifth of the largest clicked section) is not part of it
    tail = merged.copy()
    tail[0] = (yy - 16) ** 2 + (xx - 16) ** 2 <= 9
    assert end_at_next_object(tail, 2, 2).any((1, 2)).tolist() == [False] + [True] * 4 + [False] * 4
    # clicked off its largest slice, the object still grows to it
    assert end_at_next_object(merged, 0, 0).any((1, 2)).tolist() == [True] * 5 + [False] * 4


def test_the_head_window_holds_every_click_in_the_plane():
    from napari_tinysam.head_object import _crop_around

    fg = np.zeros((200, 200), np.float32)
    fg[20:40, 20:40] = 1.0  # the object under the first click; the second click is on background
    clicks = np.array([[30, 30], [150, 170]])
    y0, y1, x0, x1 = _crop_around(fg, clicks, 0.5)
    assert y0 <= 20 and x0 <= 20 and y1 > 150 and x1 > 170
    # the map known on a part of a larger slice only (a window): the same crop there
    part = _crop_around(fg[10:], clicks, 0.5, (200, 200), (10, 0))
    assert part == (y0, y1, x0, x1)


def test_a_click_in_a_stack_with_large_slices_reads_a_window_around_it(predictor):
    """Slices larger than the model's input with small nuclei (a 2x2 mosaic of the sample
    field): the head reads a window around the click at a scale where the nuclei are
    large enough, as everything mode tiles such slices; small slices are read whole."""
    from napari_tinysam import samples
    from napari_tinysam.evaluation import innermost_point
    from napari_tinysam.propagate import click_window

    field, truth = samples.nuclei_2d(), samples.nuclei_2d_labels()
    mosaic = np.block([[field, field[:, ::-1]], [field[::-1], field[::-1, ::-1]]])
    labels = np.block([[truth, np.zeros_like(truth)], [np.zeros_like(truth), np.zeros_like(truth)]])
    stack = np.stack([mosaic] * 3)
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    target = labels == ids[np.argsort(areas)[len(areas) // 2]]  # a nucleus of median size
    x, y = innermost_point(target)
    limits = tuple(np.percentile(mosaic, (0.5, 99.5)))
    window = click_window(predictor, stack, {1: np.array([[x, y]])}, limits, 1.0)
    assert window is not None
    y0, y1, x0, x1 = window
    assert 0 <= y0 <= y < y1 <= mosaic.shape[0] and 0 <= x0 <= x < x1 <= mosaic.shape[1]
    assert y1 - y0 < predictor.model.img_size and x1 - x0 < predictor.model.img_size  # magnified
    assert click_window(predictor, stack[:, :520, :696], {1: np.array([[x, y]])}, limits, 1.0) is None
    res = segment_object_in_volume(predictor, stack, 1, [[x, y]], [1])
    assert res.method == "head" and _iou(res[1], target) > 0.7
    # cancelled at once: not even the crop that measures the nuclei is embedded
    fresh = SamPredictor(predictor.model)
    cancelled = segment_object_in_volume(fresh, stack, 1, [[x, y]], [1], cancel=lambda: True)
    assert cancelled.cancelled and not cancelled.any() and len(fresh.cache) == 0


def test_the_head_keeps_only_the_maps_of_the_window_it_reads(predictor):
    """With a window, each slice's maps are computed and kept for the window alone (a
    24-slice object in 2080 x 2784 slices: 1.1 GB of maps before, docs/benchmarks.md);
    read back, the slice is background outside the window, and any crop agrees with it."""
    from napari_tinysam.head_object import HeadSlices

    stack, _ = disc_stack()
    big = np.pad(stack, ((0, 0), (0, 64), (0, 96)), constant_values=100)
    window = (10, 90, 20, 110)
    slices = HeadSlices(predictor, big, (100, 900), 1.0, window=window)
    maps = slices[5]
    assert maps.shape == (3, *big.shape[1:]) and slices._maps[5].shape == (3, 80, 90)
    assert maps[0, 48, 50] > 0.5  # the disc, inside the window
    outside = np.ones(big.shape[1:], bool)
    outside[10:90, 20:110] = False
    assert (maps[0][outside] == 0).all() and (maps[1:, outside] == 1).all()
    crop = slices.window(4, 6, slice(0, 60), slice(80, 150), 5)  # straddles the window's edges
    np.testing.assert_array_equal(crop[:, 1], maps[:, 0:60, 80:150])
    assert crop.dtype == np.float32 and sorted(slices.visited) == [4, 5, 6]
    fg, origin = slices.foreground(5)  # what a click's crop is found on: the window's part only
    assert origin == (10, 20)
    np.testing.assert_array_equal(fg, maps[0, 10:90, 20:110])
