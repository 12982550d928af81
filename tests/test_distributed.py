"""Dask: a LocalCluster with two workers gives the single-process labels."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("distributed")

from napari_tinysam.distributed import (  # noqa: E402
    border_matches,
    connect,
    join_blocks,
    plan_blocks,
    segment_volume_distributed,
)
from napari_tinysam.everything import segment_volume  # noqa: E402
from napari_tinysam.model import save_checkpoint  # noqa: E402
from napari_tinysam.weights import load_model  # noqa: E402

PARAMS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def client():
    c = connect(workers=2)
    yield c
    c.close()


@pytest.fixture
def worker_threads():
    """The single-process runs compared with the workers use the workers' one thread: on
    CPUs with bfloat16 the low-precision kernels round differently with another thread
    count, which moves a few boundary pixels (the labels are equal thread for thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)


def test_two_workers_match_single_process(client, tiny_model, tmp_path, worker_threads):
    import zarr

    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, path)
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 3000, (5, 32, 40), dtype=np.uint16)
    reference = segment_volume(load_model(path), stack, mode="grid", **PARAMS)
    calls = []
    out = segment_volume_distributed(
        str(path),
        stack,
        tmp_path / "out.zarr",
        client,
        mode="grid",
        contrast_limits=None,
        progress=lambda d, t: calls.append(d),
        **PARAMS,
    )
    np.testing.assert_array_equal(np.asarray(out[...]), reference)
    assert sorted(calls) == [1, 2, 3, 4, 5]
    # a dask array stored in chunks of several slices (as Zarr stores often are)
    import dask.array as da

    chunked = segment_volume_distributed(
        str(path), da.from_array(stack, chunks=(2, 16, 40)), tmp_path / "c.zarr", client, mode="grid", **PARAMS
    )
    np.testing.assert_array_equal(np.asarray(chunked[...]), reference)
    with pytest.raises(FileExistsError):
        segment_volume_distributed(str(path), stack, tmp_path / "out.zarr", client, **PARAMS)
    # a run that fails on the workers leaves the old labels as they were, and nothing else
    with pytest.raises(ValueError, match="points_per_side"):
        segment_volume_distributed(
            str(path),
            stack,
            tmp_path / "out.zarr",
            client,
            mode="grid",
            overwrite=True,
            **{**PARAMS, "points_per_side": -1},
        )
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"))[...], reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr", "out.zarr", "tiny.pt"]


def same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label volumes hold the same objects, whatever their ids."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_3d_auto_on_dask_gives_segment_volumes_objects(client, tmp_path, worker_threads):
    """With the bundled model (instance head) a run on Dask builds 3D instances as
    segment_volume does: one block gives its labels exactly; in blocks, an object that
    crosses a block border keeps one id (each block here reads every slice, so any
    difference is the joining's)."""
    from napari_tinysam.samples import nuclei_3d

    stack = nuclei_3d()[5:25]
    reference = segment_volume(load_model("default"), stack)
    assert reference.max() >= 10
    calls = []
    whole = segment_volume_distributed(
        "default", stack, tmp_path / "whole.zarr", client, progress=lambda d, t: calls.append((d, t))
    )
    np.testing.assert_array_equal(np.asarray(whole[...]), reference)
    assert calls[-1] == (22, 22) and len(calls) == 22  # 20 slices, one block, one relabelling
    blocks = np.asarray(
        segment_volume_distributed("default", stack, tmp_path / "blocks.zarr", client, block_depth=6)[...]
    )
    crossing = [i for i in np.unique(reference[5:7]) if i and (reference[:6] == i).any() and (reference[6:] == i).any()]
    assert crossing  # objects that cross the first border
    assert same_objects(blocks, reference)
    assert blocks.max() == reference.max()
    assert not list(tmp_path.glob(".*"))  # the head's maps and the border store are removed
    with pytest.raises(ValueError, match="block_depth"):
        segment_volume_distributed("default", stack, tmp_path / "bad.zarr", client, block_depth=0)


def test_stacks_with_large_slices_are_tiled_on_dask_as_in_one_process(client, tmp_path, worker_threads):
    """Slices larger than the model's input with small nuclei (a 2x2 mosaic of the sample
    field) are tiled in the plane on Dask as segment_volume tiles them: the same labels."""
    from napari_tinysam.samples import nuclei_2d

    field = nuclei_2d()
    mosaic = np.block([[field, field[:, ::-1]], [field[::-1], field[::-1, ::-1]]])
    stack = np.stack([mosaic, np.roll(mosaic, 3, 1)])
    reference = segment_volume(load_model("default"), stack)
    calls = []
    out = segment_volume_distributed(
        "default", stack, tmp_path / "big.zarr", client, progress=lambda d, t: calls.append((d, t))
    )
    np.testing.assert_array_equal(np.asarray(out[...]), reference)
    assert reference.max() > 400 and calls[-1][0] == calls[-1][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.zarr"]  # every tile's store removed
    with pytest.raises(ValueError, match="tile_shape"):
        segment_volume_distributed("default", stack, tmp_path / "t.zarr", client, tile_shape=256)


def test_a_part_of_a_zarr_store_is_read_lazily(tmp_path):
    """A time point of a (T, Z, Y, X) store (or a TCZYX store's axes of one) is chosen
    without reading the store: the workers read the slices."""
    import dask.array as da
    import zarr

    from napari_tinysam.batch import read_input

    z = zarr.open_array(
        str(tmp_path / "t.zarr"), mode="w", shape=(2, 1, 4, 8, 8), chunks=(1, 1, 1, 8, 8), dtype="uint16"
    )
    z[1, 0, 2] = 7
    part = read_input(tmp_path / "t.zarr", (1,), lazy=True)
    assert isinstance(part, da.Array) and part.shape == (4, 8, 8)
    assert int(part[2].max().compute()) == 7
    with pytest.raises(ValueError, match="--index"):
        read_input(tmp_path / "t.zarr", lazy=True)


def test_block_plan_and_joining():
    assert plan_blocks(100, 32, 16) == [(0, 32, 0, 48), (32, 64, 16, 80), (64, 100, 48, 100)]
    assert plan_blocks(10, 32, 16) == [(0, 10, 0, 10)]
    assert plan_blocks(90, 32, 4) == [(0, 32, 0, 36), (32, 64, 28, 68), (64, 90, 60, 90)]
    assert plan_blocks(70, 32, 4) == [(0, 32, 0, 36), (32, 70, 28, 70)]  # a remainder under half a block joins
    # the two blocks' views of the slices around a border: object 1 below is 2 above
    # (one voxel differs), object 2 below has no partner, object 1 above is new
    below = np.zeros((2, 4, 4), np.int32)
    above = np.zeros((2, 4, 4), np.int32)
    below[:, :2, :2], above[:, :2, :2] = 1, 2
    above[0, 0, 0] = 0
    below[:, 3, 3] = 2
    above[:, 2:, :1] = 1
    assert border_matches(below, above) == [(1, 2)]
    # three blocks of 2, 2 and 1 objects: 1 of block 0 = 2 of block 1 = 1 of block 2
    luts = join_blocks([2, 2, 1], [[(1, 2)], [(2, 1)]])
    assert [lut.tolist() for lut in luts] == [[0, 1, 2], [0, 3, 1], [0, 1]]
    assert [lut.tolist() for lut in join_blocks([0, 1], [[]])] == [[0], [0, 1]]


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
    single = tmp_path / "single.zarr"
    assert main(["segment", str(tmp_path / "in.zarr"), "-o", str(single), *args, "--threads", "1"]) == 0
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"))[...], zarr.open_array(str(single))[...])
    assert (
        main(
            [
                "segment",
                str(tmp_path / "in.zarr"),
                "-o",
                str(tmp_path / "x.zarr"),
                "--scheduler",
                "tcp://127.0.0.1:9",
                *args,
            ]
        )
        == 2
    )
    assert "does not answer" in capsys.readouterr().err


def test_cli_dask_segments_stacks_in_3d_like_one_process(tmp_path, capsys):
    """`segment --workers` with the bundled model: the voxel size is used there too, and
    the labels are the one-process run's."""
    import zarr

    from napari_tinysam.cli import main
    from napari_tinysam.samples import nuclei_3d

    stack = nuclei_3d()[10:18]
    z = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=stack.shape, dtype=stack.dtype)
    z[...] = stack
    args = [str(tmp_path / "in.zarr"), "--scale", "1", "0.5", "0.5"]
    assert main(["segment", *args, "-o", str(tmp_path / "dask.zarr"), "--workers", "2", "--block-depth", "4"]) == 0
    assert "1 x 0.5 x 0.5" in capsys.readouterr().out
    # as many threads as each worker has (see worker_threads)
    assert main(["segment", *args, "-o", str(tmp_path / "one.zarr"), "--threads", "1"]) == 0
    one = zarr.open_array(str(tmp_path / "one.zarr"))[...]
    assert one.max() > 0
    assert same_objects(zarr.open_array(str(tmp_path / "dask.zarr"))[...], one)
    assert main(["segment", *args, "-o", str(tmp_path / "x.zarr"), "--block-depth", "4"]) == 2
    assert "--block-depth applies to runs on Dask" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()
