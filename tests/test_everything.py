"""Everything mode: algorithm on a fake predictor, real network end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_tinysam.everything as ev
from napari_tinysam import SamPredictor
from napari_tinysam.everything import Cancelled, segment_everything, segment_volume
from napari_tinysam.masks import box_nms, build_point_grid, paint_labels, stitch_pair
from tests.fakes import FakeSam


def _scene(side: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    labels = np.zeros((side, side), np.int32)
    for i, (cy, cx, r) in enumerate([(24, 24, 14), (30, 90, 18), (90, 40, 20), (95, 100, 12)], 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return labels


def _iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def test_point_grid_at_cell_centres():
    g = build_point_grid(4)
    assert g.shape == (16, 2)
    np.testing.assert_allclose(np.unique(g[:, 0]), [0.125, 0.375, 0.625, 0.875])
    assert tuple(g[1]) == (0.375, 0.125)  # x varies fastest


def test_box_nms_keeps_best_of_overlapping():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], float)
    keep = box_nms(boxes, np.array([0.5, 0.9, 0.7]), 0.7)
    assert keep.tolist() == [1, 2]


def test_paint_labels_higher_score_wins_and_ids_by_score():
    a = np.ones((4, 4), bool)
    b = np.ones((2, 2), bool)
    labels, ids = paint_labels([a, b], [(0, 0, 4, 4), (1, 1, 3, 3)], np.array([0.8, 0.9]), (5, 5))
    assert ids == [2, 1]
    assert (labels[1:3, 1:3] == 1).all() and labels[0, 0] == 2 and labels[4, 4] == 0
    # a mask entirely hidden by a better one gets no id
    labels, ids = paint_labels([b, a], [(1, 1, 3, 3), (0, 0, 4, 4)], np.array([0.5, 0.9]), (5, 5))
    assert ids == [0, 1] and labels.max() == 1


def test_paint_labels_drops_slivers_and_frees_their_pixels_for_the_masks_after_them():
    better = np.ones((3, 4), bool)  # rows 0-2, score 0.9
    mostly_hidden = np.ones((4, 4), bool)  # rows 0-3, score 0.8: would keep row 3 only (4 of 16)
    below = np.ones((2, 4), bool)  # rows 3-4, score 0.5
    masks, boxes = [mostly_hidden, better, below], [(0, 0, 4, 4), (0, 0, 3, 4), (3, 0, 5, 4)]
    scores = np.array([0.8, 0.9, 0.5])
    labels, ids = paint_labels(masks, boxes, scores, (6, 4), min_kept=0.3)
    assert ids == [0, 1, 2]
    assert (labels[:3] == 1).all() and (labels[3:5] == 2).all() and (labels[5] == 0).all()
    # without the rule, or with a share it meets, the sliver stays an object of its own
    for min_kept in (0.0, 0.25):
        labels, ids = paint_labels(masks, boxes, scores, (6, 4), min_kept=min_kept)
        assert ids == [2, 1, 3] and (labels[3] == 2).all() and (labels[4] == 3).all()


def test_everything_mode_leaves_no_sliver_of_a_mask_as_an_object(monkeypatch):
    """Each object also comes as a worse mask that reaches one cell further right: painted
    under the better one, only a crescent of it would show, and that is not an object."""
    truth = _scene()
    fake = FakeSam(truth)
    decode = fake.decode

    def with_a_wider_duplicate(features, points=None, boxes=None, mask_input=None):
        low, iou = decode(features, points, boxes, mask_input)
        obj = low[:, 3] > 0  # token 3: a duplicate of the object (IoU 0.9)
        wider = obj.clone()
        wider[:, :, 1:] |= obj[:, :, :-1]
        low[:, 3] = torch.where(wider, 20.0, -20.0)
        return low, iou

    monkeypatch.setattr(fake, "decode", with_a_wider_duplicate)
    image = (truth > 0).astype(np.uint8) * 200 + 10
    labels, records = segment_everything(
        SamPredictor(fake), image, mode="grid", points_per_side=16, box_nms_thresh=0.99, return_records=True
    )
    assert labels.max() == 4 and len(records) == 4
    for rec in records:
        assert (labels == rec["label"]).sum() >= ev.MIN_KEPT * rec["area"]
    for k in range(1, 5):  # each object whole (the fake's masks are 4x coarser than the image)
        assert max(_iou(labels == j, truth == k) for j in range(1, 5)) > 0.75


@pytest.mark.parametrize("mode", ["grid", "hierarchical"])
def test_fake_scene_every_object_once(mode):
    truth = _scene()
    fake = FakeSam(truth)
    labels, records = segment_everything(
        SamPredictor(fake), (truth > 0).astype(np.uint8) * 200 + 10, mode=mode, points_per_side=16, return_records=True
    )
    assert labels.dtype == np.int32 and labels.shape == truth.shape
    assert labels.max() == 4 and len(records) == 4
    for k in range(1, 5):
        best = max(_iou(labels == j, truth == k) for j in range(1, 5))
        assert best > 0.75  # the fake's masks are 4x coarser than the image
    for r in records:
        assert set(r) >= {"segmentation", "area", "bbox", "predicted_iou", "stability_score", "point_coords"}
        assert r["predicted_iou"] == pytest.approx(0.95)  # the duplicate (0.9) lost NMS
        x, y, w, h = r["bbox"]
        assert r["segmentation"][y : y + h, x : x + w].sum() == r["area"]


def test_hierarchical_round_two_skips_covered_points():
    truth = _scene()
    image = (truth > 0).astype(np.uint8) * 200 + 10
    fake = FakeSam(truth)
    segment_everything(SamPredictor(fake), image, mode="grid", points_per_side=16)
    grid_prompts = fake.prompts_seen
    fake.prompts_seen = 0
    segment_everything(SamPredictor(fake), image, mode="hierarchical", points_per_side=16)
    pts = build_point_grid(16) * 128
    on_objects = sum(truth[int(y), int(x)] > 0 for x, y in pts)
    # round 1: 4x4 sparse points; round 2: only dense points outside the objects that
    # round 1 found with high confidence (the 4x4 grid does not hit every object)
    assert grid_prompts == 256
    second_round = fake.prompts_seen - 16
    assert 256 - on_objects <= second_round < 256 - 0.4 * on_objects


def test_hierarchical_all_covered_has_no_second_round():
    truth = np.ones((64, 64), np.int32)
    truth[:, :32] = 2
    image = truth.astype(np.uint8) * 50
    fake = FakeSam(truth)
    labels = segment_everything(SamPredictor(fake), image, mode="hierarchical", points_per_side=8)
    assert labels.max() == 2
    assert fake.prompts_seen < 4 + 64  # most dense points skipped, no crash


def test_constant_and_bad_input():
    fake = FakeSam(_scene())
    assert segment_everything(SamPredictor(fake), np.full((128, 128), 7, np.uint16)).max() == 0
    with pytest.raises(ValueError, match="too small"):
        segment_everything(SamPredictor(fake), np.zeros((1, 1)))
    with pytest.raises(ValueError, match="points_per_side >= 4"):
        segment_everything(SamPredictor(fake), _scene(), points_per_side=3)
    with pytest.raises(ValueError, match="pred_iou_thresh"):
        segment_everything(SamPredictor(fake), _scene(), pred_iou_thresh=1.5)
    with pytest.raises(ValueError, match="mode"):
        segment_everything(SamPredictor(fake), _scene(), mode="dense")
    with pytest.raises(ValueError, match=r"\(Z, H, W\) stack"):
        segment_volume(SamPredictor(fake), np.zeros((2, 3, 128, 128)))


def test_min_mask_region_area_removes_islands():
    truth = _scene()
    labels_island = truth.copy()
    labels_island[60:62, 60:62] = 1  # a tiny island belonging to object 1
    fake = FakeSam(labels_island)
    image = (labels_island > 0).astype(np.uint8) * 200 + 10
    kept = segment_everything(SamPredictor(fake), image, mode="grid", points_per_side=16, min_mask_region_area=50)
    assert not (kept[58:64, 58:64] > 0).any()


def test_stitch_pair_links_one_to_one():
    prev = np.zeros((10, 10), np.int32)
    prev[2:6, 2:6] = 5
    cur = np.zeros((10, 10), np.int32)
    cur[2:6, 2:5] = 1  # overlaps 5 well
    cur[2:6, 5:8] = 2  # touching neighbour: must stay a separate object
    out, nxt = stitch_pair(prev, cur, 6, 0.5)
    assert set(np.unique(out)) == {0, 5, 6} and nxt == 7
    assert (out[2:6, 2:5] == 5).all() and (out[2:6, 5:8] == 6).all()


def _volume():
    """Z=10 stack: a disc on slices 3..7, two touching discs on every slice."""
    side = 64
    yy, xx = np.mgrid[:side, :side]
    vol = np.zeros((10, side, side), np.int32)
    for z in range(10):
        vol[z][(yy - 16) ** 2 + (xx - 14) ** 2 <= 64] = 1
        vol[z][(yy - 16) ** 2 + (xx - 30) ** 2 <= 64] = 2
        if 3 <= z <= 7:
            vol[z][(yy - 46) ** 2 + (xx - 40) ** 2 <= 100] = 3
    return vol


class _SliceFakes:
    """A predictor whose fake model follows the slice being segmented."""

    def __init__(self, vol):
        self.vol = vol


def test_segment_volume_stitches_and_reports_progress(monkeypatch):
    vol = _volume()
    import napari_tinysam.everything as ev

    calls = []
    z_of = iter(range(10))

    def fake_everything(predictor, image, **kw):
        z = next(z_of)
        return segment_everything(
            SamPredictor(FakeSam(vol[z])),
            (vol[z] > 0).astype(np.uint8) * 200 + 10,
            points_per_side=16,
            mode=kw.get("mode", "hierarchical"),
        )

    monkeypatch.setattr(ev, "segment_everything", fake_everything)
    out = segment_volume(
        SamPredictor(FakeSam(vol[0])), (vol > 0).astype(np.uint16), progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (10, 10) and len(calls) == 10
    ids_3 = {int(out[z][46, 40]) for z in range(3, 8)}
    assert len(ids_3) == 1 and 0 not in ids_3  # one id across slices 3..7
    assert out[2][46, 40] == 0 and out[8][46, 40] == 0
    left = {int(out[z][16, 14]) for z in range(10)}
    right = {int(out[z][16, 30]) for z in range(10)}
    assert len(left) == 1 and len(right) == 1 and left != right  # touching objects stay two


def test_segment_volume_cancel_returns_nothing():
    vol = _volume()
    seen = []
    with pytest.raises(Cancelled):
        segment_volume(
            SamPredictor(FakeSam(vol[0])),
            (vol > 0).astype(np.uint16),
            progress=lambda d, t: seen.append(d),
            cancel=lambda: len(seen) >= 2,
        )
    assert seen == [1, 2]


def _ids_as_masks(predictor, rgb, mode, params, raw=None):
    """Test double of one tile's segmentation: every grey value is one object, cut where
    the tile ends (as a real model sees an object at a tile's edge)."""
    out = ev._Masks()
    for v in np.unique(rgb[..., 0]):
        if v == 0:
            continue
        crop, place = ev._tight(rgb[..., 0] == v, 0, 0)
        out.crops.append(crop)
        out.places.append(place)
        out.iou.append(1.0)
        out.stability.append(1.0)
        out.points.append((0.0, 0.0))
    return out


def test_tiles_give_every_object_once_and_whole(monkeypatch):
    truth = np.zeros((300, 400), np.int32)
    yy, xx = np.mgrid[:300, :400]
    rng = np.random.default_rng(0)
    k = 0
    for cy in range(15, 300, 34):  # a lattice of discs, many across tile borders
        for cx in range(15, 400, 34):
            k += 1
            truth[(yy - cy - rng.integers(-5, 6)) ** 2 + (xx - cx - rng.integers(-5, 6)) ** 2 <= 81] = k
    rgb = np.repeat(truth[..., None].astype(np.uint8), 3, -1)
    monkeypatch.setattr(ev, "_segment_masks", _ids_as_masks)
    seen = []
    out = ev._segment_tiled(None, rgb, "auto", {}, (64, 64), (20, 20), lambda d, t: seen.append((d, t)))
    assert seen[-1] == (5 * 7, 5 * 7)  # one progress step per tile
    assert out.max() == k
    for i in range(1, k + 1):
        ids = np.unique(out[truth == i])
        assert len(ids) == 1 and ids[0] > 0  # whole, not cut at a tile border
        assert ((out == ids[0]) == (truth == i)).all()  # and nothing else
    # with a halo smaller than the objects, objects at tile borders come cut
    cut = ev._segment_tiled(None, rgb, "auto", {}, (64, 64), (2, 2), None)
    assert any(len(np.unique(cut[truth == i])) > 1 for i in range(1, k + 1))


def test_a_tiles_object_mostly_under_an_earlier_tiles_object_is_no_sliver(monkeypatch):
    """Both tiles see the whole image (the halo is a tile wide). The first tile's object
    has its centre in the first tile; the second tile answers with an object that lies
    mostly under it (centre in the second tile): only a strip of 120 of its 1480 pixels
    is free, and that strip is no object."""
    first = np.zeros((64, 128), bool)
    first[10:50, 20:100] = True  # centre x 59.5
    second = np.zeros((64, 128), bool)
    second[10:50, 66:100] = True
    second[20:30, 100:112] = True  # centre x 84.4
    answers = [first, second]

    def one_object_per_tile(predictor, rgb, mode, params, raw=None):
        mask = answers.pop(0)
        return _ids_as_masks(predictor, np.repeat(mask[..., None].astype(np.uint8), 3, -1), mode, params)

    monkeypatch.setattr(ev, "_segment_masks", one_object_per_tile)
    rgb = np.full((64, 128, 3), 100, np.uint8)
    rgb[0, 0] = 0
    out = ev._segment_tiled(None, rgb, "auto", {}, (64, 64), (0, 64), None)
    assert not answers  # both tiles were segmented
    assert out.max() == 1 and ((out == 1) == first).all()


def test_tiling_settings_are_checked():
    fake = FakeSam(np.zeros((128, 128), np.int32))
    image = np.random.default_rng(0).integers(0, 50, (128, 128)).astype(np.uint16)
    with pytest.raises(ValueError, match="halo needs tile_shape"):
        segment_everything(SamPredictor(fake), image, halo=8)
    with pytest.raises(ValueError, match="at least 32"):
        segment_everything(SamPredictor(fake), image, tile_shape=16)
    with pytest.raises(ValueError, match="return_records"):
        segment_everything(SamPredictor(fake), image, tile_shape=64, return_records=True)


def test_a_tiled_image_can_be_cancelled_between_tiles(monkeypatch):
    """A large field takes a while tile by tile: cancel stops before the next tile and
    returns nothing partial."""
    fake = FakeSam(np.zeros((128, 128), np.int32))
    image = np.random.default_rng(0).integers(0, 50, (128, 192)).astype(np.uint16)
    monkeypatch.setattr(ev, "_segment_masks", _ids_as_masks)
    seen = []
    with pytest.raises(Cancelled, match="before tile 3 of 6"):
        segment_everything(
            SamPredictor(fake),
            image,
            mode="grid",
            tile_shape=64,
            halo=8,
            progress=lambda d, t: seen.append(d),
            cancel=lambda: len(seen) >= 2,
        )
    assert seen == [1, 2]
    with pytest.raises(Cancelled, match="before the image"):
        segment_everything(SamPredictor(fake), image, mode="grid", cancel=lambda: True)
    labels = segment_everything(SamPredictor(fake), image, mode="grid", tile_shape=64, halo=8, cancel=lambda: False)
    assert labels.shape == image.shape


def _relabelled(block: np.ndarray) -> np.ndarray:
    """Ids 1..n in order of appearance in a crop (as a tile's own segmentation numbers them)."""
    ids, inverse = np.unique(block, return_inverse=True)
    return inverse.reshape(block.shape) + (ids[0] != 0)


def test_stacks_with_large_slices_are_tiled_in_the_plane_every_object_once_and_whole(monkeypatch):
    """3D instances tile by tile (each tile with its halo through every slice): an object
    crossing a tile border comes whole from the tile that holds its centroid, never twice;
    progress counts every slice of every tile."""
    truth = np.zeros((5, 150, 200), np.int32)
    zz, yy, xx = np.mgrid[:5, :150, :200]
    k = 0
    for cy in range(15, 150, 30):  # a lattice of balls, many across tile borders
        for cx in range(15, 200, 30):
            k += 1
            truth[(zz - 2) ** 2 * 4 + (yy - cy) ** 2 + (xx - cx) ** 2 <= 100] = k
    monkeypatch.setattr(ev, "volume_params", lambda model, kwargs, scale: {"denoise_sigma": 0.0})
    monkeypatch.setattr(
        ev,
        "volume_head_maps",
        lambda predictor, sub, limits, step, cancel, sigma: (
            [step(i + 1, len(sub)) for i in range(len(sub)) if step],
            sub,
        )[1],
    )
    monkeypatch.setattr(ev, "volume_from_maps", lambda maps, **params: _relabelled(maps))
    seen = []
    predictor = SamPredictor(FakeSam(np.zeros((128, 128), np.int32)))
    out = ev._volume_auto(
        predictor, truth, (0, 1), {"tile_shape": 64, "halo": 16}, lambda d, t: seen.append((d, t)), None
    )
    assert seen[-1] == (5 * 3 * 4, 5 * 3 * 4) and len(seen) == 5 * 3 * 4
    assert out.max() == k
    for i in range(1, k + 1):
        ids = np.unique(out[truth == i])
        assert len(ids) == 1 and ids[0] > 0 and ((out == ids[0]) == (truth == i)).all()
    cut = ev._volume_auto(predictor, truth, (0, 1), {"tile_shape": 64, "halo": 2}, None, None)
    assert any(len(np.unique(cut[truth == i])) > 1 for i in range(1, k + 1))  # a halo under the objects cuts them


def test_a_stack_with_large_slices_and_small_nuclei_is_tiled_automatically():
    """Slices larger than the model's input whose nuclei would be too small at the
    whole-slice scale are tiled (a 2x2 mosaic of the sample field); the nuclei are then
    found as in 2D. Stacks whose slices fit the input are never tiled."""
    from napari_tinysam import load_model, samples
    from napari_tinysam.metrics import match_instances

    model = load_model("default")
    field, truth = samples.nuclei_2d(), samples.nuclei_2d_labels()
    mosaic = np.block([[field, field[:, ::-1]], [field[::-1], field[::-1, ::-1]]])
    lab = np.block(
        [
            [truth, truth[:, ::-1] + 1000 * (truth[:, ::-1] > 0)],
            [truth[::-1] + 2000 * (truth[::-1] > 0), truth[::-1, ::-1] + 3000 * (truth[::-1, ::-1] > 0)],
        ]
    )
    stack = np.stack([mosaic, mosaic])
    predictor = SamPredictor(model)
    assert ev.volume_tiles(predictor, stack[:, :520, :696], (0, 1000), 1.0) is None
    tiles = ev.volume_tiles(predictor, stack, tuple(np.percentile(mosaic, (0.5, 99.5))), 1.0)
    assert tiles is not None and max(tiles[0]) + 2 * max(tiles[1]) <= model.img_size
    tiled = segment_volume(predictor, stack)
    whole = segment_volume(predictor, stack, tile_shape=2048)
    f1_tiled = match_instances(tiled[0], lab)["f1"]
    assert f1_tiled > 0.85 and f1_tiled > match_instances(whole[0], lab)["f1"] + 0.05
