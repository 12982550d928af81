"""Instance matching scores and the classical baseline."""

from __future__ import annotations

import numpy as np

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
