"""The instance head and everything mode "auto": seeds, head-only labels, one prompt per
object, defaults from the model, checkpoints with a head, training and resuming."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_tinysam import SamPredictor, segment_everything, segment_volume
from napari_tinysam.distill.data import Augment, Sample, augment_crop
from napari_tinysam.distill.instance import instance_targets, mixture, parse_source, stack_slices
from napari_tinysam.everything import (
    VOLUME_THRESHOLDS,
    auto_input_size,
    default_mode,
    denoise_slice,
    recommended_thresholds,
    volume_contrast_limits,
    volume_from_maps,
)
from napari_tinysam.instances import (
    _window_origin,
    add_missed_blobs,
    adjust_by_contrast,
    labels_from_maps,
    mean_noise,
    object_prompts,
    split_stacked_objects,
)
from napari_tinysam.masks import build_point_grid
from napari_tinysam.model import build_sam, read_checkpoint, sam_from_checkpoint, save_checkpoint
from tests.fakes import FakeSam
from tests.stacks import gapped_nuclei_stack, noisy_nuclei_field


def _discs(side: int = 128, spec=((24, 24, 14), (30, 90, 18), (90, 40, 20), (95, 100, 12))) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    labels = np.zeros((side, side), np.int32)
    for i, (cy, cx, r) in enumerate(spec, 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return labels


def _best_iou(labels: np.ndarray, obj: np.ndarray) -> float:
    ids = np.unique(labels[obj])
    ids = ids[ids > 0]
    return max(
        (np.logical_and(labels == i, obj).sum() / np.logical_or(labels == i, obj).sum() for i in ids), default=0.0
    )


def test_targets_are_zero_at_centres_and_one_in_background():
    labels = _discs()
    t = instance_targets(labels, factor=1)
    assert t.shape == (3, 128, 128)
    assert t[0][labels > 0].min() == 1 and t[0][labels == 0].max() == 0
    assert (t[1:, labels == 0] == 1).all()
    for cy, cx in [(24, 24), (30, 90), (90, 40), (95, 100)]:
        assert t[1, cy, cx] == 0 and t[2, cy, cx] == 0
    coarse = instance_targets(labels, factor=4, shape=(40, 40))
    assert coarse.shape == (3, 40, 40) and (coarse[0, 32:] == 0).all() and (coarse[1:, 32:] == 1).all()


def test_seeds_from_hand_made_maps_give_one_object_and_point_each():
    labels = _discs()
    maps = instance_targets(labels, factor=1)
    out = labels_from_maps(maps, 0.5, 0.5, 0.5, min_area=10)
    assert out.max() == 4
    for k in range(1, 5):
        assert _best_iou(out, labels == k) > 0.95
    ids, points, boxes = object_prompts(out)
    assert len(ids) == 4
    centres = {(24, 24), (90, 30), (40, 90), (100, 95)}  # (x, y)
    for x, y in points:
        assert min(abs(x - cx) + abs(y - cy) for cx, cy in centres) <= 2
    # a seed smaller than min_area is dropped, background stays background
    assert labels_from_maps(maps, 0.5, 0.5, 0.5, min_area=10_000).max() == 0


def test_touching_objects_are_split_by_their_seeds():
    labels = _discs(spec=((64, 48, 18), (64, 82, 18)))  # two discs that touch
    assert np.unique(labels).tolist() == [0, 1, 2]
    out = labels_from_maps(instance_targets(labels, factor=1), 0.5, 0.5, 0.5, 10)
    assert out.max() == 2 and _best_iou(out, labels == 1) > 0.9 and _best_iou(out, labels == 2) > 0.9


def test_touching_objects_whose_seed_regions_join_get_a_seed_each():
    yy, xx = np.mgrid[:64, :96]
    centre = np.minimum(np.hypot(yy - 32, xx - 40), np.hypot(yy - 32, xx - 56)).clip(0, 18) / 18
    maps = np.stack([(centre < 1).astype(np.float32), centre, centre])  # the region < 0.6 is one piece
    assert labels_from_maps(maps, 0.5, 0.6, 0.6, 10, seed_depth=0).max() == 1
    out = labels_from_maps(maps, 0.5, 0.6, 0.6, 10)  # a centre-distance minimum for each
    assert out.max() == 2 and out[32, 40] != out[32, 56] and 0 not in (out[32, 40], out[32, 56])


@pytest.mark.parametrize("head_only", [False, True])
def test_auto_mode_finds_each_object_once(head_only):
    truth = _discs()
    fake = FakeSam(truth, head=True)
    image = (truth > 0).astype(np.uint8) * 200 + 10
    labels, records = segment_everything(SamPredictor(fake), image, head_only=head_only, return_records=True)
    assert labels.max() == 4 and len(records) == 4
    for k in range(1, 5):
        assert _best_iou(labels, truth == k) > 0.75  # the fake's masks are 4x coarser
    # one prompt per object (no grid) unless head only (no prompt at all)
    assert fake.prompts_seen == (0 if head_only else 4)


def _discs_and_a_missed_blob():
    """The four discs (what a fake head finds), a small bright disc clear of them (what it
    misses), and an image of both."""
    truth = _discs()
    yy, xx = np.mgrid[: truth.shape[0], : truth.shape[1]]
    blob = (yy - 60) ** 2 + (xx - 64) ** 2 <= 36
    return truth, blob, ((truth > 0) | blob).astype(np.uint8) * 200 + 10


def test_auto_mode_adds_a_bright_object_the_head_misses_unless_told_not_to():
    truth, blob, image = _discs_and_a_missed_blob()
    fake = FakeSam(truth, head=True)  # its head sees only the four discs
    labels = segment_everything(SamPredictor(fake), image)
    assert labels.max() == 5 and _best_iou(labels, blob) > 0.9
    assert segment_everything(SamPredictor(fake), image, blob_contrast=0.0).max() == 4
    with pytest.raises(ValueError, match="blob_contrast"):
        segment_everything(SamPredictor(fake), image, blob_contrast=-1.0)


def test_slices_segmented_one_by_one_skip_the_missed_object_pass_unless_asked():
    truth, blob, image = _discs_and_a_missed_blob()
    stack = np.stack([image] * 3)
    fake = FakeSam(truth, head=True)
    labels = segment_volume(SamPredictor(fake), stack, per_slice=True)
    assert labels.max() == 4 and not labels[:, blob].any()
    labels = segment_volume(SamPredictor(fake), stack, per_slice=True, blob_contrast=0.5)
    assert labels.max() == 5 and (labels[:, 60, 64] == 5).all()  # one object through the slices


def test_default_mode_and_thresholds_come_from_the_model(monkeypatch):
    truth = _discs()
    fake = FakeSam(truth, head=True)
    assert default_mode(fake) == "auto" and default_mode(FakeSam(truth)) == "hierarchical"
    fake.meta = {"auto": {"foreground_thresh": 0.3, "center_thresh": 0.2}}
    t = recommended_thresholds(fake)
    assert t["foreground_thresh"] == 0.3 and t["center_thresh"] == 0.2 and t["boundary_thresh"] == 0.5
    seen = {}
    import napari_tinysam.everything as ev

    real = ev.labels_from_maps

    def spy(maps, fg, c, b, area):
        seen.update(fg=fg, c=c, b=b)
        return real(maps, fg, c, b, area)

    monkeypatch.setattr(ev, "labels_from_maps", spy)
    segment_everything(SamPredictor(fake), truth.astype(np.uint8) * 50)
    assert seen == {"fg": 0.3, "c": 0.2, "b": 0.5}
    segment_everything(SamPredictor(fake), truth.astype(np.uint8) * 50, foreground_thresh=0.6)
    assert seen["fg"] == 0.6  # a value given wins
    # grid modes: no tuned values -> SAM's
    fake.meta = {}
    assert recommended_thresholds(FakeSam(truth), "grid")["pred_iou_thresh"] == 0.88


def test_auto_mode_embeds_images_that_fill_the_input_at_the_models_auto_input_size(monkeypatch):
    """The bundled model prompts at 768 and segments everything at 896: a field or a tile
    that fills the input is embedded at 896 (once, in the predictor's cache), a small
    slice keeps its scale, and a size given wins."""
    import napari_tinysam.everything as ev
    from napari_tinysam import load_model, samples
    from napari_tinysam.metrics import match_instances

    model = load_model("default")
    assert (model.img_size, auto_input_size(model)) == (768, 896)
    sizes = []
    real = ev._sized_predictor

    def spy(*args):
        predictor = real(*args)
        sizes.append(predictor.model.img_size)
        return predictor

    monkeypatch.setattr(ev, "_sized_predictor", spy)
    field, truth = samples.nuclei_2d(), samples.nuclei_2d_labels()  # 520 x 696
    predictor = SamPredictor(model)
    labels = segment_everything(predictor, field)
    assert sizes == [896] and len(predictor.cache) == 1
    assert match_instances(labels, truth)["f1"] > 0.9
    assert np.array_equal(
        segment_everything(predictor, field, head_only=True),
        segment_everything(model.at_input_size(896), field, head_only=True, input_size=896),
    )
    assert len(predictor.cache) == 1  # the 896 embedding was reused
    segment_everything(predictor, field, input_size=768, head_only=True)
    segment_everything(predictor, field[:150, :180], head_only=True)  # 4x the slice is 720 < 768
    assert sizes[-2:] == [768, 768]
    with pytest.raises(ValueError, match="multiple of 16"):
        segment_everything(predictor, field, input_size=900)
    # tiles that fill the input are embedded at the same size (tiles sized at 768)
    segment_everything(predictor, field, head_only=True, tile_shape=(260, 348), halo=(40, 40))
    assert sizes[-4:] == [896] * 4


def test_model_without_head_refuses_auto_and_keeps_hierarchical():
    truth = _discs()
    fake = FakeSam(truth)
    with pytest.raises(ValueError, match="hierarchical"):
        segment_everything(SamPredictor(fake), truth.astype(np.uint8), mode="auto")
    with pytest.raises(ValueError, match="auto"):
        segment_everything(SamPredictor(fake), truth.astype(np.uint8), mode="grid", head_only=True)
    assert segment_everything(SamPredictor(fake), truth.astype(np.uint8) * 50, points_per_side=16).max() == 4


def test_hierarchical_with_head_skips_background_points():
    truth = _discs()
    image = (truth > 0).astype(np.uint8) * 200 + 10
    counts = {}
    for head in (False, True):
        fake = FakeSam(truth, head=head)
        labels = segment_everything(SamPredictor(fake), image, mode="hierarchical", points_per_side=16)
        assert labels.max() == 4
        counts[head] = fake.prompts_seen

    def background(n):
        return sum(truth[int(y), int(x)] == 0 for x, y in build_point_grid(n) * 128)

    # both rounds skip the points where the head is confident of background
    assert counts[True] <= counts[False] - 0.9 * (background(16) + background(4))


def test_empty_constant_and_nan_images():
    fake = FakeSam(_discs(), head=True)
    assert segment_everything(SamPredictor(fake), np.full((128, 128), 3, np.uint16)).max() == 0
    with pytest.raises(ValueError, match="NaN"):
        segment_everything(SamPredictor(fake), np.full((128, 128), np.nan))
    empty = FakeSam(np.zeros((128, 128), np.int32), head=True)
    noise = np.random.default_rng(0).integers(0, 50, (128, 128)).astype(np.uint16)
    assert segment_everything(SamPredictor(empty), noise).max() == 0


def test_the_background_noise_is_measured_past_objects_gradients_and_blur():
    """``mean_noise``: the spread that noise gives the mean of a region, times the square
    root of its pixels: the pixels' own spread for white noise, more for blurred noise
    (neighbouring pixels move together); bright objects and uneven illumination do not
    count."""
    rng = np.random.default_rng(0)
    white = rng.normal(0, 5, (256, 256))
    gradient = np.linspace(0, 40, 256)[None]
    none = np.zeros(white.shape, bool)
    assert 4.5 < mean_noise(white + gradient, none) < 5.5
    nuclei = ndimage.binary_dilation(np.pad(_discs() > 0, 64), iterations=2)
    assert 4.5 < mean_noise(white + 200 * nuclei, nuclei) < 5.5
    blurred = ndimage.gaussian_filter(rng.normal(0, 5, (512, 512)), 1.5)
    blocks = blurred.reshape(32, 16, 32, 16).mean((1, 3))  # the spread of 16 x 16 means, times 16
    assert 0.8 < mean_noise(blurred, np.zeros(blurred.shape, bool)) / (blocks.std() * 16) < 1.25
    assert mean_noise(np.full((64, 64), 7.0), np.zeros((64, 64), bool)) == 0.0  # no noise: not measurable
    # a small image full of objects (a slice of a crowded stack): no clear blocks to compare,
    # the pixel noise stands in (every block's mean would count the objects as noise)
    crowded = 100.0 * ((np.indices((64, 64)) // 8).sum(0) % 2) + rng.normal(0, 5, (64, 64))
    assert 4.0 < mean_noise(crowded, np.ones((64, 64), bool)) < 6.0


def test_an_image_whose_objects_are_its_noise_has_none_and_one_nucleus_is_enough():
    """An empty field whose noise the head took for objects keeps none of them; with one
    real nucleus among them, the image is judged as usual and the nucleus stays."""
    rng = np.random.default_rng(1)
    gray = rng.normal(100, 5, (256, 256))
    texture, _ = ndimage.label(ndimage.gaussian_filter(rng.normal(0, 1, gray.shape), 2) > 0.25)
    assert texture.max() > 20  # patches of the noise's own grain, no brighter than the rest
    assert adjust_by_contrast(texture, gray, 0.2).max() == 0
    yy, xx = np.mgrid[:256, :256]
    nucleus = (yy - 128) ** 2 + (xx - 128) ** 2 < 15**2
    labels = np.where(nucleus, texture.max() + 1, np.where(ndimage.binary_dilation(nucleus, iterations=4), 0, texture))
    out = adjust_by_contrast(labels, np.where(nucleus, 160.0, gray), 0.2)
    assert out.max() > 1 and (out[nucleus] == out[128, 128]).all()


def test_an_empty_field_of_camera_noise_gives_no_objects():
    """Fields with nothing in them but noise (Gaussian read noise, Poisson shot noise,
    blurred, unevenly lit), stretched to full contrast as every image is, looked like
    fields of nuclei: hundreds of objects in 520 x 520 noise."""
    from napari_tinysam import load_model, samples

    predictor = SamPredictor(load_model("default"))
    rng = np.random.default_rng(2)
    for n in (256, 520):
        fields = [
            100 + rng.normal(0, 5, (n, n)),
            rng.poisson(20, (n, n)).astype(float),
            ndimage.gaussian_filter(rng.poisson(20, (n, n)).astype(float), 1.0),
            rng.poisson(20, (n, n)) + np.linspace(0, 10, n)[None],
        ]
        for field in fields:
            assert segment_everything(predictor, field.astype(np.float32)).max() == 0
    assert segment_everything(predictor, samples.nuclei_2d()).max() > 140  # a field of nuclei keeps them


def test_pixel_noise_reads_the_noise_not_the_objects_or_the_illumination():
    from napari_tinysam.instances import pixel_noise

    yy, xx = np.mgrid[:300, :300]
    scene = (
        100.0
        + 0.2 * xx
        + sum(150.0 * ((yy - cy) ** 2 + (xx - cx) ** 2 <= 15**2) for cy, cx in [(60, 60), (150, 200), (230, 90)])
    )
    assert pixel_noise(scene) < 0.5  # edges of objects and a gradient are no noise
    noisy = scene + np.random.default_rng(0).normal(0, 4.0, scene.shape)
    assert 3.6 < pixel_noise(noisy) < 4.4
    assert pixel_noise(ndimage.gaussian_filter(noisy, 1.5)) < 1.0  # smoothed noise reads as less


def test_a_noisy_field_is_smoothed_before_the_model_sees_it_and_a_clean_one_is_not():
    """A field of nuclei at a low signal-to-noise ratio (Poisson noise, the typical
    nucleus 2 standard deviations of the background's noise above it): unsmoothed, the
    head takes the noise for texture and finds next to nothing."""
    from napari_tinysam import load_model, samples
    from napari_tinysam.everything import auto_denoise_sigma
    from napari_tinysam.metrics import match_instances
    from napari_tinysam.predictor import to_uint8_rgb

    predictor = SamPredictor(load_model("default"))
    assert auto_denoise_sigma(to_uint8_rgb(samples.nuclei_2d())) == 0.0  # a clean field is segmented as it is
    noisy, truth = noisy_nuclei_field(snr=2.0)
    assert auto_denoise_sigma(to_uint8_rgb(noisy)) > 1.5
    assert match_instances(segment_everything(predictor, noisy), truth)["f1"] > 0.8
    assert match_instances(segment_everything(predictor, noisy, denoise_sigma=0), truth)["f1"] < 0.3
    # a small, crowded, noisy slice (the bundled synthetic stack, 61 x 57): its nuclei stand out
    assert segment_everything(predictor, samples.nuclei_3d()[15]).max() >= 6
    with pytest.raises(ValueError, match="denoise_sigma"):
        segment_everything(predictor, noisy, denoise_sigma=-1)


def test_segment_volume_auto_links_slices():
    truth = _discs()
    fake = FakeSam(truth, head=True)
    stack = np.stack([(truth > 0) * 200 + 10] * 3).astype(np.uint8)
    out = segment_volume(SamPredictor(fake), stack)
    assert out.shape == stack.shape and len(np.unique(out)) == 5  # 4 objects through 3 slices


def test_faint_background_texture_is_dropped_and_dim_objects_kept():
    truth = _discs()
    gray = np.full(truth.shape, 10.0)
    gray[(truth == 1) | (truth == 2)] = 200.0
    gray[truth == 3] = 60.0  # a dim nucleus: a quarter of the typical contrast
    gray[truth == 4] = 14.0  # faint texture the head may take for an object
    out = adjust_by_contrast(truth, gray, 0.2)
    assert out.max() == 3 and (out[truth == 4] == 0).all() and (out[truth == 3] > 0).all()
    assert adjust_by_contrast(truth, gray, 0.0) is truth


def test_small_bright_objects_the_head_misses_are_added_from_the_image():
    found = _discs()  # what the head found
    yy, xx = np.mgrid[: found.shape[0], : found.shape[1]]
    gray = np.full(found.shape, 10.0)
    gray[found > 0] = 200.0

    def spot(cy, cx, r, value):
        gray[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value

    spot(60, 64, 3, 180.0)  # a micronucleus clear of every object: added
    spot(120, 20, 3, 20.0)  # as large but faint: not an object
    spot(24, 40, 3, 200.0)  # touching object 1: not a separate small object
    spot(5, 120, 1, 200.0)  # a speck under the smallest area
    out = add_missed_blobs(found, gray, 0.5, min_area=12, min_contrast=0.3)
    assert out.max() == 5
    assert (out[found > 0] == found[found > 0]).all()  # found objects keep their ids and pixels
    new = out == 5
    assert new[60, 64] and 20 <= new.sum() <= 40 and not new[120, 20] and not new[5, 120]
    assert not (out[(found == 0) & ~new] > 0).any()
    assert add_missed_blobs(found, gray, 0.0, 12, 0.3) is found
    assert add_missed_blobs(np.zeros_like(found), gray, 0.5, 12, 0.3).max() == 0  # nothing to compare with


def _balls(depth: int = 9, side: int = 64) -> np.ndarray:
    zz, yy, xx = np.mgrid[:depth, :side, :side]
    truth = np.zeros((depth, side, side), np.int32)
    for i, (cy, cx) in enumerate(((20, 20), (44, 44)), 1):
        truth[((zz - depth // 2) / 3.5) ** 2 + ((yy - cy) / 10) ** 2 + ((xx - cx) / 10) ** 2 <= 1] = i
    return truth


def test_volume_from_maps_bridges_a_slice_where_the_head_sees_nothing():
    truth = _balls()
    maps = np.stack([instance_targets(t, factor=1) for t in truth], 1)  # (3, Z, H, W)
    gap = truth[4] == 1
    maps[0, 4][gap], maps[1, 4][gap], maps[2, 4][gap] = 0.0, 1.0, 1.0  # a noisy slice
    out = volume_from_maps(maps, 0.3, 0.6, 0.6, z_sigma=1.0, xy_sigma=0.0, min_volume=20)
    assert out.max() == 2
    for k in (1, 2):
        assert _best_iou(out, truth == k) > 0.7
    assert (out[4][gap] > 0).mean() > 0.9
    # without smoothing across slices the gap cuts the first ball in two
    assert volume_from_maps(maps, 0.3, 0.6, 0.6, z_sigma=0.0, xy_sigma=0.0, min_volume=20).max() == 3


def test_volume_from_maps_grows_objects_over_less_smoothed_maps_so_they_end_where_they_end():
    zz, yy, xx = np.mgrid[:21, :48, :48]
    truth = ((((zz - 10) / 8) ** 2 + ((yy - 24) / 10) ** 2 + ((xx - 24) / 10) ** 2) <= 1).astype(np.int32)
    maps = np.stack([instance_targets(t, factor=1) for t in truth], 1)
    kw = dict(foreground_thresh=0.3, center_thresh=0.6, boundary_thresh=0.6, z_sigma=2.0, xy_sigma=1.0, min_volume=20)
    smooth = volume_from_maps(maps, **kw)  # smoothing across slices spreads the ends' sections
    assert smooth.max() == 1 and ((smooth > 0) & (truth == 0)).sum() > 300
    out = volume_from_maps(maps, **kw, extent_z_sigma=0.5, extent_xy_sigma=0.0)
    assert out.max() == 1 and ((out > 0) & (truth == 0)).sum() < 30 and ((out == 0) & (truth > 0)).sum() < 30


def test_nuclei_stacked_in_z_under_one_label_are_split_and_thin_tails_dropped():
    yy, xx = np.mgrid[:40, :40]
    radii = [2, 5, 8, 9, 8, 5, 4, 6, 9, 10, 9, 6, 2]  # two nuclei, one above the other
    labels = np.stack([((yy - 20) ** 2 + (xx - 20) ** 2 <= r * r) * 7 for r in radii]).astype(np.int32)
    labels[6:, 2:6, 2:6] = 3  # another object, a column through the lower slices
    out = split_stacked_objects(labels, min_volume=20)
    below, above = out[3, 20, 20], out[9, 20, 20]
    assert below > 0 and above > 0 and below != above
    assert (out[1:6, 20, 20] == below).all() and (out[7:12, 20, 20] == above).all()
    assert out[0].max() == 0 and (out[12] != above).all()  # the thin end sections (radius 2) go
    assert (out[6:, 2:6, 2:6] > 0).all() and len(np.unique(out[6:, 2:6, 2:6])) == 1  # untouched
    assert sorted(np.unique(out[out > 0])) == [1, 2, 3]


def test_segment_volume_auto_uses_the_volume_thresholds_and_rejects_unknown_keywords():
    truth = _balls()
    fake = FakeSam(truth[4], head=True)
    stack = ((truth > 0) * 200 + 10).astype(np.uint8)
    fake.meta = {"auto_volume": {"foreground_thresh": 0.35}}
    t = recommended_thresholds(fake, volume=True)
    assert t["foreground_thresh"] == 0.35 and t["z_sigma"] == VOLUME_THRESHOLDS["z_sigma"]
    out = segment_volume(SamPredictor(fake), stack, head_only=True)  # decoder settings are accepted
    assert len(np.unique(out)) == 3  # every slice shows the same two discs: two 3D objects
    with pytest.raises(TypeError, match="per_slice"):
        segment_volume(SamPredictor(fake), stack, forground_thresh=0.5)  # a typo is not ignored
    with pytest.raises(ValueError, match="z_sigma"):
        segment_volume(SamPredictor(fake), stack, z_sigma=-1)
    with pytest.raises(ValueError, match="denoise_sigma"):
        segment_volume(SamPredictor(fake), stack, denoise_sigma=-1)


def test_denoising_smooths_each_slice_in_its_plane_only():
    rng = np.random.default_rng(0)
    stack = rng.normal(100, 20, (4, 64, 64)).astype(np.float32)
    stack[2] += 500  # one bright slice: smoothing must not carry it to its neighbours
    raw = stack[0].astype(np.uint16)
    assert denoise_slice(raw, 0.0) is raw  # off: the slice as it is
    smooth = np.stack([denoise_slice(s, 1.0) for s in stack])
    assert smooth[0].std() < stack[0].std() / 2 and abs(smooth[0].mean() - 100) < 1
    assert smooth[1].max() < 200 and smooth[2].min() > 500
    rgb = np.zeros((32, 32, 3), np.float32)
    rgb[..., 0] = 255
    assert np.allclose(denoise_slice(rgb, 1.0)[..., 1:], 0)  # channels stay apart
    lo, hi = volume_contrast_limits(stack[:2], denoise_sigma=1.0)
    raw_lo, raw_hi = volume_contrast_limits(stack[:2])
    assert raw_lo < lo < 100 < hi < raw_hi  # the noise no longer sets the range


def test_segment_volume_finds_nuclei_in_a_noisy_stack():
    """Nuclei in a stack with Poisson and read noise at SNR 2 (one cut by the border), of
    the kind where the head needs its slices smoothed in their plane: every nucleus is
    found once (without the smoothing the bundled model matches one of the three here)."""
    from napari_tinysam import load_model

    model = load_model("default")
    assert recommended_thresholds(model, volume=True)["denoise_sigma"] > 0
    zz, yy, xx = np.mgrid[:14, :96, :96]
    truth = np.zeros(zz.shape, np.int32)
    for i, (cz, cy, cx, r) in enumerate(((6, 30, 30, 13), (7, 62, 70, 11), (6, 88, 22, 12)), 1):
        truth[((zz - cz) / 5) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 <= 1] = i
    rng = np.random.default_rng(2)
    clean = ndimage.gaussian_filter(100.0 * (truth > 0), (0.7, 1, 1))
    photons = 2.0**2 / 100  # a nucleus's signal at SNR 2
    stack = rng.poisson(clean * photons) / photons + 150 + rng.normal(0, 15, clean.shape)
    out = segment_volume(model, stack.clip(0, None).astype(np.uint16))
    assert out.max() == 3
    for k in (1, 2, 3):
        assert _best_iou(out, truth == k) > 0.5


def test_a_finely_sampled_stack_with_its_voxel_size_is_smoothed_over_the_same_depth():
    """42 slices 0.73 pixels apart: one nucleus has three slices where it does not show.
    The model's smoothing across slices, tuned for slices 2.2 pixels apart, bridges them
    only once converted to this stack's slices (``scale``)."""
    from napari_tinysam import load_model
    from napari_tinysam.predictor import EmbeddingCache

    predictor = SamPredictor(load_model("default"), cache=EmbeddingCache(2**30))
    stack, truth = gapped_nuclei_stack()

    def pieces(out):
        ids, counts = np.unique(out[truth == 1], return_counts=True)
        return [i for i, c in zip(ids, counts) if i > 0 and c > 500]

    assert len(pieces(segment_volume(predictor, stack))) == 2  # lengths left in slices: cut in two
    out = segment_volume(predictor, stack, scale=(0.73, 1.0, 1.0))
    assert out.max() == 3 and len(pieces(out)) == 1
    # the tuned spacing gives the tuned settings; lengths given explicitly are this stack's slices
    assert np.array_equal(segment_volume(predictor, stack, scale=(2.2, 1.0, 1.0)), segment_volume(predictor, stack))
    same = segment_volume(predictor, stack, scale=(0.73, 1.0, 1.0), z_sigma=2.0, extent_z_sigma=1.0)
    assert len(pieces(same)) == 2


def test_a_voxel_size_must_be_three_positive_numbers():
    from napari_tinysam.everything import anisotropy

    assert anisotropy((0.5, 0.1, 0.1)) == pytest.approx(5.0)
    assert anisotropy((1, 2.0, 0.5, 0.5)) == pytest.approx(4.0)  # a napari layer's scale (t, z, y, x)
    for bad in ((1, 1), (0, 1, 1), (1, -1, 1), (1, np.nan, 1), "1 1 1", None):
        with pytest.raises(ValueError, match="voxel size"):
            anisotropy(bad)
    fake = FakeSam(_balls()[4], head=True)
    with pytest.raises(ValueError, match="voxel size"):
        segment_volume(SamPredictor(fake), np.zeros((3, 64, 64), np.uint8), scale=(1, 1))


def test_window_holds_the_object_region_or_is_refused():
    from types import SimpleNamespace

    emb = SimpleNamespace(original_size=(256, 256), input_size=(768, 768))  # 3x upscaled, 48x48 tokens
    side, oy, ox = _window_origin((100, 120, 130, 160), emb, 48, 16, (16, 24, 32))
    assert side == 16
    assert oy * 16 <= 100 * 3 - 16 and (oy + side) * 16 >= 130 * 3 + 16
    assert ox * 16 <= 120 * 3 - 16 and (ox + side) * 16 >= 160 * 3 + 16
    assert _window_origin((0, 0, 250, 250), emb, 48, 16, (16, 24, 32)) is None  # larger than any window
    assert _window_origin((0, 0, 10, 10), emb, 48, 16, (16, 24, 32))[1:] == (0, 0)  # kept inside the grid


def test_windowed_decoding_on_the_whole_grid_equals_full_decoding():
    model = _small_model(head=False)
    torch.manual_seed(1)
    emb = torch.randn(1, 256, 16, 16)
    pts = (torch.tensor([[[100.0, 60.0]], [[30.0, 200.0]]]), torch.ones(2, 1))
    boxes = torch.tensor([[80.0, 40.0, 130.0, 90.0], [10.0, 180.0, 60.0, 230.0]])
    with torch.no_grad():
        full = model.decode(emb, pts, boxes)
        whole = model.decode_windows(emb, pts, boxes, torch.zeros(2, 2, dtype=torch.long), 16)
        part = model.decode_windows(emb, pts, boxes, torch.tensor([[2, 4], [8, 0]]), 8)
    torch.testing.assert_close(whole, full, rtol=1e-4, atol=1e-4)
    assert part[0].shape == (2, 4, 32, 32) and part[1].shape == (2, 4)
    # each prompt sees its own window of image tokens and of their positional encodings
    pe = model.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        for i, (y, x) in enumerate([(2, 4), (8, 0)]):
            sparse, dense = model.prompt_encoder(
                points=(pts[0][i : i + 1], pts[1][i : i + 1]), boxes=boxes[i : i + 1], masks=None, dense_size=(8, 8)
            )
            own = model.mask_decoder(emb[..., y : y + 8, x : x + 8], pe[..., y : y + 8, x : x + 8], sparse, dense)
            torch.testing.assert_close(part[0][i : i + 1], own[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(part[1][i : i + 1], own[1], rtol=1e-4, atol=1e-4)


def _small_model(head: bool):
    from napari_tinysam.model import architecture_config

    cfg = architecture_config("vit_t", 256)
    cfg["image_encoder"].update(embed_dims=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4])
    if head:
        cfg["instance_head"] = {"channels": [32, 16, 8]}
    torch.manual_seed(0)
    return build_sam(cfg).eval()


def test_checkpoint_with_head_round_trips(tmp_path):
    model = _small_model(head=True)
    assert model.has_instance_head
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, meta={"auto": {"foreground_thresh": 0.4}})
    loaded = sam_from_checkpoint(path)
    assert loaded.has_instance_head and loaded.meta["auto"]["foreground_thresh"] == 0.4
    emb = torch.randn(1, 256, 16, 16)
    torch.testing.assert_close(loaded.instance_maps(emb), model.instance_maps(emb))
    assert loaded.instance_maps(emb).shape == (1, 3, 64, 64)
    # official layout: a raw state dict without head keys loads, without a head
    raw = {k: v for k, v in model.state_dict().items() if not k.startswith("instance_head")}
    ckpt = read_checkpoint(_save_raw(raw, tmp_path / "raw.pth"))
    assert "instance_head" not in ckpt["config"]
    plain = sam_from_checkpoint(tmp_path / "raw.pth")
    assert not plain.has_instance_head and default_mode(plain) == "hierarchical"
    with pytest.raises(ValueError, match="no instance head"):
        plain.instance_maps(emb)


def _save_raw(sd, path):
    torch.save(sd, path)
    return path


def test_augmentations_keep_labels_aligned():
    rng = np.random.default_rng(0)
    labels = _discs(spec=((30, 30, 10), (60, 90, 14), (100, 40, 12)))
    image = (100 + 1000 * (labels > 0)).astype(np.uint16)
    aug = Augment(
        fit=128,
        max_upscale=4,
        scale_jitter=0.5,
        dim=1.0,
        illumination=0.5,
        blur=1.5,
        shot_noise=1.0,
        snr_min=6.0,
        gamma_jitter=0.2,
        noise=0.0,
    )
    for _ in range(10):
        rgb, lab = augment_crop(Sample("s", image, labels), 128, aug, rng, pad=False)
        assert rgb.shape[:2] == lab.shape and rgb.dtype == np.uint8
        inside, outside = rgb[..., 0][lab > 0], rgb[..., 0][lab == 0]
        if inside.size and outside.size:
            assert inside.mean() > outside.mean() + 20  # objects stay where their labels are


def test_stack_slices_and_mixture_weights():
    img = np.zeros((10, 20, 30), np.uint8)
    lab = np.zeros((10, 20, 30), np.int32)
    lab[3:7, 5:15, 10:20] = 1
    smp = stack_slices("s", img, lab, z_step=2.0)
    assert len(smp) == 10 + 20 + 30
    assert smp[10].image.shape == (20, 30)  # a ZX plane, z stretched by 2
    assert smp[10 + 20].image.shape == (20, 20)  # a ZY plane
    a = [Sample(f"a{i}", img[0], lab[5]) for i in range(3)]
    b = [Sample(f"b{i}", img[0], lab[5]) for i in range(6)] + [Sample("empty", img[0], lab[0])]
    samples, p = mixture([(a, 1.0), (b, 2.0)])
    assert len(samples) == 9  # the empty one is left out
    assert p[:3].sum() == pytest.approx(1 / 3) and p[3:].sum() == pytest.approx(2 / 3)
    assert parse_source("x/y:2") == ("x/y", 2.0) and parse_source("C:/data") == ("C:/data", 1.0)


def test_head_training_lowers_loss_and_resumes(tmp_path, data_dir, monkeypatch):
    from napari_tinysam.distill import instance

    cfg = instance.HeadConfig(
        sources=[str(data_dir / "bbbc039" / "train")],
        out_dir=str(tmp_path / "run"),
        views=6,
        steps=40,
        batch=4,
        lr=3e-3,
        warmup=5,
        val_every=40,
        head={"channels": [32, 16, 8]},
    )
    losses = []
    real = instance.head_loss

    def spy(*a):
        loss = real(*a)
        losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(instance, "head_loss", spy)
    path = instance.train_head(cfg)
    assert np.mean(losses[-8:]) < 0.85 * np.mean(losses[:8])
    model = sam_from_checkpoint(path)
    assert model.has_instance_head and model.config["instance_head"]["channels"] == [32, 16, 8]
    # resume: more steps continue from the saved state, the stored views are reused
    cfg.steps = 50
    n = len(losses)
    instance.train_head(cfg)
    assert len(losses) - n == 10
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 50 and json.loads(state["history"])[-1]["step"] == 50
    # the stored views depend on the encoder only: a model with the trained head (the same
    # encoder) reuses them, as a second training stage does
    from napari_tinysam.weights import load_model

    store = instance.build_store(cfg, load_model(str(path)))
    assert store.done.all() and store.encoder_calls == 0
    # a new run can start from a trained head (here with a zero learning rate: it stays as it was)
    start = sam_from_checkpoint(path).instance_head.state_dict()
    warm = instance.HeadConfig(
        **{**vars(cfg), "out_dir": str(tmp_path / "warm"), "steps": 2, "lr": 0.0, "init": str(path), "val": []}
    )
    again = sam_from_checkpoint(instance.train_head(warm)).instance_head.state_dict()
    assert all(torch.equal(start[k], again[k]) for k in start)
    with pytest.raises(ValueError, match="differs"):
        instance.train_head(instance.HeadConfig(**{**vars(warm), "head": {"channels": [16, 8, 8]}}))


def test_linking_survives_one_missed_slice():
    from napari_tinysam.everything import link_volume

    disc = _discs(spec=((40, 40, 12),))
    other = _discs(spec=((90, 90, 10),))
    stack = np.stack([disc, disc, np.zeros_like(disc), disc, disc + 0])  # missed in slice 2
    stack[1][other > 0] = 2
    linked = link_volume(stack.copy())
    assert len(np.unique(linked[linked > 0])) == 2
    assert linked[0][40, 40] == linked[4][40, 40] == linked[3][40, 40]
    # two missed slices: a new object
    stack2 = np.stack([disc, np.zeros_like(disc), np.zeros_like(disc), disc])
    linked2 = link_volume(stack2.copy())
    assert linked2[0][40, 40] != linked2[3][40, 40]


@pytest.mark.parametrize("shape", [(96, 128), (12, 40, 48)])
def test_seed_minima_found_part_by_part_equal_those_of_the_whole_map(shape):
    """The centre-distance minima that seed objects are found on each part of the seed
    region apart (a box around it): exactly the minima of the whole map, on random maps
    in 2D and 3D whose seed regions have many parts, some on the image's border."""
    from skimage.morphology import h_minima

    from napari_tinysam.instances import _deep_minima

    rng = np.random.default_rng(0)
    for trial in range(6):
        smooth = ndimage.gaussian_filter(rng.random(shape), 2.0 + trial % 3)
        smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
        region = smooth < np.quantile(smooth, 0.3 + 0.05 * trial)
        for hi in (0.6, 0.95):  # 0.95: region values within the depth of the walls (1.0)
            centre = np.where(region, smooth * hi, 1.0).astype(np.float32)
            for depth in (0.02, 0.1):
                expected = h_minima(centre, depth).astype(bool) & region
                assert np.array_equal(_deep_minima(centre, region, depth), expected)
