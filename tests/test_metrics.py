"""Instance matching scores, the benchmark's click placement and the classical baseline."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_tinysam.evaluation import area_bins, corrective_point, innermost_point
from napari_tinysam.metrics import best_match_iou, match_instances, otsu_watershed


def test_match_instances_counts():
    truth = np.zeros((10, 10), np.int32)
    truth[0:4, 0:4] = 1
    truth[6:10, 6:10] = 2
    pred = np.zeros_like(truth)
    pred[0:4, 0:3] = 7  # IoU 0.75 with object 1
    pred[6:7, 6:7] = 3  # IoU 1/16 with object 2: not a match
    pred[5, 0] = 9  # false positive
    r = match_instances(pred, truth)
    assert r["n_pred"] == 3 and r["n_true"] == 2
    assert r["f1"] == 2 * 1 / 5 and r["precision"] == 1 / 3 and r["recall"] == 0.5
    assert r["mean_matched_iou"] == 0.75
    assert best_match_iou(truth, truth) == 1.0


def test_otsu_watershed_splits_two_touching_discs():
    yy, xx = np.mgrid[:60, :80]
    img = np.zeros((60, 80))
    img[(yy - 30) ** 2 + (xx - 28) ** 2 <= 144] = 100
    img[(yy - 30) ** 2 + (xx - 50) ** 2 <= 144] = 100
    assert otsu_watershed(img).max() == 2


def test_innermost_point_matches_the_whole_image_transform():
    # the transform runs over the mask's box only; it must pick the same pixel (first in
    # raster order on ties) as the transform over the whole zero-padded image
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = rng.integers(3, 90, 2)
        mask = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 4)) > rng.uniform(0.45, 0.6)
        if not mask.any():
            continue
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        assert innermost_point(mask) == (float(x), float(y))
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False  # a hole: four pixels tie at sqrt(2); the first in raster order wins
    assert innermost_point(ring) == (3.0, 3.0)


def test_corrective_point_targets_the_largest_error_region():
    gt = np.zeros((40, 40), bool)
    gt[5:25, 5:25] = True
    pred = gt.copy()
    pred[5:25, 5:12] = False  # missed strip, 20 x 7
    pred[30:33, 30:33] = True  # small false positive
    (x, y), label = corrective_point(pred, gt)
    assert label == 1 and 5 <= x < 12 and 5 <= y < 25
    assert corrective_point(gt, gt) is None


def test_area_bins_split_objects_at_the_bin_edges():
    areas = np.array([10, 149, 150, 299, 300, 5000])
    bins = area_bins(areas)
    assert [label for label, _ in bins] == ["0-150", "150-300", "300-600", ">= 600"]
    assert [np.nonzero(sel)[0].tolist() for _, sel in bins] == [[0, 1], [2, 3], [4], [5]]
    assert [label for label, _ in area_bins(np.array([700]))] == [">= 600"]  # empty bins left out
