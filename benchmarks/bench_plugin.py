"""Annotator latency in a real napari viewer (run under an X server, e.g. xvfb-run -a).

- click -> preview: a point is added to the prompt layer with the slice's embedding
  cached and the viewer idle (the previous object's clear repainted, as it is by the time
  a user clicks again); the time until the preview layer holds the mask and the canvas
  has repainted (median of N clicks); then a corrective click on each of those objects
  (a negative point just outside it) to its refined preview;
- one object per point: click -> preview of the first 10 and the last 10 of
  ``--each-point`` nuclei clicked in turn with "each positive point is its own object";
- GUI responsiveness: the longest gap between ticks of a 10 ms timer on the GUI thread
  during each of those clicks (how long the viewer froze), and while embeddings of new
  slices are computed in the widget's worker thread;
- 3D propagation (Shift-T) on a noisy stack built from the sample (``volumes.noisy_stack``):
  one click on a nucleus's largest slice, in view, then the time to the first preview (the
  clicked slice), to the first propagated slice in the preview, to the whole object, the
  slices embedded, and the longest GUI-thread gap meanwhile (median over ``--objects``
  nuclei, each on a cold embedding cache).

    xvfb-run -a .venv/bin/python benchmarks/bench_plugin.py [--clicks 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


class GapMeter:
    """Ticks a 10 ms timer on the GUI thread and keeps the gaps between ticks: the
    longest is how long the GUI thread was blocked."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.gaps: list[float] = []
        self._last = time.perf_counter()
        self.timer = QTimer()
        self.timer.timeout.connect(self._tick)
        self.timer.start(10)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self._last)
        self._last = now

    def stop(self) -> None:
        self.timer.stop()

    def longest(self) -> float:
        return max(self.gaps[1:], default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--model", default="default")
    ap.add_argument("--objects", type=int, default=5, help="nuclei propagated through the 3D stack")
    ap.add_argument(
        "--each-point",
        type=int,
        default=40,
        help="nuclei clicked with 'each positive point is its own object' (at least 10)",
    )
    ap.add_argument("--no-zoom", action="store_true", help="turn off the magnified second look at small objects")
    args = ap.parse_args()

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_tinysam import samples
    from napari_tinysam._napari.annotator import AnnotatorWidget
    from napari_tinysam.bench import cpu_name, print_table
    from napari_tinysam.evaluation import innermost_point

    torch.set_num_threads(2)
    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    image, truth = samples.nuclei_2d(), samples.nuclei_2d_labels()
    stack = np.stack([np.roll(image, 7 * z, axis=1) for z in range(6)])
    viewer.add_image(stack, name="nuclei stack")
    widget = AnnotatorWidget(viewer)
    widget.model_combo.value = args.model
    widget.zoom.value = not args.no_zoom
    viewer.window.add_dock_widget(widget)

    def wait(cond, timeout=120.0):
        t0 = time.perf_counter()
        while not cond():
            app.processEvents()
            time.sleep(0.001)
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError

    def settle(seconds=0.1):
        """Let the viewer finish what is pending (the repaint after a clear), as it has
        by the time a user clicks again."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            app.processEvents()
            time.sleep(0.005)

    wait(lambda: not widget.busy)
    # warm the cache for slice 0
    ids = [i for i in np.unique(truth) if i][: args.clicks + 1]
    x, y = innermost_point(truth == ids[0])
    widget.points_layer.add([0, y, x])
    wait(lambda: not widget.busy and widget.preview_slice == (0,))
    widget.clear()
    settle()

    latencies, frozen, corrective = [], [], []
    for i in ids[1 : args.clicks + 1]:
        x, y = innermost_point(truth == i)
        meter = GapMeter()
        t0 = time.perf_counter()
        widget.points_layer.add([0, y, x])
        wait(lambda: widget.preview_slice == (0,) and widget.preview_layer.data[0].any())
        app.processEvents()  # let the canvas redraw
        latencies.append(time.perf_counter() - t0)
        meter.stop()
        frozen.append(max(meter.gaps, default=0.0))
        # a corrective click: a negative point 4 px right of the nucleus, on the first
        # click's row; the previous mask goes in as the mask prompt
        widget.negative.value = True
        settle()
        first = widget.candidates
        x_out = min(int(np.flatnonzero(truth[int(y)] == i).max()) + 4, truth.shape[1] - 1)
        t0 = time.perf_counter()
        widget.points_layer.add([0, y, x_out])
        wait(lambda first=first: widget.candidates is not first)  # the neighbours' prefetch may go on
        app.processEvents()
        corrective.append(time.perf_counter() - t0)
        widget.negative.value = False
        widget.clear()
        settle()

    # one object per point: the time of a click with many objects on the slice already
    widget.each_point.value = True
    settle()
    many = [i for i in np.unique(truth) if i][: args.each_point]
    each = []
    for k, i in enumerate(many):
        x, y = innermost_point(truth == i)
        t0 = time.perf_counter()
        widget.points_layer.add([0, y, x])
        wait(lambda k=k: len(widget.objects) == k + 1)
        app.processEvents()
        each.append(time.perf_counter() - t0)
        settle(0.02)
    widget.clear()
    widget.each_point.value = False
    settle()

    # GUI-thread gaps while new slices are embedded in the worker
    meter = GapMeter()
    t_embed = 0.0
    for z in range(1, 5):
        x, y = innermost_point(truth == ids[0])
        t0 = time.perf_counter()
        widget.points_layer.add([z, y, x])
        wait(lambda z=z: widget.preview_slice == (z,))
        app.processEvents()  # let the canvas redraw
        t_embed += time.perf_counter() - t0
        wait(lambda: not widget.busy)  # the neighbours' prefetch too
        widget.clear()
        settle()  # a user's next click comes after the clear's repaint
    meter.stop()
    prop = propagation_rows(app, viewer, widget, wait, image, truth, args.objects) if args.objects else []
    rows = [
        {
            "measure": "click -> preview, embedding cached (median)",
            "value_ms": f"{statistics.median(latencies) * 1e3:.1f}",
            "target_ms": "<= 40",
        },
        {
            "measure": "click -> preview, embedding cached (max)",
            "value_ms": f"{max(latencies) * 1e3:.1f}",
            "target_ms": "",
        },
        {
            "measure": "corrective click (a negative point on the object) -> preview (median)",
            "value_ms": f"{statistics.median(corrective) * 1e3:.1f}",
            "target_ms": "",
        },
        {
            "measure": "longest GUI-thread gap per click (median / max)",
            "value_ms": f"{statistics.median(frozen) * 1e3:.1f} / {max(frozen) * 1e3:.1f}",
            "target_ms": "",
        },
        *(
            [
                {
                    "measure": "each point its own object: click -> preview, clicks 1-10 (median)",
                    "value_ms": f"{statistics.median(each[:10]) * 1e3:.1f}",
                    "target_ms": "",
                },
                {
                    "measure": f"same, clicks {len(each) - 9}-{len(each)} (median)",
                    "value_ms": f"{statistics.median(each[-10:]) * 1e3:.1f}",
                    "target_ms": "",
                },
            ]
            if each
            else []
        ),
        {
            "measure": "longest GUI-thread gap during 4 slice embeddings",
            "value_ms": f"{meter.longest() * 1e3:.1f}",
            "target_ms": "<= 100",
        },
        {
            "measure": "4 slices in turn: click -> preview (mean; each slice prefetched)",
            "value_ms": f"{t_embed / 4 * 1e3:.0f}",
            "target_ms": "",
        },
        *prop,
    ]
    print(
        f"{cpu_name()}; napari {napari.__version__}, model {args.model} ({widget.predictor.model.arithmetic}), "
        f"zoom {'off' if args.no_zoom else 'on'}, {len(latencies)} clicks, image {stack.shape}"
    )
    print_table(rows, ["measure", "value_ms", "target_ms"])
    viewer.close()


def propagation_rows(app, viewer, widget, wait, image, truth, n_objects) -> list[dict]:
    from volumes import noisy_stack

    from napari_tinysam.evaluation import innermost_point

    stack, labels = noisy_stack(image, truth, seed=0)
    layer = viewer.add_image(stack, name="noisy stack")
    widget.image_combo.value = layer
    wait(lambda: not widget.busy)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    shown, first, whole, gaps_max, embedded, spans = [], [], [], [], [], []
    for i in ids[np.argsort(-counts)][:n_objects]:
        obj = labels == i
        area = obj.reshape(len(obj), -1).sum(1)
        z = int(np.argmax(area))
        x, y = innermost_point(obj[z])
        widget.cache.clear()
        viewer.dims.set_point(0, z)  # the user looks at the slice they click on
        widget.points_layer.add([z, y, x])
        wait(lambda z=z: not widget.busy and widget.preview_slice == (z,))
        before = widget.predictor.encoder_calls + len(widget.cache)
        meter = GapMeter()
        t0 = time.perf_counter()
        widget.propagate()
        wait(lambda: widget.preview_volumes and len(widget.preview_volumes[0]) >= 1)
        shown.append(time.perf_counter() - t0)
        wait(lambda: len(widget.preview_volumes[0]) >= 2)
        first.append(time.perf_counter() - t0)
        wait(lambda: not widget.busy)
        whole.append(time.perf_counter() - t0)
        meter.stop()
        app.processEvents()
        gaps_max.append(meter.longest())
        embedded.append(len(widget.cache) + widget.predictor.encoder_calls - before)
        spans.append(int((area > 0).sum()))
        widget.clear()
    med = statistics.median
    return [
        {
            "measure": f"Shift-T -> first preview shown (median, {len(first)} nuclei)",
            "value_ms": f"{med(shown) * 1e3:.0f}",
            "target_ms": "<= 1 embedding + seed",
        },
        {
            "measure": "Shift-T -> first propagated slice in the preview (median)",
            "value_ms": f"{med(first) * 1e3:.0f}",
            "target_ms": "",
        },
        {"measure": "Shift-T -> whole object (median)", "value_ms": f"{med(whole) * 1e3:.0f}", "target_ms": ""},
        {
            "measure": "longest GUI-thread gap during propagation (max)",
            "value_ms": f"{max(gaps_max) * 1e3:.1f}",
            "target_ms": "<= 100",
        },
        {
            "measure": f"slices embedded / spanned (median; stack depth {len(stack)})",
            "value_ms": f"{med(embedded):.0f} / {med(spans):.0f}",
            "target_ms": "",
        },
    ]


if __name__ == "__main__":
    main()
