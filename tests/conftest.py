"""Shared fixtures: shared data folders (from environment variables), a temporary model
cache, and small models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE_DIR = Path(os.environ.get("TINYSAM_CONFORMANCE_DIR", ROOT.parent / "shared" / "conformance"))
DATA_DIR = Path(os.environ.get("TINYSAM_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's real model cache."""
    monkeypatch.setenv("TINYSAM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _qt_workers_finish_before_exit():
    """Let napari's thread-pool workers (embeddings) end before the interpreter does: a
    pool thread still unwinding at exit can crash the process after every test passed."""
    yield
    try:
        from qtpy.QtCore import QThreadPool
    except Exception:  # no Qt binding: headless install
        return
    QThreadPool.globalInstance().waitForDone(30000)


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not CONFORMANCE_DIR.is_dir():
        pytest.skip(f"conformance fixtures not found at {CONFORMANCE_DIR} (set TINYSAM_CONFORMANCE_DIR)")
    return CONFORMANCE_DIR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR} (set TINYSAM_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def vit_t_model(conformance_dir):
    """The conformance vit_t weights (random values, official layout), img_size 1024."""
    from napari_tinysam import load_model

    return load_model(conformance_dir / "vit_t_perturbed_fp16.pt", precision="fp32")


@pytest.fixture(scope="session")
def tiny_model():
    """A small random TinySAM-layout model at img_size 256 for fast plumbing tests."""
    from napari_tinysam.model import architecture_config, build_sam

    cfg = architecture_config("vit_t", 256)
    cfg["image_encoder"].update(embed_dims=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4])
    torch.manual_seed(0)
    return build_sam(cfg).eval()


@pytest.fixture
def blobs_image() -> tuple[np.ndarray, np.ndarray]:
    """A 96x128 uint16 image with four bright discs and their labels."""
    yy, xx = np.mgrid[:96, :128]
    labels = np.zeros((96, 128), np.int32)
    for i, (cy, cx, r) in enumerate([(20, 20, 10), (30, 80, 14), (70, 40, 12), (70, 100, 9)], 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    image = (200 + 3000 * (labels > 0)).astype(np.uint16)
    return image, labels


def pytest_unconfigure(config):
    """The interpreter's own teardown ends the run. It must not crash: widgets built in
    tests are docked into their viewer (closing the viewer deletes them, where a
    parentless widget would stay a top-level Qt widget until the interpreter destroys it
    in no set order), and a Dask LocalCluster is owned by its client, so that closing the
    client stops its worker processes. ``TINYSAM_TEST_REPORT_EXIT=1`` prints what is still
    alive when the teardown starts (see CONTRIBUTING.md)."""
    if os.environ.get("TINYSAM_TEST_REPORT_EXIT") == "1":
        _report_alive_at_exit()


def _report_alive_at_exit() -> None:
    """What is still alive when the interpreter's teardown starts: threads, and Qt's
    top-level widgets and thread pool (printed to stderr)."""
    import sys
    import threading
    from collections import Counter

    names = [f"{t.name} (daemon={t.daemon})" for t in threading.enumerate()]
    print(f"\nalive at exit: {len(names)} threads: {', '.join(names)}", file=sys.stderr)
    if "qtpy" in sys.modules:
        from qtpy.QtCore import QThreadPool
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        widgets = Counter(
            f"{type(w).__name__}[{', '.join(sorted({type(c).__name__ for c in w.children()}))}]"
            for w in (app.topLevelWidgets() if app else [])
        )
        print(
            f"Qt: {sum(widgets.values())} top-level widgets {dict(widgets)}, thread pool active "
            f"{QThreadPool.globalInstance().activeThreadCount()}",
            file=sys.stderr,
        )
