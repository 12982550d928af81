"""Model registry, cache directory and the bundled default model.

``load_model(name_or_path)`` takes a registry name or a checkpoint path. The bundled
``default`` model ships inside the package; the official weights are looked up in the
cache directory (``TINYSAM_CACHE_DIR`` or the platform's user cache folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import CheckpointError, Sam, sam_from_checkpoint
from .model.sam import compile_requested

BUNDLED_DIR = Path(__file__).parent / "weights"
CACHE_ENV = "TINYSAM_CACHE_DIR"


@dataclass(frozen=True)
class ModelInfo:
    """One registry entry. ``hash`` is ``"xxh128:..."`` where a public registry
    publishes one (None otherwise); ``bundled`` entries ship inside the package."""

    name: str
    filename: str
    description: str
    url: str | None = None
    hash: str | None = None
    size: int | None = None
    bundled: bool = False


REGISTRY: dict[str, ModelInfo] = {
    m.name: m
    for m in [
        ModelInfo(
            "default",
            "default.pt",
            "TinySAM (vit_t) at 768 px, trained on BBBC039 fluorescent nuclei, with an instance head (auto everything mode); bundled",
            bundled=True,
        ),
        ModelInfo(
            "default-int8",
            "default-int8.pt",
            "the default model, instance head included, quantized to 8 bits (W8A8, int8 CPU kernels); bundled",
            bundled=True,
        ),
        ModelInfo(
            "tinysam",
            "tinysam_42.3.pth",
            "official TinySAM, COCO AP 42.3 (vit_t)",
            url="https://github.com/xinghaochen/TinySAM/releases/download/3.0/tinysam_42.3.pth",
        ),
        ModelInfo(
            "tinysam-v1",
            "tinysam.pth",
            "official TinySAM, first release (vit_t)",
            url="https://github.com/xinghaochen/TinySAM/releases/download/1.0/tinysam.pth",
        ),
        ModelInfo(
            "mobilesam",
            "mobile_sam.pt",
            "MobileSAM (vit_t)",
            url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            hash="xxh128:8eadbc88aeb9d8c7e0b4b60c3db48bd0",
        ),
        ModelInfo(
            "sam_vit_b",
            "sam_vit_b_01ec64.pth",
            "Segment Anything ViT-B",
            url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            hash="xxh128:6923c33df3637b6a922d7682bfc9a86b",
        ),
        ModelInfo(
            "sam_vit_l",
            "sam_vit_l_0b3195.pth",
            "Segment Anything ViT-L",
            url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
            hash="xxh128:a82beb3c660661e3dd38d999cc860e9a",
        ),
        ModelInfo(
            "sam_vit_h",
            "sam_vit_h_4b8939.pth",
            "Segment Anything ViT-H",
            url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            hash="xxh128:97698fac30bd929c2e6d8d8cc15933c2",
        ),
    ]
}


def cache_dir() -> Path:
    """Folder for downloaded weights: ``$TINYSAM_CACHE_DIR`` or the user cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-tinysam")) / "weights"


def model_path(name: str) -> Path:
    """Where the file of a registry model lives (bundled folder or cache folder)."""
    info = REGISTRY.get(name)
    if info is None:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    return (BUNDLED_DIR if info.bundled else cache_dir()) / info.filename


def missing_weights_message(name: str) -> str:
    info = REGISTRY[name]
    path = model_path(name)
    return (
        f"the weights of {name!r} ({info.description}) are not on this machine. Run "
        f"`napari-tinysam models download {name}`, or download {info.url} and place the "
        f"file at {path} (folder: {path.parent}; set {CACHE_ENV} to use another folder)."
    )


def file_hash(path: str | os.PathLike) -> str:
    """``xxh128:<hex>`` of a file (the format of pooch and micro-sam registries)."""
    import xxhash

    h = xxhash.xxh128()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return f"xxh128:{h.hexdigest()}"


def _recorded_hash_path(path: Path) -> Path:
    return path.with_name(path.name + ".xxh128")


def download_model(name: str, url: str | None = None, progress: bool = True) -> Path:
    """Download a registry model into the cache folder and return its path.

    The transfer goes to a temporary file that is moved into place only when complete
    and verified, so a partial file is never used: against the published hash where one
    exists; otherwise (TinySAM releases publish none) by a strict load of the weights,
    after which the file's hash is recorded next to it and checked on later downloads.
    Without network access the error names the file and the folder to place it in.
    """
    import pooch

    info = REGISTRY.get(name)
    if info is None:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    if info.bundled:
        return model_path(name)
    path = model_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    recorded = _recorded_hash_path(path)
    known = info.hash or (recorded.read_text().strip() if recorded.is_file() else None)
    tmp_name = f".{info.filename}.download"
    try:
        got = pooch.retrieve(url or info.url, known_hash=known, fname=tmp_name, path=path.parent, progressbar=progress)
    except ValueError as exc:  # hash mismatch: pooch has already deleted the file
        raise CheckpointError(f"download of {name!r} failed verification: {exc}") from exc
    except Exception as exc:  # network errors of any kind
        raise CheckpointError(f"download of {name!r} failed ({exc}); {missing_weights_message(name)}") from exc
    got = Path(got)
    if known is None:
        try:
            sam_from_checkpoint(got)  # strict: every key and shape must match
        except CheckpointError:
            got.unlink(missing_ok=True)
            raise
        recorded.write_text(file_hash(got) + "\n")
    os.replace(got, path)
    return path


def load_model(
    name_or_path: str | os.PathLike = "default",
    device: str | torch.device = "cpu",
    precision: str = "auto",
    compile: bool | None = None,
) -> Sam:
    """Load a model by registry name (``default``, ``tinysam``, ``tinysam-v1``,
    ``mobilesam``, ``sam_vit_b/l/h``) or from a checkpoint path.

    Official raw state dicts and the project's checkpoint format both load; the
    architecture is inferred from the weights, which are read with
    ``torch.load(weights_only=True)`` (no arbitrary objects are unpickled).
    The model is returned in eval mode on ``device``, running at ``precision``:
    ``"auto"`` (bfloat16 where the hardware runs it natively, else float32), ``"fp32"``,
    ``"bf16"`` or ``"fp16"`` (CUDA). Int8 models run their integer kernels; for them
    ``"auto"`` means float32 for the parts that stay float.

    ``compile=True`` runs the image encoder through ``torch.compile`` (see
    :meth:`Sam.set_compiled`: the first embedding compiles, later ones are faster); None
    reads the environment variable ``TINYSAM_COMPILE``.
    """
    key = str(name_or_path)
    if key in REGISTRY:
        path = model_path(key)
        if not path.is_file():
            if REGISTRY[key].bundled:
                raise CheckpointError(f"the bundled model file {path} is missing: reinstall napari-tinysam")
            raise CheckpointError(missing_weights_message(key))
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"{name_or_path!r} is neither a registry name ({', '.join(REGISTRY)}) nor an existing checkpoint file"
            )
    model = sam_from_checkpoint(path, device=device)
    model.name = key if key in REGISTRY else str(path)
    model.set_precision(precision)
    if compile is None:  # the environment's choice, which int8 models ignore
        compile = compile_requested() and not getattr(model, "quantization", None)
    if compile:
        model.set_compiled(True)
    return model
