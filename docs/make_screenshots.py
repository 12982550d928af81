"""Regenerate the README screenshots (run under an X server: xvfb-run -a).

    xvfb-run -a .venv/bin/python docs/make_screenshots.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def main() -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_tinysam import samples
    from napari_tinysam._napari.annotator import AnnotatorWidget
    from napari_tinysam._napari.everything_widget import EverythingWidget
    from napari_tinysam.evaluation import innermost_point

    app = QApplication.instance() or QApplication([])

    def wait(cond, timeout=300.0):
        t0 = time.perf_counter()
        while not cond():
            app.processEvents()
            time.sleep(0.01)
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError

    # 1. annotator on the 2D sample: four nuclei committed from one click each, the fifth
    #    drawn as a box and shown as the preview (points and a box on one slice are one
    #    object's prompts, so the click-made objects are committed first)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    image, truth = samples.nuclei_2d(), samples.nuclei_2d_labels()
    viewer.add_image(image, name="nuclei")
    w = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(w, name="TinySAM Annotator")
    wait(lambda: not w.busy)
    ids, counts = np.unique(truth[truth > 0], return_counts=True)
    big = ids[np.argsort(-counts)][:5]
    for i in big[:4]:
        x, y = innermost_point(truth == i)
        w.points_layer.add([y, x])
        wait(lambda: not w.busy and w.preview_layer.data.any())
        w.commit()
    ys, xs = np.nonzero(truth == big[4])
    w.boxes_layer.add_rectangles(np.array([[ys.min() - 2, xs.min() - 2], [ys.max() + 2, xs.max() + 2]]))
    wait(lambda: not w.busy)
    viewer.reset_view()
    app.processEvents()
    viewer.screenshot(str(HERE / "annotator.png"), canvas_only=False)
    viewer.close()

    # 2. everything widget on the 2D sample
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.add_image(image, name="nuclei")
    e = EverythingWidget(viewer)
    viewer.window.add_dock_widget(e, name="TinySAM Everything")
    e.advanced.value = True
    wait(lambda: e._model_worker is None)
    e.run()
    wait(lambda: e.worker is None)
    viewer.reset_view()
    app.processEvents()
    viewer.screenshot(str(HERE / "everything.png"), canvas_only=False)
    viewer.close()
    print("wrote", HERE / "annotator.png", HERE / "everything.png")


if __name__ == "__main__":
    main()
