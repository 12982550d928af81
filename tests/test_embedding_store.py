"""Embedding stores: reuse, refusal, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_tinysam import SamPredictor
from napari_tinysam.annotate import slice_rgb
from napari_tinysam.embedding_store import EmbeddingStore, StoreMismatch
from napari_tinysam.predictor import to_uint8_rgb


@pytest.fixture
def stack():
    rng = np.random.default_rng(0)
    return rng.integers(0, 3000, (4, 40, 48), dtype=np.uint16)


def test_store_reuse_matches_fresh_embeddings(tmp_path, tiny_model, stack):
    store = EmbeddingStore.open(tmp_path / "s.zarr", tiny_model, stack, create=True)
    assert store.compute(tiny_model, stack) == 4
    again = EmbeddingStore.open(tmp_path / "s.zarr", tiny_model, stack)
    assert again.compute(tiny_model, stack) == 0  # nothing recomputed
    p = SamPredictor(tiny_model)
    p.set_embedding(again.get(2))
    masks, _, _ = p.predict(np.array([[10, 10]]), np.array([1]))
    fresh = SamPredictor(tiny_model)
    fresh.set_image(
        slice_rgb(stack[2], again.contrast_limits, smooth_for=tiny_model)
    )  # what the annotator shows the model
    assert torch.allclose(fresh.get_image_embedding(), p.get_image_embedding(), atol=1e-5)
    assert p.encoder_calls == 0 and masks.shape == (3, 40, 48)


def test_a_store_records_whether_noisy_slices_were_smoothed(tmp_path, tiny_model, stack):
    """The stack is pure noise: by default its slices are stored smoothed, as the annotator
    shows them; a store of the slices as acquired is taken when either is acceptable and
    refused, with the reason, when the smoothed ones are asked for."""
    smoothed = EmbeddingStore.open(tmp_path / "a.zarr", tiny_model, stack, create=True)
    assert smoothed.smooth and not np.array_equal(
        smoothed.slice_rgb(tiny_model, stack, 1), to_uint8_rgb(stack[1], smoothed.contrast_limits)
    )
    raw = EmbeddingStore.open(tmp_path / "b.zarr", tiny_model, stack, create=True, smooth=False)
    assert np.array_equal(raw.slice_rgb(tiny_model, stack, 1), to_uint8_rgb(stack[1], raw.contrast_limits))
    assert not EmbeddingStore.open(tmp_path / "b.zarr", tiny_model, stack).smooth
    with pytest.raises(StoreMismatch, match="smooth"):
        EmbeddingStore.open(tmp_path / "b.zarr", tiny_model, stack, smooth=True)
    with pytest.raises(StoreMismatch, match="smooth"):
        EmbeddingStore.open(tmp_path / "a.zarr", tiny_model, stack, smooth=False)


def test_store_refuses_mismatch(tmp_path, tiny_model, stack):
    EmbeddingStore.open(tmp_path / "s.zarr", tiny_model, stack, create=True)
    other = stack.copy()
    other[0, 0, 0] += 1
    with pytest.raises(StoreMismatch, match="data"):
        EmbeddingStore.open(tmp_path / "s.zarr", tiny_model, other)
    with pytest.raises(StoreMismatch, match="contrast_limits"):
        EmbeddingStore.open(tmp_path / "s.zarr", tiny_model, stack, contrast_limits=(0, 10))
    with pytest.raises(FileNotFoundError):
        EmbeddingStore.open(tmp_path / "missing.zarr", tiny_model, stack)


def test_interrupted_embed_resumes(tmp_path, tiny_model, stack):
    store = EmbeddingStore.open(tmp_path / "s.zarr", tiny_model, stack, create=True)
    calls = []
    store.compute(tiny_model, stack, progress=lambda d, t: calls.append(d), cancel=lambda: len(calls) >= 2)
    assert store.done.tolist() == [True, True, False, False]
    with pytest.raises(KeyError, match="not in the embedding store"):
        store.get(3)
    resumed = EmbeddingStore.open(tmp_path / "s.zarr", tiny_model, stack)
    assert resumed.compute(tiny_model, stack) == 2 and resumed.done.all()


def test_a_walk_at_a_smaller_scale_does_not_take_the_stores_embeddings(tmp_path):
    """A store holds each slice embedded at the model's own scale. The decoder's walk
    through small slices may run at a smaller scale (its seed more confident there); those
    resized slices must not be given the store's embeddings, or the prompts and the
    embedding disagree: with a store the walk gives what it gives without one."""
    from napari_tinysam import load_model, samples
    from napari_tinysam.annotate import Prompts
    from napari_tinysam.embedding_store import EmbeddingStore
    from napari_tinysam.everything import volume_contrast_limits
    from napari_tinysam.predictor import EmbeddingCache, image_key
    from napari_tinysam.propagate import _Walker, iter_propagation

    model = load_model("default")
    stack = samples.nuclei_3d()[:10]
    limits = volume_contrast_limits(stack)
    store = EmbeddingStore.open(tmp_path / "s.zarr", model, stack, contrast_limits=limits, create=True)
    store.compute(model, stack)
    z, x, y = 4, 16.0, 7.0  # the innermost point of a nucleus on its largest slice
    prompts = {z: Prompts(np.array([[x, y]]), np.array([1]), np.array([x - 6, y - 6, x + 6, y + 6]))}

    def walk(with_store: bool):
        cache = EmbeddingCache(2**30)
        predictor = SamPredictor(model, cache=cache)

        def from_store(zz, rgb):  # as the annotator does with an open store
            cache.put(image_key(model, rgb), store.get(zz))

        walker = _Walker(predictor, stack, limits, from_store if with_store else None)
        out = {r.z: r.mask for r in iter_propagation(predictor, stack, prompts, contrast_limits=limits, walker=walker)}
        return walker.factor, out

    factor, plain = walk(False)
    _, stored = walk(True)
    assert factor < 1.0  # this seed is walked at a smaller scale
    assert plain.keys() == stored.keys() and all(np.array_equal(plain[k], stored[k]) for k in plain)
