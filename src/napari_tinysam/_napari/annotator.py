"""The "TinySAM Annotator" dock widget: click points / draw boxes -> instant mask preview
-> commit into a Labels layer, slice by slice, with undo."""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.colormaps.standardize_color import transform_color
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer

from ..annotate import (
    Candidates,
    ClickHistory,
    UndoRecord,
    Zoom,
    commit_objects,
    is_embedded,
    record_patch,
    replace_object,
    segment_objects,
    segment_prompts,
    slice_rgb,
    split_objects,
    undo_commit,
)
from ..everything import Cancelled
from ..predictor import EmbeddingCache, SamPredictor, compute_embedding, image_key
from ..propagate import choose_method, iter_head_propagation, iter_propagation
from .layers import (
    check_slice,
    image_data,
    image_ndim,
    prompts_on_slice,
    record_in_history,
    slice_of,
    to_image_coords,
    voxel_size,
)
from .models import get_model, model_choices

POSITIVE_COLOR = "#2ecc40"
NEGATIVE_COLOR = "#ff4136"
_POLARITY_RGBA = transform_color([NEGATIVE_COLOR, POSITIVE_COLOR])  # by the "positive" feature: 0, 1
NEW_LAYER = "(new layer)"
PREVIEW_NAME = "TinySAM preview"
KEYS = {
    "commit": "Shift-C",
    "clear": "Shift-X",
    "next": "Shift-M",
    "polarity": "Shift-N",
    "undo": "Shift-U",
    "propagate": "Shift-T",
}


def _check_in_memory(layer: Labels) -> None:
    """Commits write into the layer's array in place: a lazy one (Zarr, Dask) is refused
    with what to do, before anything is written."""
    if not isinstance(layer.data, np.ndarray):
        raise ValueError(
            f"Labels layer {layer.name!r} holds a {type(layer.data).__module__}.{type(layer.data).__name__}, "
            "not an array in memory; load it first (in napari's console: layer.data = "
            f"numpy.asarray(layer.data)) or choose '{NEW_LAYER}'"
        )


def _committed(target: str, records: list[UndoRecord], refining: int, emptied: list[int] = ()) -> str:
    """The status line after a commit into the Labels layer named ``target``; ``emptied``:
    the slices from which a refined object was removed (its new 3D mask ends before them)."""
    undo = f"{KEYS['undo']} undoes it"
    if not records:
        if refining:
            return f"label {refining} of {target!r} unchanged: the new mask is the same"
        return (
            "nothing written: every pixel of the object belongs to another object "
            "(turn on 'overwrite existing objects')"
        )
    if refining and emptied:
        where = f"slice {emptied[0]}" if len(emptied) == 1 else f"{len(emptied)} slices ({_ranges(emptied)})"
        return (
            f"label {refining} of {target!r} replaced; removed from {where}, which the propagated "
            f"object does not reach; {undo}"
        )
    if refining:
        return f"label {refining} of {target!r} replaced; {undo}"
    ids = sorted({r.label for r in records})
    if len(ids) == 1:
        return f"committed label {ids[0]} to {target!r}; {undo}"
    return f"committed {len(ids)} objects (labels {ids[0]}-{ids[-1]}) to {target!r}; {undo}"


def _ranges(values: list[int]) -> str:
    """Sorted integers as ranges: [3, 4, 5, 9] -> "3-5, 9"."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class AnnotatorWidget(Container):
    """Interactive segmentation of the displayed slice of an image layer.

    A click in the points layer adds a positive point (negative while "negative points"
    is on, toggled by Shift-N); a rectangle in the boxes layer is a box prompt. Every
    change segments the slice the prompt lies on. Shift-C commits, Shift-X clears,
    Shift-M shows the next candidate mask, Shift-U undoes the last commit.

    On a 3D image, Shift-T propagates the previewed object through the stack (slices with
    prompts of their own are kept as prompted); the preview grows slice by slice, and
    Shift-C commits the whole 3D object under one new id. Shift-X (or Shift-T again)
    cancels a running propagation.

    With "each positive point is its own object", every positive point on the slice (with
    the negative points nearest to it) is one object: Shift-C commits them under
    consecutive ids in one undoable step, Shift-T propagates each of them. A "refine
    label" id other than 0 takes that object of the labels layer on the slice as the
    prompt; points correct it, and Shift-C replaces exactly that object.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.preview_layer = None  # before the labels choices are first listed
        self.image_combo = ComboBox(label="image", choices=self._image_layers, nullable=True)
        self.model_combo = ComboBox(label="model", choices=model_choices(), value="default")
        self.model_file = FileEdit(label="or checkpoint", mode="r", filter="*.pt *.pth")
        self.labels_combo = ComboBox(label="labels", choices=self._labels_choices)
        self.overwrite = CheckBox(text="overwrite existing objects", value=False)
        self.negative = CheckBox(text=f"negative points ({KEYS['polarity']})", value=False)
        self.zoom = CheckBox(text="zoom in on small objects", value=True)
        self.smooth = CheckBox(text="smooth noisy images for the model", value=True)
        self.smooth.tooltip = (
            "the model sees a noisy slice smoothed (more the noisier it is; a clean slice as it is): "
            "clicks on noisy images find their objects far better. The layer is not changed."
        )
        self.each_point = CheckBox(text="each positive point is its own object", value=False)
        self.refine_id = SpinBox(label="refine label", min=0, max=2**31 - 1, value=0)
        self.refine_id.tooltip = "0: prompts make a new object; an id: that object of the labels layer is refined"
        self.cache_mb = SpinBox(label="cache (MB)", min=16, max=65536, value=512)
        self.store_file = FileEdit(label="embedding store", mode="d")
        self.commit_btn = PushButton(text=f"Commit ({KEYS['commit']})")
        self.clear_btn = PushButton(text=f"Clear ({KEYS['clear']})")
        self.next_btn = PushButton(text=f"Next mask ({KEYS['next']})")
        self.undo_btn = PushButton(text=f"Undo ({KEYS['undo']})")
        self.propagate_btn = PushButton(text=f"Propagate through stack ({KEYS['propagate']})")
        self.status = Label(value="")
        self.extend(
            [
                self.image_combo,
                self.model_combo,
                self.model_file,
                self.labels_combo,
                self.overwrite,
                self.negative,
                self.zoom,
                self.smooth,
                self.each_point,
                self.refine_id,
                self.cache_mb,
                self.store_file,
                self.commit_btn,
                self.clear_btn,
                self.next_btn,
                self.propagate_btn,
                self.undo_btn,
                self.status,
            ]
        )
        self.predictor: SamPredictor | None = None
        self.cache = EmbeddingCache(self.cache_mb.value * 2**20)
        self.points_layer = None
        self.boxes_layer = None
        self.preview_layer = None
        self.candidates: Candidates | None = None
        self._clicks = ClickHistory()  # the current object's masks per prompt prefix
        self.preview_slice: tuple[int, ...] | None = None
        self.undo_stack: list[tuple[Labels, list[UndoRecord]]] = []
        self.objects: list[Candidates] = []  # the previewed slice's objects, one per point
        self._histories: dict[bytes, ClickHistory] = {}  # their click histories
        self.preview_volumes: list[dict[int, np.ndarray]] = []  # per object: z -> mask of a propagated object
        self._lead: tuple[int, ...] = ()  # their stack's index in a 4D / 5D image (t, ...), () in 3D
        self._refine_held: list[int] = []  # slices holding the refined label when the propagation started
        self.volume_scores: list[dict[int, float]] = []
        self._propagation = None  # the running propagation worker
        self._propagation_error: Exception | None = None
        self._cancel_propagation = False
        self._jobs: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (index, rgb, priority)
        self._window_jobs: set[tuple] = set()  # keys of queued magnified windows of the current object
        self._rgb_memo: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._running = None
        self._pending_update: tuple[int, ...] | None = None
        self._model_worker = None
        self._prefetch_index: tuple[int, ...] | None = None
        self._prefetch_timer = QTimer(self.native)
        self._prefetch_timer.setSingleShot(True)
        self._prefetch_timer.setInterval(200)
        self._prefetch_timer.timeout.connect(self._after_preview)
        self._contrast_timer = QTimer(self.native)
        self._contrast_timer.setSingleShot(True)
        self._contrast_timer.setInterval(300)
        self._contrast_timer.timeout.connect(self._contrast_changed)
        self._watched_image = None

        self.image_combo.changed.connect(self._image_changed)
        self.model_combo.changed.connect(lambda v: self.load_model(v))
        self.model_file.changed.connect(lambda v: self.load_model(str(v)) if str(v) not in ("", ".") else None)
        self.cache_mb.changed.connect(lambda v: self.cache.set_max_bytes(v * 2**20))
        self.store_file.changed.connect(lambda v: self.open_store(str(v)) if str(v) not in ("", ".") else None)
        self.store = None
        self.commit_btn.clicked.connect(self.commit)
        self.clear_btn.clicked.connect(self.clear)
        self.next_btn.clicked.connect(self.next_candidate)
        self.undo_btn.clicked.connect(self.undo)
        self.propagate_btn.clicked.connect(self.propagate)
        self.negative.changed.connect(self._polarity_changed)
        self.zoom.changed.connect(lambda _: self._refresh() if self.preview_slice is not None else None)
        self.smooth.changed.connect(lambda _: self._smoothing_changed())
        self.each_point.changed.connect(lambda _: self._mode_changed())
        self.refine_id.changed.connect(lambda _: self._mode_changed())
        self.viewer.layers.events.inserted.connect(self._reset_choices)
        self.viewer.layers.events.removed.connect(self._reset_choices)
        self.load_model(self.model_combo.value)
        images = self._image_layers()
        if images:
            self.image_combo.value = images[-1]
        self._image_changed(self.image_combo.value)

    # -- choices --------------------------------------------------------------------------
    def _image_layers(self, _=None):
        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _labels_choices(self, _=None):
        # the preview layer is never a target (also while it is being added, before
        # self.preview_layer is assigned)
        names = [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and layer is not self.preview_layer and not layer.name.startswith(PREVIEW_NAME)
        ]
        return [NEW_LAYER, *names]  # a new layer unless the user picks one of theirs

    def _reset_choices(self, event=None) -> None:
        self.image_combo.reset_choices()
        self.labels_combo.reset_choices()
        if self.image_combo.value is None and self._image_layers():
            self.image_combo.value = self._image_layers()[-1]

    @property
    def busy(self) -> bool:
        """True while a model load or an embedding is running or queued."""
        return (
            self._running is not None
            or bool(self._jobs)
            or self._model_worker is not None
            or self._propagation is not None
            or self._prefetch_timer.isActive()
        )

    # -- model ----------------------------------------------------------------------------
    def load_model(self, name: str) -> None:
        self.status.value = f"loading model {name}…"
        worker = create_worker(get_model, name, _ignore_errors=True)

        def done(model):
            self._model_worker = None
            self.predictor = SamPredictor(model, cache=self.cache)
            self.cache.clear()
            compiled = ", compiled encoder" if model.compiled else ""
            self.status.value = f"model: {name} ({model.arithmetic}{compiled})"
            self._refresh()

        def failed(exc):
            self._model_worker = None
            self.status.value = "model failed to load"
            show_error(f"TinySAM: could not load model {name!r}: {exc}")

        worker.returned.connect(done)
        worker.errored.connect(failed)
        self._model_worker = worker
        worker.start()

    def open_store(self, path: str) -> bool:
        """Use precomputed embeddings (``napari-tinysam embed``) whose signature matches
        the image layer's data, the model and the layer's contrast limits."""
        from ..embedding_store import EmbeddingStore

        image = self.image_combo.value
        if image is None or self.predictor is None or image_ndim(image) != 3:
            show_error("TinySAM: an embedding store needs a 3D image layer and a loaded model")
            return False
        try:
            self.store = EmbeddingStore.open(
                path, self.predictor.model, np.asarray(image_data(image)), tuple(image.contrast_limits)
            )
        except (ValueError, FileNotFoundError) as exc:
            self.store = None
            show_error(f"TinySAM: {exc}")
            return False
        self.status.value = f"using embedding store {path}"
        return True

    # -- layers ---------------------------------------------------------------------------
    def _image_changed(self, layer) -> None:
        if self._watched_image is not None:
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                self._watched_image.events.contrast_limits.disconnect(self._contrast_event)
        self._watched_image = layer
        if layer is None:
            return
        layer.events.contrast_limits.connect(self._contrast_event)
        self._make_prompt_layers(layer)

    def _make_prompt_layers(self, image) -> None:
        nd = image_ndim(image)
        for old in (self.points_layer, self.boxes_layer, self.preview_layer):
            if old is not None and old in self.viewer.layers:
                self.viewer.layers.remove(old)
        geo = {"scale": image.scale, "translate": image.translate}
        shape = image.data.shape[:nd]
        self.preview_layer = self.viewer.add_labels(np.zeros(shape, np.uint8), name=PREVIEW_NAME, opacity=0.55, **geo)
        self.boxes_layer = self.viewer.add_shapes(
            ndim=nd,
            name="TinySAM boxes",
            edge_color="#ffdc00",
            face_color="transparent",
            edge_width=2,
            **geo,
        )
        self.points_layer = self.viewer.add_points(
            np.zeros((0, nd)),
            ndim=nd,
            name="TinySAM points",
            features={"positive": np.zeros(0, bool)},
            size=max(4.0, min(shape[-2:]) / 60),
            border_color="white",
            **geo,
        )
        self._polarity_changed(self.negative.value)
        self.points_layer.mode = "add"
        self.points_layer.events.data.connect(self._points_event)
        self.boxes_layer.events.data.connect(self._boxes_event)
        for layer in (self.points_layer, self.boxes_layer):
            layer.bind_key(KEYS["commit"], lambda _layer: self.commit(), overwrite=True)
            layer.bind_key(KEYS["clear"], lambda _layer: self.clear(), overwrite=True)
            layer.bind_key(KEYS["next"], lambda _layer: self.next_candidate(), overwrite=True)
            layer.bind_key(KEYS["undo"], lambda _layer: self.undo(), overwrite=True)
            layer.bind_key(KEYS["propagate"], lambda _layer: self.propagate(), overwrite=True)
            layer.bind_key(KEYS["polarity"], lambda _layer: self._toggle_polarity(), overwrite=True)
        self.boxes_layer.mode = "add_rectangle"
        self.viewer.layers.selection.active = self.points_layer
        self.labels_combo.reset_choices()
        self.propagate_btn.enabled = nd >= 3

    def _mode_changed(self) -> None:
        """One object per point, or refining a label, switched on or off: the preview is
        made again from the same prompts."""
        self._prompts_changed()
        self._clicks.clear()
        self._histories.clear()
        image = self.image_combo.value
        if self.refine_id.value and image is not None:
            try:
                self._refine_target()
            except ValueError as exc:
                show_error(f"TinySAM: {exc}")
                return
        if image is not None and self.points_layer is not None:
            index = self.preview_slice or self.current_slice()
            if self.preview_slice is not None:
                self._show(None, self.preview_slice)
            self._refresh(index)

    def _refine_target(self, check: bool = True) -> Labels:
        """The Labels layer holding the object being refined; with ``check``, checked to
        hold it (a scan of the whole layer: done once when the id is picked, not per click)."""
        label, name = self.refine_id.value, self.labels_combo.value
        if name == NEW_LAYER or name not in self.viewer.layers:
            raise ValueError(f"to refine label {label}, choose the Labels layer that holds it under 'labels'")
        layer = self.viewer.layers[name]
        _check_in_memory(layer)
        if check and not (np.asarray(layer.data) == label).any():
            raise ValueError(
                f"label {label} does not exist in layer {name!r}; pick an id it holds, or 0 for a new object"
            )
        return layer

    def _refine_mask(self, index: tuple[int, ...]) -> np.ndarray | None:
        """The refined object's mask on slice ``index`` (None when not refining)."""
        if not self.refine_id.value:
            return None
        layer = self._refine_target(check=False)  # the slice is checked below
        mask = np.asarray(layer.data[index]) == self.refine_id.value
        if not mask.any():
            raise ValueError(
                f"label {self.refine_id.value} is not on slice {index} of layer {layer.name!r}; go to a slice "
                "where it is, or set 'refine label' to 0 for a new object"
            )
        return mask

    def _toggle_polarity(self) -> None:
        self.negative.value = not self.negative.value

    def _polarity_changed(self, negative: bool) -> None:
        layer = self.points_layer
        if layer is None:
            return
        layer.feature_defaults["positive"] = not negative
        # new points take the layer's current style (napari applies it to the selected
        # points too, hence the selection is cleared first): a click then needs no restyle
        layer.selected_data = set()
        layer.current_face_color = NEGATIVE_COLOR if negative else POSITIVE_COLOR
        layer.current_symbol = "x" if negative else "disc"

    def _restyle_points(self) -> None:
        """Positive points green discs, negative ones red crosses; set only where a point's
        style differs (setting them all costs some 5 ms a click)."""
        layer = self.points_layer
        if layer is None or len(layer.data) == 0:
            return
        pos = np.asarray(layer.features["positive"], bool)
        symbols = np.array([str(getattr(v, "value", v)) for v in np.atleast_1d(layer.symbol)])
        if (
            len(layer.face_color) == len(pos)
            and np.allclose(layer.face_color, _POLARITY_RGBA[pos.astype(int)])
            and len(symbols) == len(pos)
            and (symbols == np.where(pos, "disc", "x")).all()
        ):
            return
        layer.face_color = [POSITIVE_COLOR if p else NEGATIVE_COLOR for p in pos]
        layer.symbol = ["disc" if p else "x" for p in pos]

    # -- prompt events --------------------------------------------------------------------
    def _prompts_changed(self) -> None:
        """A propagated object no longer applies once its prompts change."""
        self._stop_propagation()
        self._clear_volume()

    def _points_event(self, event) -> None:
        action = str(getattr(event, "action", "changed"))
        if action.endswith("ing"):
            return
        self._prompts_changed()
        self._restyle_points()
        index = None
        if action.endswith("added") and len(self.points_layer.data):
            index = self._slice_of_layer_coords(self.points_layer, self.points_layer.data[-1])
        self._refresh(index)

    def _boxes_event(self, event) -> None:
        action = str(getattr(event, "action", "changed"))
        if action.endswith("ing"):
            return
        self._prompts_changed()
        index = None
        if action.endswith("added") and len(self.boxes_layer.data):
            index = self._slice_of_layer_coords(self.boxes_layer, self.boxes_layer.data[-1].mean(0))
        self._refresh(index)

    def _slice_of_layer_coords(self, layer, coords) -> tuple[int, ...]:
        image = self.image_combo.value
        return slice_of(to_image_coords(layer, image, np.asarray(coords)[None])[0])

    def current_slice(self) -> tuple[int, ...]:
        """The slice of the image shown in the viewer."""
        image = self.image_combo.value
        nd = image_ndim(image)
        pos = image.world_to_data(
            self.viewer.dims.point[-nd:] if len(self.viewer.dims.point) >= nd else self.viewer.dims.point
        )
        return slice_of(np.asarray(pos))

    def _refresh(self, index: tuple[int, ...] | None = None) -> None:
        """Segment the slice ``index`` (default: the previewed or displayed slice)."""
        image = self.image_combo.value
        if image is None or self.points_layer is None:
            return
        if index is None:
            index = self.preview_slice if self.preview_slice is not None else self.current_slice()
        try:
            check_slice(index, image.data.shape)
            image_data(image)  # a plane small enough to read
        except ValueError as exc:
            show_error(f"TinySAM: {exc}")
            return
        if self.predictor is None:
            self._pending_update = index
            return
        prompts = self._prompts(index)
        try:
            prompts.mask = self._refine_mask(index)
        except ValueError as exc:
            show_error(f"TinySAM: {exc}")
            return
        if prompts.empty:
            self._show(None, index)
            return
        rgb = self._slice_rgb(image, index)
        if self._embedded(index, rgb):
            try:
                if self.each_point.value and prompts.mask is None:
                    self.objects = segment_objects(
                        self.predictor, rgb, prompts, self._histories, rescale=True, encode=False
                    )
                    self.candidates = self.objects[0] if self.objects else None
                    self._show(self._objects_image(self.objects), index)
                    self._look_smaller(index, [v for o in self.objects for v in o.pending_scales])
                    return
                self.candidates = segment_prompts(
                    self.predictor,
                    rgb,
                    prompts,
                    self._clicks,
                    Zoom() if self.zoom.value else None,
                    encode=False,
                    rescale=True,
                )
            except ValueError as exc:
                show_error(f"TinySAM: {exc}")
                return
            self.objects = []
            self._show(self.candidates.mask, index)
            if self.candidates.pending_window is not None:  # a small object: a closer look, then refresh
                self._pending_update = index
                self._window_jobs.add(
                    self._request_embedding(
                        index, self.candidates.pending_window, priority=True, what="a magnified window of slice"
                    )
                )
            self._look_smaller(index, self.candidates.pending_scales)
            # after the preview has been painted: the user is looking, not clicking
            self._prefetch_index = index
            self._prefetch_timer.start()
        else:
            self._pending_update = index
            self._request_embedding(index, rgb, priority=True)

    def _look_smaller(self, index: tuple[int, ...], views) -> None:
        """Embed the smaller views of slice ``index`` that an unconfident object asks for
        (``segment_prompts(..., rescale=True)``), then segment the slice again."""
        for view in views:
            self._pending_update = index
            self._window_jobs.add(self._request_embedding(index, view, priority=True, what="a smaller view of slice"))

    def _slice_rgb(self, image, index: tuple[int, ...]) -> np.ndarray:
        """What the model sees of a slice, memoised for the last few slices (clicks on
        the same slice then cost no rescaling)."""
        key = (id(image.data), index, tuple(image.contrast_limits), self.smooth.value, id(self.predictor.model))
        rgb = self._rgb_memo.get(key)
        if rgb is None:
            smooth_for = self.predictor.model if self.smooth.value else None
            rgb = slice_rgb(np.asarray(image_data(image)[index]), key[2], smooth_for)
            self._rgb_memo[key] = rgb
            while len(self._rgb_memo) > 4:
                self._rgb_memo.popitem(last=False)
        return rgb

    def _embedded(self, index: tuple[int, ...], rgb: np.ndarray, data=None) -> bool:
        """Whether the slice's embedding is cached, taking it from the store if the store
        holds this very image of the slice (not a resized, smoothed or unsmoothed copy).
        ``data``: the stack (default: the image layer's; a worker passes its own)."""
        if is_embedded(self.predictor, rgb):
            return True
        if (
            self.store is not None
            and len(index) == 1
            and self.store.done[index[0]]
            and rgb.shape[:2] == tuple(self.store.signature["shape"][1:3])  # cheap: not a resized copy
            and np.array_equal(
                rgb,
                self.store.slice_rgb(
                    self.predictor.model, image_data(self.image_combo.value) if data is None else data, index[0]
                ),
            )
        ):
            self.cache.put(image_key(self.predictor.model, rgb), self.store.get(index[0]))
            return True
        return False

    def _prompts(self, index):
        image = self.image_combo.value
        pts = to_image_coords(self.points_layer, image, self.points_layer.data)
        positive = np.asarray(self.points_layer.features["positive"], bool) if len(pts) else np.zeros(0, bool)
        boxes = [
            to_image_coords(self.boxes_layer, image, verts)
            for verts, kind in zip(self.boxes_layer.data, self.boxes_layer.shape_type)
            if kind == "rectangle"
        ]
        return prompts_on_slice(pts, positive, boxes, index)

    @staticmethod
    def _objects_image(objects: list[Candidates]) -> np.ndarray | None:
        """The preview of several objects on one slice: object i shown as i + 1."""
        if not objects:
            return None
        image = np.zeros(objects[0].mask.shape, np.uint8)
        for i, obj in enumerate(objects):
            image[obj.mask & (image == 0)] = i % 255 + 1
        return image

    def _clear_volume(self) -> None:
        """Remove the propagated objects' preview (all their slices)."""
        if not self.preview_volumes:
            return
        for z in {z for volume in self.preview_volumes for z in volume}:
            self.preview_layer.data[(*self._lead, z)] = 0
        self.preview_volumes.clear()
        self.volume_scores.clear()
        self.preview_layer.refresh()

    def _show(self, mask: np.ndarray | None, index: tuple[int, ...]) -> None:
        """Preview ``mask`` (bool, or an image of objects 1, 2, ...) on slice ``index``."""
        layer = self.preview_layer
        if self.preview_slice is not None:
            layer.data[self.preview_slice] = 0
        if mask is not None:
            layer.data[index] = mask.astype(np.uint8)
            self.preview_slice = index
        else:
            self.preview_slice = None
            self.candidates = None
            self.objects = []
        layer.refresh()

    # -- embeddings off the GUI thread -------------------------------------------------------
    def _request_embedding(self, index, rgb, priority: bool, what: str = "") -> tuple:
        """Queue an embedding (first with ``priority``); returns its cache key."""
        key = image_key(self.predictor.model, rgb)
        if priority:
            self._jobs.pop(key, None)
            self._jobs[key] = (index, rgb)
            self._jobs.move_to_end(key, last=False)
            self.status.value = f"embedding {what or 'slice'} {index or '(2D)'}…"
        elif key not in self._jobs:
            self._jobs[key] = (index, rgb)
        self._start_next_job()
        return key

    def _start_next_job(self) -> None:
        if self._running is not None or not self._jobs:
            return
        key, (index, rgb) = self._jobs.popitem(last=False)
        if key in self.cache:
            self._start_next_job()
            return
        model = self.predictor.model
        worker = create_worker(compute_embedding, model, rgb, _ignore_errors=True)

        def done(emb):
            self.cache.put(key, emb)
            self._running = None
            if self._pending_update == index:
                self._pending_update = None
                self.status.value = ""
                self._refresh(index)
            # after a preview the queue resumes with the prefetch timer, once napari has
            # painted it: started at once, the encoder's threads competed with the repaint
            if not self._prefetch_timer.isActive():
                self._start_next_job()

        def failed(exc):
            self._running = None
            show_error(f"TinySAM: embedding failed: {exc}")
            self._start_next_job()

        worker.returned.connect(done)
        worker.errored.connect(failed)
        self._running = worker
        worker.start()

    def _after_preview(self) -> None:
        """A preview has been painted: queue its slice's neighbours and resume the
        embedding queue (jobs queued before the preview waited for this too)."""
        self._prefetch_neighbours(self._prefetch_index)
        self._start_next_job()

    def _prefetch_neighbours(self, index: tuple[int, ...]) -> None:
        """Queue the embeddings of the neighbouring slices (z - 1, z + 1), low priority."""
        image = self.image_combo.value
        if not index or image is None or self.predictor is None:
            return
        for dz in (1, -1):
            nb = (*index[:-1], index[-1] + dz)
            if 0 <= nb[-1] < image.data.shape[len(index) - 1]:
                rgb = self._slice_rgb(image, nb)
                if not self._embedded(nb, rgb):
                    self._request_embedding(nb, rgb, priority=False)

    def _contrast_event(self, event=None) -> None:
        self._contrast_timer.start()  # debounce: act 300 ms after the last change

    def _contrast_changed(self) -> None:
        """Contrast limits changed (debounced): the model must see the new view."""
        self.cache.clear()
        if self.store is not None:
            self.store = None
            show_info("TinySAM: contrast limits changed; the embedding store no longer applies")
        self._jobs.clear()
        if self.preview_slice is not None:
            self._refresh(self.preview_slice)

    def _smoothing_changed(self) -> None:
        """The model sees noisy slices smoothed, or no longer: queued embeddings are of the
        other images (cached ones stay, each under its own image)."""
        self._jobs.clear()
        if self.preview_slice is not None:
            self._refresh(self.preview_slice)

    # -- actions ----------------------------------------------------------------------------
    def next_candidate(self) -> None:
        if self.candidates is None or self.preview_slice is None or self.objects:
            return
        self.candidates.chosen = (self.candidates.chosen + 1) % len(self.candidates.masks)
        self._show(self.candidates.mask, self.preview_slice)

    def _target_labels(self) -> Labels:
        image = self.image_combo.value
        name = self.labels_combo.value
        shape = image.data.shape[: image_ndim(image)]
        if name == NEW_LAYER or name not in self.viewer.layers:
            layer = self.viewer.add_labels(
                np.zeros(shape, np.int32), name="TinySAM labels", scale=image.scale, translate=image.translate
            )
            self.labels_combo.reset_choices()
            self.labels_combo.value = layer.name
            self.viewer.layers.selection.active = self.points_layer
            return layer
        layer = self.viewer.layers[name]
        _check_in_memory(layer)
        if tuple(layer.data.shape) != tuple(shape):
            raise ValueError(
                f"Labels layer {name!r} has shape {tuple(layer.data.shape)} but the image has "
                f"shape {tuple(shape)}; choose another Labels layer or '{NEW_LAYER}'"
            )
        return layer

    def commit(self) -> None:
        """Write the previewed mask into the target Labels layer under a new id."""
        if self.candidates is None or self.preview_slice is None:
            show_info("TinySAM: nothing to commit; add a point or a box first")
            return
        if self._propagation is not None:
            show_info(f"TinySAM: the object is still being propagated; wait, or cancel it ({KEYS['propagate']})")
            return
        if self.preview_volumes:
            objects = [{(*self._lead, z): m for z, m in volume.items()} for volume in self.preview_volumes]
        else:
            objects = [{self.preview_slice: c.mask} for c in (self.objects or [self.candidates])]
        refining = self.refine_id.value
        try:
            if refining:
                target = self._refine_target(check=False)  # replace_object checks the id
                records = replace_object(
                    target.data,
                    refining,
                    objects[0],
                    self.overwrite.value,
                    whole=bool(self.preview_volumes),
                    within=self._lead,
                )
            else:
                target = self._target_labels()
                records = commit_objects(target.data, objects, self.overwrite.value)
        except ValueError as exc:
            show_error(f"TinySAM: {exc}")
            return
        if records:
            self.undo_stack.append((target, records))
            record_in_history(target, [(r.index, r.origin, r.previous, r.after) for r in records])
        emptied = []
        if refining and self.preview_volumes:
            emptied = sorted(r.index[-1] for r in records if not np.any(objects[0].get(r.index, False)))
        self.clear()
        self.status.value = _committed(target.name, records, refining, emptied)
        if not records:
            show_info(f"TinySAM: {self.status.value}")
        if refining:
            self.refine_id.value = 0

    def clear(self) -> None:
        """Remove the current object's prompts and its preview."""
        if self.points_layer is None:
            return
        self.status.value = ""
        self._prompts_changed()
        index = self.preview_slice
        self._clicks.clear()
        self._histories.clear()
        for key in self._window_jobs:  # magnified windows of this object not started yet
            self._jobs.pop(key, None)
        self._window_jobs.clear()
        with self.points_layer.events.data.blocker(), self.boxes_layer.events.data.blocker():
            self.points_layer.data = np.zeros((0, self.points_layer.ndim))
            self.boxes_layer.data = []
        if index is not None:
            self._show(None, index)

    def undo(self) -> None:
        """Restore the Labels layer as it was before the last commit; pixels edited since
        (e.g. with napari's brush) keep the edit."""
        if not self.undo_stack:
            show_info("TinySAM: nothing to undo")
            return
        layer, records = self.undo_stack.pop()
        patches = [record_patch(layer.data, r) for r in reversed(records)]
        before = [p.copy() for p in patches]
        kept = sum(undo_commit(layer.data, record) for record in reversed(records))
        changes = [(r.index, r.origin, old, p.copy()) for r, old, p in zip(reversed(records), before, patches)]
        record_in_history(layer, changes)
        ids = sorted({r.label for r in records})
        if not kept and all(np.array_equal(old, new) for *_, old, new in changes):
            self.status.value = f"label {', '.join(map(str, ids))} was undone already (napari's undo); nothing changed"
            return
        self.status.value = f"undone: label{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} in {layer.name!r}"
        if kept:
            show_info(f"TinySAM: commit undone; {kept} of its pixels edited since were left as edited")

    # -- 3D propagation -----------------------------------------------------------------------
    def propagate(self) -> None:
        """Propagate the previewed object through the stack, in a worker thread: only the
        slices it reaches are embedded, nearest first, and the preview grows slice by
        slice. Called while a propagation runs, it cancels it."""
        if self._propagation is not None:
            self._stop_propagation()
            return
        image = self.image_combo.value
        if image is None or image_ndim(image) < 3:
            show_error(
                "TinySAM: propagation needs a 3D image layer (Z, Y, X, or a 4D one whose displayed stack "
                f"it follows); on a 2D image commit with {KEYS['commit']}"
            )
            return
        if self.predictor is None:
            show_info("TinySAM: the model is still loading")
            return
        if self.candidates is None or self.preview_slice is None:
            show_info("TinySAM: nothing to propagate; click the object on one slice first")
            return
        # every slice with prompts seeds the object (segmented again at the scale the
        # propagation picks for the stack); a candidate other than the first that the
        # user picked on the previewed slice is kept as it is
        *lead, z0 = self.preview_slice  # in a 4D image (t, z, y, x) the stack at t
        if self.objects:  # one object per point: each from its click, or seeded by its mask on this slice
            model = self.predictor.model
            seeds = [
                ({z0: p}, {}) if choose_method(model, {z0: p}, None) == "head" else ({}, {z0: obj.mask.copy()})
                for p, obj in zip(split_objects(self._prompts((*lead, z0))), self.objects)
            ]
        else:
            prompts = {z: p for z in self._prompted_slices(tuple(lead)) if not (p := self._prompts((*lead, z))).empty}
            masks = {}
            if self.candidates.chosen != self.candidates.best or z0 not in prompts or self.refine_id.value:
                masks[z0] = self.candidates.mask.copy()
                prompts.pop(z0, None)
            seeds = [(prompts, masks)]
        self._start_propagation(image, tuple(lead), seeds)

    def _prompted_slices(self, lead: tuple[int, ...]) -> list[int]:
        """The z of every slice of the stack at ``lead`` that holds a prompt."""
        image = self.image_combo.value
        nd = image_ndim(image)
        coords = [to_image_coords(self.points_layer, image, self.points_layer.data)]
        coords += [to_image_coords(self.boxes_layer, image, v) for v in self.boxes_layer.data]
        return sorted(
            {
                index[-1]
                for block in coords
                for c in np.asarray(block).reshape(-1, nd)
                if (index := slice_of(c))[:-1] == lead
            }
        )

    def _start_propagation(self, image, lead: tuple[int, ...], seeds: list[tuple[dict, dict]]) -> None:
        """Propagate each object of ``seeds`` ((prompts, masks) by slice) in turn through
        the stack at ``lead`` (``()`` for a 3D image)."""
        predictor = SamPredictor(self.predictor.model, cache=self.cache)  # its own current slice
        self._jobs.clear()  # queued neighbour prefetches: the propagation embeds what it reaches
        data, limits, voxel = image_data(image)[lead], tuple(image.contrast_limits), voxel_size(image)
        self._lead = lead
        self._cancel_propagation = False
        self._propagation_error = None
        self.preview_volumes = [{} for _ in seeds]
        self.volume_scores = [{} for _ in seeds]
        self._refine_held = []
        held, label = self._refined_stack(lead), self.refine_id.value

        def run():
            if held is not None:  # the slices that hold the refined label, for the status line at the end
                self._refine_held = np.flatnonzero((held == label).any((1, 2))).tolist()
            for i, (prompts, masks) in enumerate(seeds):
                if choose_method(predictor.model, prompts, masks) == "head":
                    # the head sees denoised slices: the store's embeddings of the raw ones do not apply
                    results = iter_head_propagation(
                        predictor,
                        data,
                        prompts,
                        contrast_limits=limits,
                        cancel=lambda: self._cancel_propagation,
                        scale=voxel,
                    )
                else:
                    results = iter_propagation(
                        predictor,
                        data,
                        prompts,
                        masks,
                        contrast_limits=limits,
                        prepare_slice=lambda z, rgb: self._embedded((*lead, z), rgb, data),
                    )
                try:
                    for res in results:
                        yield i, res
                        if self._cancel_propagation:
                            return
                except Cancelled:
                    return

        worker = create_worker(run, _ignore_errors=True)
        worker.yielded.connect(self._propagated_slice)
        worker.finished.connect(self._propagation_finished)
        worker.errored.connect(self._propagation_failed)
        self._propagation = worker
        self.status.value = f"propagating from slice {min({*seeds[0][0], *seeds[0][1]})}…"
        worker.start()

    def _propagated_slice(self, item) -> None:
        i, res = item
        if self._cancel_propagation:
            return
        if res.kept:
            self.preview_volumes[i][res.z] = res.mask
            self.volume_scores[i][res.z] = res.score
        elif res.z in self.preview_volumes[i]:  # an earlier estimate held it; this one does not
            del self.preview_volumes[i][res.z]
            del self.volume_scores[i][res.z]
        else:
            return
        plane = np.zeros(res.mask.shape, np.uint8)
        for j, volume in enumerate(self.preview_volumes):
            if res.z in volume:
                plane[volume[res.z] & (plane == 0)] = j % 255 + 1
        self.preview_layer.data[(*self._lead, res.z)] = plane
        if self._on_screen(res.z):  # other slices are read afresh when the user goes to them
            self.preview_layer.refresh(thumbnail=False)
        zs = sorted(self.preview_volumes[i])
        what = f"object {i + 1} of {len(self.preview_volumes)}: " if len(self.preview_volumes) > 1 else ""
        if zs:
            self.status.value = f"propagating {what}slices {zs[0]}-{zs[-1]}…"

    def _on_screen(self, z: int) -> bool:
        """Whether slice ``z`` of the image may be displayed: it is the YX slice in view,
        or the view is 3D or another plane (XZ, YZ) that crosses every slice."""
        dims = self.viewer.dims
        if self.image_combo.value is None or tuple(dims.displayed) != (dims.ndim - 2, dims.ndim - 1):
            return True
        return self.current_slice() == (*self._lead, z)

    def _propagation_finished(self) -> None:
        self._propagation = None
        self.preview_layer.refresh()  # the thumbnail too
        self.preview_volumes = [v for v in self.preview_volumes if v]
        self.volume_scores = [s for s in self.volume_scores if s]
        if self._propagation_error is not None:
            self.status.value = "propagation failed; the preview shows the slices done before it"
            return
        if not self.preview_volumes:
            self.status.value = (
                "propagation cancelled"
                if self._cancel_propagation
                else "no object found through the stack: click inside the object, or add points"
            )
            return
        zs = sorted({z for volume in self.preview_volumes for z in volume})
        worst, score = min(((z, p) for scores in self.volume_scores for z, p in scores.items()), key=lambda t: t[1])
        state = "cancelled: " if self._cancel_propagation else ""
        n = len(self.preview_volumes)
        what = "object" if n == 1 else f"{n} objects"
        self.status.value = (
            f"{state}{what} on slices {zs[0]}-{zs[-1]}; least confident: slice {worst} "
            f"(confidence {score:.2f}); {KEYS['commit']} commits {'it' if n == 1 else 'them'}"
            f"{self._refine_losses(zs)}"
        )

    def _refined_stack(self, lead: tuple[int, ...]) -> np.ndarray | None:
        """The (Z, H, W) stack of the Labels layer whose label is being refined (None when
        not refining); the propagation's worker reads which slices hold the label."""
        if not self.refine_id.value:
            return None
        try:
            stack = self._refine_target(check=False).data[lead]
        except (ValueError, IndexError):
            return None
        return stack if np.ndim(stack) == 3 else None

    def _refine_losses(self, zs: list[int]) -> str:
        """When a propagated object refines an existing label: the slices from which the
        commit will remove that label (the propagated object does not reach them), said
        before the user commits (the slices that hold it were found in the worker)."""
        lost = sorted(set(self._refine_held) - set(zs)) if self.refine_id.value else []
        if not lost:
            return ""
        return (
            f"; label {self.refine_id.value} is also on slice{'s' if len(lost) > 1 else ''} "
            f"{_ranges(lost)}, from which the commit removes it"
        )

    def _propagation_failed(self, exc: Exception) -> None:
        self._propagation_error = exc
        show_error(f"TinySAM: propagation failed: {exc}")

    def _stop_propagation(self) -> None:
        """Cancel a running propagation (its preview so far stays until cleared)."""
        if self._propagation is not None:
            self._cancel_propagation = True
            self._propagation.quit()
