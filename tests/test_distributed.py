"""Dask: a LocalCluster with two workers gives the single-process labels."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("distributed")

from napari_tinysam.distributed import connect, segment_volume_distributed  # noqa: E402
from napari_tinysam.everything import segment_volume  # noqa: E402
from napari_tinysam.model import save_checkpoint  # noqa: E402
from napari_tinysam.weights import load_model  # noqa: E402

PARAMS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def client():
    c = connect(workers=2)
    yield c
    c.close()


def test_two_workers_match_single_process(client, tiny_model, tmp_path):
    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, path)
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 3000, (5, 32, 40), dtype=np.uint16)
    reference = segment_volume(load_model(path), stack, mode="grid", **PARAMS)
    calls = []
    out = segment_volume_distributed(str(path), stack, tmp_path / "out.zarr", client, mode="grid",
                                     contrast_limits=None, progress=lambda d, t: calls.append(d), **PARAMS)
    np.testing.assert_array_equal(np.asarray(out[...]), reference)
    assert sorted(calls) == [1, 2, 3, 4, 5]
    with pytest.raises(FileExistsError):
        segment_volume_distributed(str(path), stack, tmp_path / "out.zarr", client, **PARAMS)


def test_closing_the_client_stops_its_local_cluster():
    """The command line closes its client when done: no worker process may outlive it."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    c = connect(workers=1)
    cluster = c.cluster
    assert len(set(multiprocessing.active_children()) - before) == 1
    c.close()
    assert cluster.status.name == "closed"
    assert not set(multiprocessing.active_children()) - before


def test_unreachable_scheduler_fails_fast():
    import time

    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="does not answer"):
        connect("tcp://127.0.0.1:9", timeout=2)
    assert time.perf_counter() - t0 < 15


def test_cli_workers_and_bad_scheduler(tiny_model, tmp_path, capsys):
    import zarr

    from napari_tinysam.cli import main

    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, path)
    z = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=(3, 32, 32), dtype="uint16")
    z[...] = np.random.default_rng(1).integers(0, 1000, (3, 32, 32), dtype=np.uint16)
    args = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--model", str(path)]
    assert main(["segment", str(tmp_path / "in.zarr"), "-o", str(tmp_path / "out.zarr"), "--workers", "2", *args]) == 0
    assert "each slice is segmented on its own" in capsys.readouterr().err  # what Dask does differently
    single = tmp_path / "single.zarr"
    assert main(["segment", str(tmp_path / "in.zarr"), "-o", str(single), *args]) == 0
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"))[...], zarr.open_array(str(single))[...])
    assert main(["segment", str(tmp_path / "in.zarr"), "-o", str(tmp_path / "x.zarr"), "--scheduler",
                 "tcp://127.0.0.1:9", *args]) == 2
    assert "does not answer" in capsys.readouterr().err
