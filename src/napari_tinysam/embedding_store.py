"""Precomputed image embeddings of every slice of a stack, in a chunked Zarr store.

The store carries a signature (data hash, model hash, input size, contrast limits,
whether noisy slices were smoothed, format version). A store is reused only when its
signature matches the data, model and contrast settings at hand; otherwise it is refused
with a message that says what differs. By default each slice is stored as the annotator
shows it to the model (:func:`~napari_tinysam.annotate.slice_rgb` with ``smooth_for``: a
noisy slice smoothed, a clean one as it is); the annotator compares the image it would
embed with :meth:`EmbeddingStore.slice_rgb` before it takes a slice's embedding. The
precision a slice was embedded at is not part of the signature: bfloat16 and float32
embeddings agree to 0.3% (docs/benchmarks.md), so one store serves both. Slices are
written one chunk at a time and marked done afterwards, so an interrupted ``embed``
resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .annotate import slice_rgb
from .everything import check_volume, volume_contrast_limits
from .model import Sam, StoreMismatch, model_fingerprint
from .predictor import ImageEmbedding, compute_embedding, preprocess_shape

STORE_FORMAT = 1


def data_hash(stack: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str((stack.shape, str(stack.dtype))).encode())
    for z in range(stack.shape[0]):
        h.update(np.ascontiguousarray(stack[z]).data)
    return h.hexdigest()


class EmbeddingStore:
    """Embeddings (Z, 256, g, g) of a (Z, H, W) or (Z, H, W, 3) stack under one model."""

    def __init__(self, path: str | os.PathLike, group, signature: dict) -> None:
        self.path = Path(path)
        self.group = group
        self.signature = signature

    @staticmethod
    def signature_for(model: Sam, stack: np.ndarray, contrast_limits, smooth: bool = False) -> dict:
        sig = {
            "format": STORE_FORMAT,
            "data": data_hash(stack),
            "shape": list(stack.shape),
            "model": model_fingerprint(model),
            "img_size": model.img_size,
            "contrast_limits": [float(v) for v in contrast_limits],
        }
        if model.max_upscale is not None:
            sig["max_upscale"] = model.max_upscale
        if smooth:  # absent from the stores of slices as acquired
            sig["smooth"] = True
        return sig

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        model: Sam,
        stack: np.ndarray,
        contrast_limits: tuple[float, float] | None = None,
        create: bool = False,
        smooth: bool | None = None,
    ) -> EmbeddingStore:
        """Open (or with ``create``, create) the store of ``stack`` under ``model``.

        ``smooth``: whether noisy slices are smoothed before they are embedded (see
        :meth:`slice_rgb`); ``None`` takes an existing store either way and creates one
        that smooths (as the annotator does by default).

        Raises ``StoreMismatch`` when an existing store was made for something else and
        ``FileNotFoundError`` when it does not exist and ``create`` is False.
        """
        import zarr

        check_volume(stack)
        limits = tuple(contrast_limits) if contrast_limits is not None else volume_contrast_limits(stack)
        path = Path(path)
        if path.exists():
            group = zarr.open_group(str(path), mode="r+")
            stored = dict(group.attrs.get("signature", {}))
            sig = cls.signature_for(model, stack, limits, stored.get("smooth", False) if smooth is None else smooth)
            if stored != sig:
                diff = sorted(k for k in {*sig, *stored} if stored.get(k) != sig.get(k))
                raise StoreMismatch(
                    f"embedding store {path} does not match ({', '.join(diff) or 'unknown format'} "
                    "differ); recompute it with `napari-tinysam embed` or choose another store"
                )
            return cls(path, group, sig)
        if not create:
            raise FileNotFoundError(f"no embedding store at {path}")
        sig = cls.signature_for(model, stack, limits, True if smooth is None else smooth)
        z = stack.shape[0]
        grid = model.img_size // 16
        group = zarr.open_group(str(path), mode="w")
        group.create_array("features", shape=(z, 256, grid, grid), chunks=(1, 256, grid, grid), dtype="float32")
        group.create_array("done", shape=(z,), chunks=(z,), dtype="bool", fill_value=False)
        group.attrs["signature"] = sig
        return cls(path, group, sig)

    @property
    def contrast_limits(self) -> tuple[float, float]:
        lo, hi = self.signature["contrast_limits"]
        return lo, hi

    @property
    def smooth(self) -> bool:
        """Whether noisy slices were smoothed before they were embedded."""
        return bool(self.signature.get("smooth", False))

    def slice_rgb(self, model: Sam, stack: np.ndarray, z: int) -> np.ndarray:
        """The uint8 RGB image of slice ``z`` whose embedding the store holds (``model``: the
        store's model)."""
        return slice_rgb(np.asarray(stack[z]), self.contrast_limits, model if self.smooth else None)

    @property
    def done(self) -> np.ndarray:
        return np.asarray(self.group["done"][...])

    def compute(
        self,
        model: Sam,
        stack: np.ndarray,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> int:
        """Embed the slices not yet stored; returns how many were computed."""
        done = self.done
        n = 0
        for z in np.flatnonzero(~done):
            if cancel is not None and cancel():
                break
            rgb = self.slice_rgb(model, stack, int(z))
            with torch.no_grad():
                emb = compute_embedding(model, rgb)
            self.group["features"][z] = emb.features[0].numpy()
            self.group["done"][z] = True  # after the chunk is written
            n += 1
            if progress is not None:
                progress(int(z) + 1, len(done))
        return n

    def get(self, z: int) -> ImageEmbedding:
        """The embedding of slice ``z`` (raises if it was never computed)."""
        if not bool(self.group["done"][z]):
            raise KeyError(f"slice {z} is not in the embedding store yet; run `napari-tinysam embed` again")
        h, w = self.signature["shape"][1:3]
        features = torch.from_numpy(np.asarray(self.group["features"][z]))[None]
        return ImageEmbedding(
            features, (h, w), preprocess_shape(h, w, self.signature["img_size"], self.signature.get("max_upscale"))
        )
