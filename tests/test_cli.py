"""The console script end to end on small files (a small random model keeps it fast)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_tinysam.cli import main
from napari_tinysam.io import read_image, write_labels
from napari_tinysam.model import save_checkpoint


@pytest.fixture
def model_file(tmp_path, tiny_model):
    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    d.mkdir()
    tifffile.imwrite(d / "a.tif", rng.integers(0, 4000, (40, 50), dtype=np.uint16))
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(d / "b.png")
    import zarr

    z = zarr.open_array(str(tmp_path / "stack.zarr"), mode="w", shape=(3, 32, 32), dtype="uint16")
    z[...] = rng.integers(0, 1000, (3, 32, 32), dtype=np.uint16)
    return tmp_path


ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def segment(*args) -> int:
    """``napari-tinysam segment`` with these arguments (paths as they are); its exit code."""
    return main(["segment", *map(str, args)])


def test_segment_folder_zarr_and_refusals(files, model_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert segment(files / "in", "-o", out, "--model", model_file, *ARGS) == 0
    a = read_image(out / "a_labels.tif")
    b = read_image(out / "b_labels.tif")
    assert a.shape == (40, 50) and b.shape == (30, 40) and a.dtype == np.int32
    assert "objects" in capsys.readouterr().out
    # never overwrite unless asked
    before = (out / "a_labels.tif").stat().st_mtime_ns
    assert segment(files / "in" / "a.tif", "-o", out / "a_labels.tif", "--model", model_file, *ARGS) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "a_labels.tif").stat().st_mtime_ns == before
    assert segment(files / "in" / "a.tif", "-o", out / "a_labels.tif", "--model", model_file, "--overwrite", *ARGS) == 0
    # 3D Zarr in, Zarr out
    assert segment(files / "stack.zarr", "-o", out / "stack_labels.zarr", "--model", model_file, *ARGS) == 0
    assert read_image(out / "stack_labels.zarr").shape == (3, 32, 32)
    # a voxel size for stacks (a 2D image in the same run goes on without it)
    # (a new output folder is made, as mkdir makes one: its parent exists)
    assert (
        segment(
            files / "stack.zarr",
            files / "in" / "a.tif",
            "-o",
            out / "scaled",
            "--model",
            model_file,
            "--scale",
            "0.5",
            "0.1",
            "0.1",
            *ARGS,
        )
        == 0
    )
    assert read_image(out / "scaled" / "stack_labels.tif").shape == (3, 32, 32)
    assert (
        segment(files / "stack.zarr", "-o", out / "s.zarr", "--model", model_file, "--scale", "0", "1", "1", *ARGS) == 2
    )
    assert "voxel size" in capsys.readouterr().err and not (out / "s.zarr").exists()
    # bad input: clear messages, exit code 2
    (files / "notes.txt").write_text("x")
    assert segment(files / "notes.txt", "-o", out, "--model", model_file) == 2
    assert "unsupported file type" in capsys.readouterr().err
    assert (
        segment(files / "in" / "a.tif", "-o", tmp_path / "new" / "x.tif", "--model", model_file, *ARGS) == 0
    )  # a new folder in an existing one is made
    assert (tmp_path / "new" / "x.tif").is_file()
    capsys.readouterr()
    assert segment(files / "in" / "a.tif", "-o", tmp_path / "no" / "such" / "x.tif", "--model", model_file) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert (
        segment(
            files / "in" / "a.tif",
            files / "in" / "b.png",
            "-o",
            tmp_path / "no" / "such",
            "--model",
            model_file,
        )
        == 2
    )
    assert "cannot be made" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert (
        segment(
            files / "in" / "a.tif",
            files / "in" / "b.png",
            "-o",
            files / "notes.txt",
            "--model",
            model_file,
        )
        == 2
    )
    assert "it is a file, not a folder" in capsys.readouterr().err
    assert segment(files / "in" / "a.tif", "-o", out / "a.png", "--model", model_file) == 2
    assert "cannot write labels to" in capsys.readouterr().err and not (out / "a.png").exists()
    np.save(files / "t.npy", np.zeros((2, 2, 8, 8), np.uint16))
    assert segment(files / "t.npy", "-o", out / "t.npy", "--model", model_file, *ARGS) == 2
    assert "--index" in capsys.readouterr().err
    assert segment(files / "t.npy", "-o", out / "t.npy", "--model", model_file, "--index", "0", *ARGS) == 0
    # axes of one element need no --index: an OME file's T and C, a trailing channel
    np.save(files / "tczyx.npy", np.zeros((1, 1, 3, 8, 8), np.uint16))
    np.save(files / "yxc.npy", np.zeros((8, 9, 1), np.uint16))
    assert segment(files / "tczyx.npy", files / "yxc.npy", "-o", out / "squeezed", "--model", model_file, *ARGS) == 0
    assert read_image(out / "squeezed" / "tczyx_labels.tif").shape == (3, 8, 8)
    assert read_image(out / "squeezed" / "yxc_labels.tif").shape == (8, 9)
    # auto mode needs an instance head: the message names the modes this model supports
    assert segment(files / "in" / "a.tif", "-o", out / "auto.tif", "--model", model_file, "--mode", "auto") == 2
    assert "'hierarchical'" in capsys.readouterr().err and not (out / "auto.tif").exists()
    # tiles on request; a halo alone is refused
    assert (
        segment(
            files / "in" / "a.tif",
            "-o",
            out / "tiled.tif",
            "--model",
            model_file,
            "--tile-shape",
            "32",
            "32",
            "--halo",
            "8",
            "8",
            *ARGS,
        )
        == 0
    )
    assert read_image(out / "tiled.tif").shape == (40, 50)
    assert (
        segment(files / "in" / "a.tif", "-o", out / "halo.tif", "--model", model_file, "--halo", "8", "8", *ARGS) == 2
    )
    assert "--tile-shape" in capsys.readouterr().err and not (out / "halo.tif").exists()


def test_segment_goes_on_past_an_unreadable_input(files, model_file, tmp_path, capsys):
    """A corrupt file among many is skipped with its reason; the others are written and
    the run fails at the end. A new output folder that gets nothing is removed again."""
    (files / "in" / "0_broken.tif").write_bytes(b"not a tiff")
    out = tmp_path / "new"
    assert segment(files / "in", "-o", out, "--model", model_file, *ARGS) == 2
    err = capsys.readouterr().err
    assert "skipped: cannot read" in err and "0_broken.tif" in err
    assert "1 of 3 inputs could not be segmented (the others were written)" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.tif", "b_labels.tif"]
    assert read_image(out / "a_labels.tif").shape == (40, 50)
    # nothing readable: nothing written, and the folder the run made is gone
    assert segment(files / "in" / "0_broken.tif", "-o", tmp_path / "none", "--model", model_file, *ARGS) == 2
    assert "nothing was written" in capsys.readouterr().err and not (tmp_path / "none").exists()
    # a run that fails before any input (a model that does not load) leaves no folder either
    assert segment(files / "in" / "a.tif", "-o", tmp_path / "none", "--model", files / "in" / "a.tif") == 2
    assert not (tmp_path / "none").exists()
    # arguments are all checked before a folder is made
    assert segment(files / "in" / "a.tif", "-o", tmp_path / "none", "--workers", "1", "--model", model_file) == 2
    assert ".zarr" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_voxel_size_read_from_imagej_and_ome_files(tmp_path):
    import zarr

    from napari_tinysam.io import read_voxel_size

    stack = np.zeros((4, 16, 16), np.uint8)
    tifffile.imwrite(
        tmp_path / "ij.tif",
        stack,
        imagej=True,
        resolution=(10, 10),
        metadata={"spacing": 0.5, "unit": "um", "axes": "ZYX"},
    )
    assert read_voxel_size(tmp_path / "ij.tif") == pytest.approx((0.5, 0.1, 0.1))
    tifffile.imwrite(
        tmp_path / "a.ome.tif",
        stack,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.2, "PhysicalSizeZ": 0.7},
    )
    assert read_voxel_size(tmp_path / "a.ome.tif") == pytest.approx((0.7, 0.2, 0.1))
    tifffile.imwrite(
        tmp_path / "nm.ome.tif",
        stack,
        ome=True,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeX": 100,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 100,
            "PhysicalSizeYUnit": "nm",
            "PhysicalSizeZ": 0.5,
            "PhysicalSizeZUnit": "µm",
        },
    )
    assert read_voxel_size(tmp_path / "nm.ome.tif") == pytest.approx((0.5, 0.1, 0.1))  # one unit
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    group.create_array("0", shape=stack.shape, dtype="uint8")[...] = stack
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": n} for n in "zyx"],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 0.3, 0.3]}]}],
        }
    ]
    assert read_voxel_size(tmp_path / "a.zarr") == pytest.approx((2.0, 0.3, 0.3))
    # nothing recorded, only the pixel size, or a spacing of 0: no voxel size
    tifffile.imwrite(tmp_path / "plain.tif", stack)
    tifffile.imwrite(tmp_path / "flat.tif", stack, imagej=True, resolution=(10, 10))
    tifffile.imwrite(tmp_path / "zero.tif", stack, imagej=True, resolution=(10, 10), metadata={"spacing": 0.0})
    np.save(tmp_path / "a.npy", stack)
    for name in ("plain.tif", "flat.tif", "zero.tif", "a.npy", "missing.tif"):
        assert read_voxel_size(tmp_path / name) is None


def test_segment_uses_the_voxel_size_a_stack_records(files, model_file, tmp_path, capsys):
    stack = np.random.default_rng(0).integers(0, 1000, (3, 32, 32), dtype=np.uint16)
    tifffile.imwrite(files / "ij.tif", stack, imagej=True, resolution=(10, 10), metadata={"spacing": 0.5})
    out = tmp_path / "ij_labels.tif"
    assert segment(files / "ij.tif", "-o", out, "--model", model_file, *ARGS) == 0
    assert "0.5 x 0.1 x 0.1" in capsys.readouterr().out and read_image(out).shape == (3, 32, 32)
    assert (
        segment(files / "ij.tif", "-o", out, "--model", model_file, "--overwrite", "--scale", "2", "1", "1", *ARGS) == 0
    )
    assert "2 x 1 x 1" in capsys.readouterr().out


def test_write_labels_is_atomic(tmp_path):
    write_labels(tmp_path / "x.tif", np.ones((4, 4)))
    with pytest.raises(FileExistsError):
        write_labels(tmp_path / "x.tif", np.zeros((4, 4)))
    assert read_image(tmp_path / "x.tif").max() == 1
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_label_stacks_are_written_as_grey_slices(tmp_path, depth):
    """A stack of 3 or 4 slices is one grey page per slice, not an RGB(A) image (as other
    programs would open it)."""
    labels = np.arange(depth * 6 * 7, dtype=np.int32).reshape(depth, 6, 7)
    write_labels(tmp_path / "s.tif", labels)
    with tifffile.TiffFile(tmp_path / "s.tif") as tif:
        assert len(tif.pages) == depth and tif.series[0].axes == "ZYX"
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
    np.testing.assert_array_equal(read_image(tmp_path / "s.tif"), labels)


def test_models_list_and_path(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "tinysam" in out and "sam_vit_h" in out
    assert main(["models", "path", "tinysam"]) == 0
    assert capsys.readouterr().out.strip().endswith("tinysam_42.3.pth")


def test_embed_store_created_reused_and_refused(files, model_file, tmp_path, capsys):
    store = str(tmp_path / "emb.zarr")
    assert main(["embed", str(files / "stack.zarr"), "-o", store, "--model", model_file]) == 0
    assert "3 computed now" in capsys.readouterr().out
    assert main(["embed", str(files / "stack.zarr"), "-o", store, "--model", model_file]) == 0
    assert "0 computed now, 3 reused" in capsys.readouterr().out
    assert (
        main(["embed", str(files / "stack.zarr"), "-o", store, "--model", model_file, "--contrast-limits", "0", "5"])
        == 2
    )
    assert "does not match" in capsys.readouterr().err
    # a store of the slices as the annotator shows them is not one of the slices as acquired
    assert main(["embed", str(files / "stack.zarr"), "-o", store, "--model", model_file, "--no-smooth"]) == 2
    assert "smooth differ" in capsys.readouterr().err


def test_quantize_writes_a_loadable_int8_checkpoint(tmp_path, model_file, blobs_image, capsys):
    from napari_tinysam import load_model

    image, labels = blobs_image
    (tmp_path / "cal" / "images").mkdir(parents=True)
    (tmp_path / "cal" / "labels").mkdir()
    tifffile.imwrite(tmp_path / "cal" / "images" / "f.tif", image)
    tifffile.imwrite(tmp_path / "cal" / "labels" / "f.tif", labels)
    out = tmp_path / "tiny-int8.pt"
    args = ["quantize", model_file, str(tmp_path / "cal" / "images"), "-o", str(out), "--prompts", "4"]
    assert main(args) == 0
    assert "W8A8" in capsys.readouterr().out
    q = load_model(out)
    assert q.quantization["distance"] == "l2" and q.meta["calibration"] == ["f"]
    assert main(args) == 2  # exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["quantize", str(out), str(tmp_path / "cal" / "images"), "-o", str(tmp_path / "x.pt")]) == 2
    assert "already quantized" in capsys.readouterr().err
