"""Embedding stores: reuse, refusal, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_tinysam import SamPredictor
from napari_tinysam.embedding_store import EmbeddingStore, StoreMismatch


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
    fresh.set_image(stack[2], contrast_limits=again.contrast_limits)
    assert torch.allclose(fresh.get_image_embedding(), p.get_image_embedding(), atol=1e-5)
    assert p.encoder_calls == 0 and masks.shape == (3, 40, 48)


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
