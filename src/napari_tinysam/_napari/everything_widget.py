"""The "TinySAM Everything" dock widget: every object of the current slice or of the
whole stack, in a worker with a progress bar; no layer is touched until it finishes."""

from __future__ import annotations

import threading

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from ..everything import (
    MODES,
    Cancelled,
    default_mode,
    recommended_thresholds,
    segment_everything,
    segment_volume,
)
from .layers import image_data, image_ndim, slice_of, voxel_size
from .models import get_model, model_choices

CURRENT, STACK = "current slice", "whole stack"


def run_everything(model_name, data, index, scope, stitch, contrast_limits, params, cancel, report, scale=None):
    """Worker body (no napari calls). ``index`` is the displayed slice (leading axes);
    ``report(done, total)`` is called after each slice; ``scale`` is the stack's voxel size
    (z, y, x) for :func:`segment_volume`, None where unknown. Returns labels shaped like the
    image's spatial axes (only the segmented slice or stack filled). A 2D image reports
    its tiles (1 of 1 when it is not tiled)."""
    model = get_model(model_name)
    spatial = data.shape[: len(index) + 2]
    if scope == CURRENT or len(index) == 0:
        labels2d = segment_everything(
            model, np.asarray(data[index]), contrast_limits=contrast_limits, progress=report, cancel=cancel, **params
        )
        if not index:
            return labels2d
        out = np.zeros(spatial, np.int32)
        out[index] = labels2d
        return out
    # 3D: the whole stack; 4D/5D: the displayed 3D stack (leading indices of the view)
    lead = index[:-1]
    stack = np.asarray(data[lead])
    labels = segment_volume(
        model,
        stack,
        stitch=stitch,
        progress=report,
        cancel=cancel,
        contrast_limits=contrast_limits,
        scale=scale,
        **params,
    )
    if not lead:
        return labels
    out = np.zeros(spatial, np.int32)
    out[lead] = labels
    return out


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread."""

    progressed = Signal(int, int)


class EverythingWidget(Container):
    """Automatic segmentation of every object: auto (instance head + one prompt per
    object), TinySAM's hierarchical mode or SAM's grid."""

    def __init__(self, napari_viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.image_combo = ComboBox(label="image", choices=self._image_layers, nullable=True)
        self.model_combo = ComboBox(label="model", choices=model_choices(), value="default")
        self.mode = ComboBox(label="mode", choices=list(MODES), value="hierarchical")
        self.head_only = CheckBox(text="instance head only (fastest, no prompt decoder)", value=False)
        self.points_per_side = SpinBox(label="points per side", min=4, max=128, value=32)
        self.scope = ComboBox(label="scope", choices=[CURRENT, STACK], value=STACK)
        self.stitch = CheckBox(text="link objects across slices", value=True)
        self.output = LineEdit(label="output layer", value="TinySAM everything")
        self.advanced = CheckBox(text="advanced settings", value=False)
        self.pred_iou = FloatSpinBox(label="pred IoU thresh", min=0.0, max=1.0, step=0.01, value=0.88)
        self.stability = FloatSpinBox(label="stability thresh", min=0.0, max=1.0, step=0.01, value=0.95)
        self.high_score = FloatSpinBox(label="high score thresh", min=-50, max=50, step=0.5, value=8.5)
        self.nms = FloatSpinBox(label="box NMS thresh", min=0.01, max=1.0, step=0.05, value=0.7)
        self.min_area = SpinBox(label="min region area", min=0, max=100000, value=0)
        self.foreground = FloatSpinBox(label="foreground thresh", min=0.01, max=0.99, step=0.05, value=0.5)
        self.center = FloatSpinBox(label="centre seed thresh", min=0.01, max=0.99, step=0.05, value=0.5)
        self.boundary = FloatSpinBox(label="boundary seed thresh", min=0.01, max=0.99, step=0.05, value=0.5)
        self.advanced_box = Container(
            widgets=[
                self.pred_iou,
                self.stability,
                self.high_score,
                self.nms,
                self.min_area,
                self.foreground,
                self.center,
                self.boundary,
            ],
            visible=False,
        )
        self.run_btn = PushButton(text="Run")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.extend(
            [
                self.image_combo,
                self.model_combo,
                self.mode,
                self.head_only,
                self.points_per_side,
                self.scope,
                self.stitch,
                self.output,
                self.advanced,
                self.advanced_box,
                self.run_btn,
                self.cancel_btn,
                self.status,
            ]
        )
        self.advanced.changed.connect(lambda v: setattr(self.advanced_box, "visible", v))
        self._model = None
        self.mode.changed.connect(self._mode_changed)
        # a whole stack in auto mode has its own tuned head thresholds (3D instances)
        self.scope.changed.connect(lambda _: self._mode_changed(self.mode.value))
        self.image_combo.changed.connect(lambda _: self._mode_changed(self.mode.value))
        self._model_worker = None
        self.model_combo.changed.connect(self._model_changed)
        self._model_changed(self.model_combo.value)
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self.cancel)
        self.viewer.layers.events.inserted.connect(self._layers_changed)
        self.viewer.layers.events.removed.connect(lambda e: self.image_combo.reset_choices())
        images = self._image_layers()
        if images:
            self.image_combo.value = images[-1]
        self.worker = None
        self._cancel = threading.Event()
        self._relay = _Relay()
        self._relay.progressed.connect(self._progress)
        self.result_layer = None

    def _model_changed(self, name: str) -> None:
        """Start from the thresholds tuned for the model (stored in its checkpoint)."""
        worker = create_worker(get_model, name, _ignore_errors=True)

        def apply(model):
            self._model = model
            self.mode.choices = [m for m in MODES if m != "auto" or model.has_instance_head]
            self.mode.value = default_mode(model)
            self._mode_changed(self.mode.value)

        def failed(exc):
            show_error(f"TinySAM: could not load model {name!r}: {exc}")

        def ready():
            self._model_worker = None
            self.run_btn.enabled = self.worker is None

        worker.returned.connect(apply)
        worker.errored.connect(failed)
        worker.finished.connect(ready)
        self._model_worker = worker
        self.run_btn.enabled = False  # until the model and its thresholds are loaded
        worker.start()

    def _mode_changed(self, mode: str) -> None:
        """Show the settings of the mode, starting from the model's tuned values."""
        auto = mode == "auto"
        self.head_only.visible = auto
        self.points_per_side.visible = not auto
        for w in (self.stability, self.high_score):
            w.visible = not auto
        for w in (self.foreground, self.center, self.boundary):
            w.visible = auto
        if self._model is None or mode is None:
            return
        t = recommended_thresholds(self._model, mode, volume=self._whole_stack())
        for key, w in (
            ("pred_iou_thresh", self.pred_iou),
            ("stability_score_thresh", self.stability),
            ("box_nms_thresh", self.nms),
            ("foreground_thresh", self.foreground),
            ("center_thresh", self.center),
            ("boundary_thresh", self.boundary),
        ):
            if key in t:
                w.value = t[key]

    def _whole_stack(self) -> bool:
        """Whether a run segments a whole 3D stack (not one 2D image or slice)."""
        image = self.image_combo.value
        return self.scope.value == STACK and image is not None and image_ndim(image) > 2

    def _layers_changed(self, event=None) -> None:
        self.image_combo.reset_choices()
        if self.image_combo.value is None and self._image_layers():
            self.image_combo.value = self._image_layers()[-1]

    def _image_layers(self, _=None):
        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def params(self) -> dict:
        common = {
            "mode": self.mode.value,
            "pred_iou_thresh": self.pred_iou.value,
            "box_nms_thresh": self.nms.value,
            "min_mask_region_area": self.min_area.value,
        }
        if self.mode.value == "auto":
            return {
                **common,
                "head_only": self.head_only.value,
                "foreground_thresh": self.foreground.value,
                "center_thresh": self.center.value,
                "boundary_thresh": self.boundary.value,
            }
        return {
            **common,
            "points_per_side": self.points_per_side.value,
            "stability_score_thresh": self.stability.value,
            "high_score_thresh": self.high_score.value,
        }

    def run(self) -> None:
        image = self.image_combo.value
        if image is None:
            show_error("TinySAM: no image layer; open an image first")
            return
        if self.worker is not None:
            show_info("TinySAM: already running")
            return
        if self._model_worker is not None:
            show_info("TinySAM: the model is still loading; try again in a moment")
            return
        nd = image_ndim(image)
        pos = image.world_to_data(self.viewer.dims.point[-nd:])
        index = slice_of(np.asarray(pos)) if nd > 2 else ()
        if nd > 3 and self.scope.value == STACK:
            show_info(f"TinySAM: {nd}D image; segmenting the displayed 3D stack at index {index[:-1]}")
        try:
            data = image_data(image)
        except ValueError as exc:
            show_error(f"TinySAM: {exc}")
            return
        self._cancel.clear()
        limits = tuple(image.contrast_limits)
        worker = create_worker(
            run_everything,
            self.model_combo.value,
            data,
            index,
            self.scope.value,
            self.stitch.value,
            limits,
            self.params(),
            self._cancel.is_set,
            self._relay.progressed.emit,
            voxel_size(image),
            _ignore_errors=True,
        )
        self.status.value = "running…"
        self.pbar = progress(total=0, desc="TinySAM everything")
        worker.returned.connect(lambda labels: self._finished(image, labels))
        worker.errored.connect(self._failed)
        worker.finished.connect(self._cleanup)
        self.worker = worker
        self.run_btn.enabled = False
        self.cancel_btn.enabled = True
        worker.start()

    def _progress(self, done: int, total: int) -> None:
        self.pbar.total = total
        self.pbar.n = done
        self.pbar.refresh()

    def _finished(self, image, labels) -> None:
        if self._cancel.is_set():  # finished before the cancel was seen: still no layer
            self.status.value = "cancelled"
            return
        self.result_layer = self.viewer.add_labels(
            labels, name=self.output.value or "TinySAM everything", scale=image.scale, translate=image.translate
        )
        arithmetic = get_model(self.model_combo.value).arithmetic  # loaded by the run
        self.status.value = f"{len(np.unique(labels)) - 1} objects ({arithmetic})"

    def _failed(self, exc) -> None:
        if isinstance(exc, Cancelled):
            self.status.value = "cancelled"
            return
        self.status.value = "failed"
        show_error(f"TinySAM everything failed: {exc}")

    def _cleanup(self) -> None:
        self.pbar.close()
        self.worker = None
        self.run_btn.enabled = True
        self.cancel_btn.enabled = False

    def cancel(self) -> None:
        """Stop after the current slice; no layer is added."""
        self._cancel.set()
        self.status.value = "cancelling…"
