"""The napari plugin, driven in a real viewer (needs an X server: run under xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
from napari.layers import Labels  # noqa: E402

from napari_tinysam import samples  # noqa: E402
from napari_tinysam._napari.annotator import (  # noqa: E402
    KEYS,
    NEW_LAYER,
    PREVIEW_NAME,
    AnnotatorWidget,
    _committed,
)
from napari_tinysam._napari.everything_widget import CURRENT, STACK, EverythingWidget  # noqa: E402
from napari_tinysam.annotate import Prompts, Zoom, segment_prompts, slice_rgb  # noqa: E402
from napari_tinysam.evaluation import innermost_point  # noqa: E402
from napari_tinysam.everything import recommended_thresholds  # noqa: E402

pytestmark = pytest.mark.gui


def _wait(qtbot, widget, timeout=60000):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def _iou(a, b):
    return np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum())


@pytest.fixture
def nuclei():
    return samples.nuclei_2d(), samples.nuclei_2d_labels()


def _largest_objects(labels, n):
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    return [int(i) for i in ids[np.argsort(-counts)[:n]]]


def test_manifest_registers_widgets_and_samples():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-tinysam")
    names = {w.display_name for w in manifest.contributions.widgets}
    assert names == {"TinySAM Annotator", "TinySAM Everything"}
    assert {s.key for s in manifest.contributions.sample_data} == {"nuclei_2d", "nuclei_3d"}


@pytest.fixture
def annotator(make_napari_viewer, qtbot, nuclei):
    """A viewer with the 2D sample and a ready annotator widget."""
    viewer = make_napari_viewer()
    viewer.add_image(nuclei[0], name="nuclei")
    w = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(w)  # as napari docks it: the viewer's close deletes it
    _wait(qtbot, w)
    yield viewer, w
    _wait(qtbot, w)  # no worker may outlive the viewer


def test_annotator_2d_commit_second_object_and_undo(annotator, qtbot, nuclei):
    viewer, w = annotator
    truth = nuclei[1]
    a, b = _largest_objects(truth, 2)
    xa, ya = innermost_point(truth == a)
    w.points_layer.add([ya, xa])
    _wait(qtbot, w)
    preview = w.preview_layer.data > 0
    assert _iou(preview, truth == a) > 0.5
    w.commit()
    target = viewer.layers["TinySAM labels"]
    assert isinstance(target, Labels) and target.data.max() == 1
    assert _iou(target.data == 1, truth == a) > 0.5
    assert len(w.points_layer.data) == 0 and not w.preview_layer.data.any()
    assert w.status.value == f"committed label 1 to 'TinySAM labels'; {KEYS['undo']} undoes it"
    first = target.data.copy()
    w.points_layer.add([ya, xa])  # the same object again: every pixel taken, nothing written
    _wait(qtbot, w)
    w.commit()
    assert np.array_equal(target.data, first) and len(w.undo_stack) == 1
    assert w.status.value.startswith("nothing written") and not w.preview_layer.data.any()
    xb, yb = innermost_point(truth == b)
    w.points_layer.add([yb, xb])
    _wait(qtbot, w)
    w.commit()
    assert target.data.max() == 2
    assert (target.data[first == 1] == 1).all()  # object 1 untouched
    target.data[int(yb), int(xb)] = 9  # painted over object 2 with napari's brush
    w.undo()
    first[int(yb), int(xb)] = 9  # the painted pixel stays
    np.testing.assert_array_equal(target.data, first)
    assert w.status.value == "undone: label 2 in 'TinySAM labels'"
    w.undo()
    assert set(np.unique(target.data)) == {0, 9}


def test_a_commit_is_one_step_of_napari_undo_in_the_labels_layer(annotator, qtbot, nuclei):
    """Ctrl-Z in the Labels layer (napari's own undo) reverts a commit exactly, as it
    reverts a brush stroke, and Ctrl-Shift-Z brings it back; the annotator's undo then
    finds nothing left to restore, and its own undo is a step of that history too."""
    viewer, w = annotator
    truth = nuclei[1]
    a, b = _largest_objects(truth, 2)
    for obj in (a, b):
        x, y = innermost_point(truth == obj)
        w.points_layer.add([y, x])
        _wait(qtbot, w)
        w.commit()
    target = viewer.layers["TinySAM labels"]
    both = target.data.copy()
    assert set(np.unique(both)) == {0, 1, 2}
    target.undo()  # the second commit, whole
    np.testing.assert_array_equal(target.data, np.where(both == 2, 0, both))
    target.redo()
    np.testing.assert_array_equal(target.data, both)
    target.undo()
    w.undo()  # napari's undo took it already
    np.testing.assert_array_equal(target.data, np.where(both == 2, 0, both))
    assert w.status.value == "label 2 was undone already (napari's undo); nothing changed"
    w.undo()  # the first commit, by the annotator: napari's undo puts it back
    assert not target.data.any()
    target.undo()
    np.testing.assert_array_equal(target.data, np.where(both == 2, 0, both))


def test_annotator_opens_beside_existing_labels_and_leaves_them_alone(make_napari_viewer, qtbot, nuclei):
    """Opened in a viewer that already holds Labels layers (a StarDist result, a second
    annotator's preview), the annotator commits into a new layer unless one is picked."""
    image, truth = nuclei
    viewer = make_napari_viewer()
    viewer.add_image(image, name="nuclei")
    theirs = viewer.add_labels(np.zeros(image.shape, np.int32), name="stardist")
    w = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(w)
    _wait(qtbot, w)
    assert w.labels_combo.value == NEW_LAYER and "stardist" in w.labels_combo.choices
    assert PREVIEW_NAME not in w.labels_combo.choices
    x, y = innermost_point(truth == _largest_objects(truth, 1)[0])
    w.points_layer.add([y, x])
    _wait(qtbot, w)
    w.commit()
    assert viewer.layers["TinySAM labels"].data.max() == 1 and not theirs.data.any()
    second = AnnotatorWidget(viewer)  # with a preview layer and labels in the viewer
    viewer.window.add_dock_widget(second)
    _wait(qtbot, second)
    assert second.labels_combo.value == NEW_LAYER
    _wait(qtbot, w)


def test_a_click_on_the_outer_half_of_an_edge_pixel_segments_the_nucleus_there(annotator, qtbot, nuclei):
    """napari puts pixel centres at integers, so a click on the left half of the first
    column gives x between -0.5 and 0: it is on the image and segments the nucleus cut by
    the border there."""
    viewer, w = annotator
    truth = nuclei[1]
    nucleus = truth == 60  # 925 px, cut by the left border on rows 248-270
    w.points_layer.add([259.0, -0.4])
    _wait(qtbot, w)
    assert _iou(w.preview_layer.data > 0, nucleus) > 0.5
    w.commit()
    assert _iou(viewer.layers["TinySAM labels"].data == 1, nucleus) > 0.5


def test_a_click_in_a_small_crop_segments_the_whole_nucleus(make_napari_viewer, qtbot, nuclei):
    """A 128x128 crop of the sample: the model would see its nuclei 4x enlarged, past
    what it knows; the annotator looks at the slice smaller (in the worker) and shows the
    whole nucleus."""
    crop = np.s_[100:228, 100:228]
    viewer = make_napari_viewer()
    viewer.add_image(nuclei[0][crop], name="crop")
    w = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(w)
    _wait(qtbot, w)
    nucleus = nuclei[1][crop] == 38
    w.points_layer.add(list(innermost_point(nucleus))[::-1])
    _wait(qtbot, w)
    qtbot.waitUntil(lambda: w.candidates is not None and w.candidates.factor < 1, timeout=60000)
    assert _iou(w.preview_layer.data > 0, nucleus) > 0.85
    w.commit()
    labels = viewer.layers["TinySAM labels"].data
    assert _iou(labels == 1, nucleus) > 0.85
    # one object per point: each of them looked at smaller too
    w.each_point.value = True
    others = [nuclei[1][crop] == i for i in (34, 40)]
    for other in others:
        w.points_layer.add(list(innermost_point(other))[::-1])
    _wait(qtbot, w)
    qtbot.waitUntil(lambda: len(w.objects) == 2 and all(o.factor < 1 for o in w.objects), timeout=60000)
    w.commit()
    assert _iou(labels == 2, others[0]) > 0.85 and _iou(labels == 3, others[1]) > 0.85


def test_annotator_each_point_is_an_object_committed_in_one_step(annotator, qtbot, nuclei):
    viewer, w = annotator
    truth = nuclei[1]
    ids = _largest_objects(truth, 3)
    w.each_point.value = True
    for i in ids:
        x, y = innermost_point(truth == i)
        w.points_layer.add([y, x])
        _wait(qtbot, w)
    assert len(w.objects) == 3
    assert sorted(np.unique(w.preview_layer.data).tolist()) == [0, 1, 2, 3]
    w.commit()
    target = viewer.layers["TinySAM labels"]
    assert target.data.max() == 3 and "3 objects" in w.status.value
    for new, i in zip((1, 2, 3), ids):
        assert _iou(target.data == new, truth == i) > 0.5
    w.undo()  # one step undoes all three
    assert target.data.max() == 0


def test_annotator_refines_an_existing_label_only(annotator, qtbot, nuclei):
    viewer, w = annotator
    truth = nuclei[1]
    a, b = _largest_objects(truth, 2)
    labels = np.where(np.isin(truth, [a, b]), truth, 0).astype(np.int32)
    rows = np.flatnonzero((truth == a).any(1))
    labels[rows[len(rows) // 2] :][labels[rows[len(rows) // 2] :] == a] = 0  # half of object a: a poor mask
    target = viewer.add_labels(labels.copy(), name="stardist")
    w.labels_combo.value = "stardist"
    w.refine_id.value = 999  # not in the layer: an error, nothing previewed
    _wait(qtbot, w)
    assert w.candidates is None and not w.preview_layer.data.any()
    w.refine_id.value = a
    _wait(qtbot, w)
    better = max(0.7, _iou(labels == a, truth == a) + 0.2)
    assert w.candidates is not None and _iou(w.preview_layer.data > 0, truth == a) > better
    w.commit()
    assert _iou(target.data == a, truth == a) > better
    assert np.array_equal(target.data == b, labels == b)  # the other object untouched
    assert set(np.unique(target.data)) == {0, a, b} and w.refine_id.value == 0
    w.undo()
    assert np.array_equal(target.data, labels)


def test_a_refined_3d_object_that_loses_slices_says_which():
    """Refining an object with Shift-T replaces all of it: where the new 3D object does not
    reach, the old one is removed, and the status line names those slices."""
    from napari_tinysam.annotate import UndoRecord

    def record(z):
        return UndoRecord((z,), (0, 0), np.full((1, 1), 7, np.int32), 7, np.zeros((1, 1), np.int32))

    line = _committed("cells", [record(z) for z in (0, 1, 5, 9, 10)], 7, [0, 1, 9, 10])
    assert line == (
        "label 7 of 'cells' replaced; removed from 4 slices (0-1, 9-10), which the propagated "
        f"object does not reach; {KEYS['undo']} undoes it"
    )
    assert "removed from slice 3, which" in _committed("cells", [record(3), record(4)], 7, [3])
    assert _committed("cells", [record(5)], 7, []) == f"label 7 of 'cells' replaced; {KEYS['undo']} undoes it"


def test_annotator_negative_point_shrinks_and_box(annotator, qtbot, nuclei):
    _, w = annotator
    truth = nuclei[1]
    a, b = _largest_objects(truth, 2)
    # a box around object a
    ys, xs = np.nonzero(truth == a)
    w.boxes_layer.add_rectangles(np.array([[ys.min(), xs.min()], [ys.max(), xs.max()]]))
    _wait(qtbot, w)
    assert _iou(w.preview_layer.data > 0, truth == a) > 0.5
    w.clear()
    assert not w.preview_layer.data.any()
    # two positive points on two objects, then a negative point on the second
    xa, ya = innermost_point(truth == a)
    xb, yb = innermost_point(truth == b)
    w.points_layer.add([ya, xa])
    _wait(qtbot, w)
    w.points_layer.add([yb, xb])
    _wait(qtbot, w)
    both = (w.preview_layer.data > 0).sum()
    w.negative.value = True
    w.points_layer.add([yb, xb])
    _wait(qtbot, w)
    assert list(w.points_layer.features["positive"]) == [True, True, False]
    assert w.points_layer.symbol[-1].value != w.points_layer.symbol[0].value
    assert (w.preview_layer.data > 0).sum() < both


def test_annotator_zooms_in_on_a_small_nucleus(annotator, qtbot, nuclei):
    viewer, w = annotator
    truth = nuclei[1]
    ids, areas = np.unique(truth[truth > 0], return_counts=True)
    small = truth == ids[areas >= 100][np.argmin(areas[areas >= 100])]  # a small nucleus, not a fragment
    xa, ya = innermost_point(truth == _largest_objects(truth, 1)[0])
    w.points_layer.add([ya, xa])  # a large nucleus first: the slice gets embedded, no window
    _wait(qtbot, w)
    assert w.candidates.window is None and w.candidates.pending_window is None
    w.clear()
    x, y = innermost_point(small)
    w.points_layer.add([y, x])
    assert w.candidates is not None and w.candidates.window is None  # the slice's mask at once
    assert w.candidates.pending_window is not None and w.busy  # the window is being embedded
    _wait(qtbot, w)
    assert w.candidates.window is not None  # then the magnified window's mask replaced it
    zoomed = w.preview_layer.data > 0
    assert np.array_equal(zoomed, w.candidates.mask)
    y0, x0, h, w_ = w.candidates.window
    assert zoomed[y0 : y0 + h, x0 : x0 + w_].sum() == zoomed.sum()
    # exactly what the engine gives for that click on the slice as displayed
    rgb = slice_rgb(nuclei[0], tuple(viewer.layers["nuclei"].contrast_limits))
    engine = segment_prompts(w.predictor, rgb, Prompts(np.array([[x, y]]), np.array([1])), zoom=Zoom())
    assert engine.window == w.candidates.window and np.array_equal(engine.mask, zoomed)
    w.zoom.value = False  # off: the slice's mask again, no window
    _wait(qtbot, w)
    assert w.candidates.window is None and w.candidates.pending_window is None


def test_annotator_3d_scaled_slices(make_napari_viewer, qtbot, data_dir):
    stack = samples.nuclei_3d()
    from napari_tinysam.io import read_image

    truth = read_image(data_dir / "nuclei3d_synthetic" / "mask3d.tif").astype(np.int32)
    viewer = make_napari_viewer()
    layer = viewer.add_image(stack, name="stack", scale=(2, 0.5, 0.5), translate=(1, 3, -2))
    w = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(w)  # as napari docks it: the viewer's close deletes it
    _wait(qtbot, w)
    for z in (3, 9):
        ids, counts = np.unique(truth[z][truth[z] > 0], return_counts=True)
        obj = truth[z] == ids[np.argmax(counts)]
        x, y = innermost_point(obj)
        world = layer.data_to_world((z, y, x))
        w.points_layer.add(np.array(w.points_layer.world_to_data(world)))
        _wait(qtbot, w)
        assert w.preview_slice == (z,)
        prev = w.preview_layer.data
        assert prev[z].any() and not np.delete(prev, z, axis=0).any()  # only slice z
        assert prev[z][int(y), int(x)] > 0  # the clicked position is inside the mask
        w.commit()
    target = viewer.layers["TinySAM labels"]
    assert set(np.unique(target.data)) == {0, 1, 2}
    assert set(np.nonzero(target.data.reshape(target.data.shape[0], -1).any(1))[0]) == {3, 9}
    _wait(qtbot, w)


def test_annotator_bad_input(make_napari_viewer, qtbot, nuclei):
    image, truth = nuclei
    viewer = make_napari_viewer()
    w = AnnotatorWidget(viewer)  # no image layer: nothing breaks
    viewer.window.add_dock_widget(w)  # as napari docks it: the viewer's close deletes it
    _wait(qtbot, w)
    assert w.image_combo.value is None
    viewer.add_image(image, name="nuclei")
    w.image_combo.value = viewer.layers["nuclei"]
    viewer.add_labels(np.zeros((10, 10), np.int32), name="wrong")
    w.labels_combo.value = "wrong"
    x, y = innermost_point(truth == _largest_objects(truth, 1)[0])
    w.points_layer.add([y, x])
    _wait(qtbot, w)
    w.commit()  # shape mismatch: an error notification, nothing written
    assert viewer.layers["wrong"].data.max() == 0
    full = np.zeros(image.shape, np.uint8)  # napari's "new labels" type, its last id taken
    full[0, 0] = 255
    viewer.add_labels(full.copy(), name="uint8")
    w.labels_combo.value = "uint8"
    w.commit()  # no id left: an error notification, nothing written
    assert np.array_equal(viewer.layers["uint8"].data, full) and not w.undo_stack
    import zarr

    lazy = zarr.zeros(image.shape, dtype="int32")  # a Labels layer opened from a Zarr store
    viewer.add_labels(lazy, name="zarr")
    w.labels_combo.value = "zarr"
    w.commit()  # refused with what to do, nothing written
    assert not lazy[:].any() and not w.undo_stack
    w.labels_combo.value = NEW_LAYER
    w.load_model("/no/such/model.pt")  # fails in a notification; the old model stays
    _wait(qtbot, w)
    assert w.predictor is not None
    w.commit()
    assert viewer.layers["TinySAM labels"].data.max() == 1
    _wait(qtbot, w)


def test_annotator_segments_a_multiscale_image_at_full_resolution(make_napari_viewer, qtbot, nuclei):
    """Pyramids (OME-Zarr, whole-slide readers) are segmented on their full-resolution
    level, in its coordinates; a plane too large to read at once is refused with what to do."""
    import dask.array as da
    from napari.layers import Image

    from napari_tinysam._napari.layers import image_data

    image, truth = nuclei
    viewer = make_napari_viewer()
    viewer.add_image([image, image[::2, ::2]], multiscale=True, name="pyramid")
    w = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(w)
    _wait(qtbot, w)
    a = _largest_objects(truth, 1)[0]
    x, y = innermost_point(truth == a)
    w.points_layer.add([y, x])
    _wait(qtbot, w)
    assert w.preview_layer.data.shape == image.shape and _iou(w.preview_layer.data > 0, truth == a) > 0.5
    w.commit()
    assert _iou(viewer.layers["TinySAM labels"].data == 1, truth == a) > 0.5
    huge = Image(
        [da.zeros((12000, 12000), np.uint8), np.zeros((1500, 1500), np.uint8)],
        multiscale=True,
        contrast_limits=(0, 1),
        name="slide",
    )
    with pytest.raises(ValueError, match="12000 x 12000 pixels, too large.*crop"):
        image_data(huge)
    _wait(qtbot, w)


def test_keybindings_do_not_shadow_napari_defaults():
    from napari.utils.shortcuts import default_shortcuts

    taken = {str(k).replace("+", "-").lower() for v in default_shortcuts.values() for k in v}
    for key in KEYS.values():
        assert key.lower() not in taken


def test_everything_widget_stack_and_cancel(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image = samples.nuclei_2d()
    # a small stack of shifted crops of the nuclei field: objects continue across slices
    stack = np.stack([image[2 * z : 2 * z + 200, 3 * z : 3 * z + 240] for z in range(6)])
    viewer.add_image(stack, name="stack")
    w = EverythingWidget(viewer)
    viewer.window.add_dock_widget(w)  # as napari docks it: the viewer's close deletes it
    qtbot.waitUntil(lambda: w._model_worker is None, timeout=60000)
    # the bundled model has an instance head: auto by default, with its tuned thresholds
    assert w.mode.value == "auto" and "auto" in w.mode.choices
    # a whole stack starts from the thresholds for 3D instances, one slice from the 2D ones
    volume = recommended_thresholds(w._model, "auto", volume=True)
    assert w.scope.value == STACK and w.foreground.value == pytest.approx(volume["foreground_thresh"])
    w.scope.value = CURRENT
    assert w.foreground.value == pytest.approx(w._model.meta["auto"]["foreground_thresh"])
    w.scope.value = STACK
    assert w.params()["mode"] == "auto" and w.points_per_side.native.isHidden()
    w.mode.value = "hierarchical"
    assert not w.points_per_side.native.isHidden() and "foreground_thresh" not in w.params()
    w.mode.value = "auto"
    w.points_per_side.value = 16
    n_layers = len(viewer.layers)
    w.run()
    w.cancel()
    qtbot.waitUntil(lambda: w.worker is None, timeout=120000)
    assert len(viewer.layers) == n_layers and w.status.value == "cancelled"
    w.run()
    qtbot.waitUntil(lambda: w.worker is None, timeout=300000)
    out = viewer.layers["TinySAM everything"]
    assert out.data.shape == (6, 200, 240) and out.data.max() > 0
    # stitched: at least one id spans several slices
    spans = [len({z for z in range(6) if (out.data[z] == i).any()}) for i in np.unique(out.data)[1:]]
    assert max(spans) > 1


def test_everything_widget_cancels_a_2d_image(make_napari_viewer, qtbot):
    """Cancel on one 2D field (tiled when large) adds no layer, however far the run got."""
    viewer = make_napari_viewer()
    viewer.add_image(samples.nuclei_2d(), name="field")
    w = EverythingWidget(viewer)
    viewer.window.add_dock_widget(w)
    qtbot.waitUntil(lambda: w._model_worker is None, timeout=60000)
    n_layers = len(viewer.layers)
    w.run()
    w.cancel()
    qtbot.waitUntil(lambda: w.worker is None, timeout=120000)
    assert len(viewer.layers) == n_layers and w.status.value == "cancelled"


def test_the_everything_widget_takes_the_voxel_size_from_the_layer_scale():
    from napari.layers import Image

    from napari_tinysam._napari.layers import voxel_size

    stack = np.zeros((4, 16, 16), np.uint8)
    assert voxel_size(Image(stack, scale=(0.5, 0.1, 0.1))) == pytest.approx((0.5, 0.1, 0.1))
    assert voxel_size(Image(np.zeros((2, 4, 16, 16)), scale=(9, 2, 1, 1))) == pytest.approx((2, 1, 1))
    assert voxel_size(Image(stack)) is None  # napari's default scale: the voxel size is unknown
    assert voxel_size(Image(stack[0], scale=(0.1, 0.1))) is None
    assert voxel_size(Image(np.zeros((16, 16, 3), np.uint8), rgb=True, scale=(0.1, 0.1))) is None  # 2D RGB


def test_shift_t_follows_the_voxel_size_set_on_the_image_layer(make_napari_viewer, qtbot):
    """Slices 0.73 pixels apart (the layer's scale), a nucleus missing from three of them:
    one click and Shift-T give the whole nucleus, across the slices where it does not show."""
    from tests.stacks import gapped_nuclei_stack

    stack, truth = gapped_nuclei_stack()
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="stack", scale=(0.73, 1.0, 1.0))
    w = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(w)
    _wait(qtbot, w)
    w.points_layer.add([12, 30, 30])
    _wait(qtbot, w)
    w.propagate()
    _wait(qtbot, w)
    zs = sorted(w.preview_volumes[0])
    assert zs[0] <= 4 and zs[-1] >= 32 and set(range(17, 20)) <= set(zs)
    preview = w.preview_layer.data > 0
    assert _iou(preview, truth == 1) > 0.7


def test_shift_t_follows_the_displayed_stack_of_a_4d_image(make_napari_viewer, qtbot):
    """In a (T, Z, Y, X) image the object is propagated through the stack at the clicked
    time point and committed there; the other time point is untouched."""
    from tests.test_propagate import disc_stack

    stack, truth = disc_stack()
    movie = np.stack([stack[:, :, ::-1], stack])  # t = 0: the disc elsewhere
    viewer = make_napari_viewer()
    viewer.add_image(movie, name="movie")
    w = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(w)
    _wait(qtbot, w)
    assert w.propagate_btn.enabled
    viewer.dims.set_point(0, 1)
    viewer.dims.set_point(1, 5)
    w.points_layer.add([1, 5, 48, 50])
    _wait(qtbot, w)
    assert w.preview_slice == (1, 5)
    w.propagate()
    _wait(qtbot, w)
    assert sorted(w.preview_volumes[0]) == list(range(2, 9)) and "slices 2-8" in w.status.value
    assert not w.preview_layer.data[0].any() and _iou(w.preview_layer.data[1] > 0, truth) > 0.75
    w.commit()
    labels = viewer.layers["TinySAM labels"].data
    assert labels.shape == movie.shape and not labels[0].any() and _iou(labels[1] == 1, truth) > 0.75
    assert not w.preview_layer.data.any()
    _wait(qtbot, w)


def test_annotator_reuses_matching_embedding_store(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    import napari_tinysam._napari.annotator as annotator_module
    from napari_tinysam.embedding_store import EmbeddingStore

    stack = samples.nuclei_3d()[:4]
    viewer = make_napari_viewer()
    layer = viewer.add_image(stack, name="stack")
    w = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(w)  # as napari docks it: the viewer's close deletes it
    _wait(qtbot, w)
    model = w.predictor.model
    store = EmbeddingStore.open(tmp_path / "e.zarr", model, stack, tuple(layer.contrast_limits), create=True)
    store.compute(model, stack)
    assert w.open_store(str(tmp_path / "e.zarr"))
    embedded = []
    compute = annotator_module.compute_embedding
    monkeypatch.setattr(
        annotator_module, "compute_embedding", lambda model, rgb: embedded.append(rgb.shape[:2]) or compute(model, rgb)
    )
    w.points_layer.add([2, 30, 30])
    # served from the store at once, and the prefetched neighbours too: no slice is
    # embedded (only, for an unconfident object, the slice seen smaller)
    assert w.preview_slice == (2,)
    _wait(qtbot, w)
    qtbot.waitUntil(lambda: w._running is None and not w._jobs, timeout=60000)
    assert all(shape[0] < stack.shape[1] for shape in embedded) and len(w.cache) == 3 + len(embedded)
    # its slices are noisy and stored smoothed, as the widget shows them to the model by
    # default; with smoothing off the model sees the slice as acquired: embedded anew
    assert w.store.smooth and w.smooth.value
    embedded.clear()
    w.smooth.value = False
    _wait(qtbot, w)
    qtbot.waitUntil(lambda: w._running is None and not w._jobs, timeout=60000)
    assert tuple(stack.shape[1:]) in embedded and w.candidates is not None
    # a store for other contrast limits is refused, the widget keeps working
    layer.contrast_limits = (0, 10)
    assert not w.open_store(str(tmp_path / "e.zarr")) and w.store is None
    _wait(qtbot, w)


def test_contrast_change_invalidates_embeddings(annotator, qtbot, nuclei):
    viewer, w = annotator
    truth = nuclei[1]
    x, y = innermost_point(truth == _largest_objects(truth, 1)[0])
    w.points_layer.add([y, x])
    _wait(qtbot, w)
    assert len(w.cache) == 1
    layer = viewer.layers["nuclei"]
    lo, hi = layer.contrast_limits
    for k in range(5):  # a drag: several changes, one invalidation after the last
        layer.contrast_limits = (lo, hi * (0.9 - 0.05 * k))
    assert len(w.cache) == 1  # debounced: nothing happens during the drag
    qtbot.waitUntil(lambda: w.busy or len(w.cache) == 0, timeout=2000)
    _wait(qtbot, w)
    assert len(w.cache) == 1 and w.preview_layer.data.any()  # re-embedded with the new view


def test_annotator_propagates_commits_and_undoes_a_3d_object(make_napari_viewer, qtbot):
    from tests.test_propagate import disc_stack

    stack, truth = disc_stack()
    viewer = make_napari_viewer(show=True)  # shown: its screenshots are what is painted
    viewer.add_image(stack, name="stack")
    w = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(w)  # as napari docks it: the viewer's close deletes it
    _wait(qtbot, w)
    assert w.propagate_btn.enabled
    target = viewer.add_labels(np.zeros(stack.shape, np.int32), name="cells")
    target.data[4, 40:44, 40:44] = 3  # an object already there: kept
    before = target.data.copy()
    w.labels_combo.value = "cells"
    w.points_layer.add([5, 48, 50])
    _wait(qtbot, w)
    assert w.preview_slice == (5,)
    # Shift-T twice: the second cancels; nothing is written
    w.propagate()
    w.propagate()
    _wait(qtbot, w)
    assert np.array_equal(target.data, before) and "cancelled" in w.status.value
    viewer.dims.set_point(0, 5)  # the clicked slice in view, as a user has it
    w.propagate()
    _wait(qtbot, w)
    assert sorted(w.preview_volumes[0]) == list(range(2, 9))  # the instance head's object
    assert (w.preview_layer.data > 0).reshape(len(stack), -1).any(1).tolist() == [
        2 <= z <= 8 for z in range(len(stack))
    ]
    assert "slices 2-8" in w.status.value and "least confident" in w.status.value
    # what is painted is the preview as it is: a refresh now changes nothing on screen
    shown = viewer.screenshot(canvas_only=True, flash=False)
    w.preview_layer.refresh()
    assert np.array_equal(viewer.screenshot(canvas_only=True, flash=False), shown)
    w.commit()
    written = target.data != before
    assert set(np.unique(target.data[written])) == {4}  # one new id
    assert _iou(written, truth) > 0.75 and (target.data[4, 40:44, 40:44] == 3).all()
    assert not w.preview_volumes and w.preview_layer.data.max() == 0
    committed = target.data.copy()
    target.undo()  # napari's undo in the layer (Ctrl-Z): the 3D object in one step
    assert np.array_equal(target.data, before)
    target.redo()
    assert np.array_equal(target.data, committed)
    w.undo()
    assert np.array_equal(target.data, before)
    _wait(qtbot, w)
    # with a negative point the decoder walks slice by slice from the click
    w.points_layer.add([5, 48, 50])
    w.negative.value = True
    w.points_layer.add([5, 10, 10])
    w.negative.value = False
    _wait(qtbot, w)
    w.propagate()
    _wait(qtbot, w)
    assert sorted(w.preview_volumes[0]) == list(range(2, 9)) and "slices 2-8" in w.status.value
    w.commit()
    written = target.data != before
    assert set(np.unique(target.data[written])) == {4}
    assert _iou(written, truth) > 0.8 and (target.data[4, 40:44, 40:44] == 3).all()
    w.undo()
    assert np.array_equal(target.data, before)
    _wait(qtbot, w)
    # one object per point: two discs, each propagated, committed as two ids in one step
    w.each_point.value = True
    w.points_layer.add([5, 48, 50])
    w.points_layer.add([5, 30, 105])
    _wait(qtbot, w)
    assert len(w.objects) == 2
    w.propagate()
    _wait(qtbot, w)
    assert len(w.preview_volumes) == 2 and "2 objects" in w.status.value
    # each from its click by the instance head: the disc on its slices, the other nucleus through the stack
    assert sorted(w.preview_volumes[0]) == list(range(2, 9)) and sorted(w.preview_volumes[1]) == list(range(11))
    w.commit()
    assert set(np.unique(target.data[target.data != before])) == {4, 5}
    w.undo()
    assert np.array_equal(target.data, before)
    _wait(qtbot, w)
    # refining an object through the stack: before the commit, the status line names the
    # slices from which the commit will remove it (the propagated object ends before them)
    w.each_point.value = False
    target.data[:, 46:50, 48:52] = 9  # an old object that runs on through every slice
    target.data[truth & (target.data == 0)] = 9
    before = target.data.copy()
    w.refine_id.value = 9
    w.points_layer.add([5, 48, 50])
    _wait(qtbot, w)
    w.propagate()
    _wait(qtbot, w)
    zs = sorted(w.preview_volumes[0])
    lost = [z for z in range(len(stack)) if z not in zs]
    assert zs == list(range(2, 9)) and lost == [0, 1, 9, 10]
    assert "label 9 is also on slices 0-1, 9-10, from which the commit removes it" in w.status.value
    w.commit()
    assert "removed from 4 slices (0-1, 9-10)" in w.status.value and not (target.data[lost] == 9).any()
    assert _iou(target.data == 9, truth) > 0.8
    w.undo()
    assert np.array_equal(target.data, before)
