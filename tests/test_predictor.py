"""SamPredictor: input conversion, caching and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from napari_tinysam import EmbeddingCache, SamPredictor
from napari_tinysam.predictor import preprocess_shape, to_uint8_rgb


def test_preprocess_shape_matches_reference_rounding():
    assert preprocess_shape(520, 696, 1024) == (765, 1024)
    assert preprocess_shape(256, 256, 1024) == (1024, 1024)
    assert preprocess_shape(61, 57, 512) == (512, 478)


def test_to_uint8_rgb_scaling():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    assert to_uint8_rgb(rgb) is not None and np.array_equal(to_uint8_rgb(rgb), rgb)
    img = np.linspace(0, 4095, 100, dtype=np.float32).reshape(10, 10).astype(np.uint16)
    out = to_uint8_rgb(img, contrast_limits=(0, 4095))
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert (out[..., 0] == out[..., 2]).all()
    # values outside the limits are clipped
    out = to_uint8_rgb(img, contrast_limits=(1000, 2000))
    assert out.min() == 0 and out.max() == 255
    # percentiles by default
    spiky = np.zeros((50, 50), np.float64)
    spiky[0, 0] = 1e9
    spiky[10:20, 10:20] = 5.0
    assert to_uint8_rgb(spiky)[15, 15, 0] == 255


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((2, 3, 4, 5)), "2D .* or RGB"),
        (np.zeros((1, 1)), "too small"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.array([["a", "b"], ["c", "d"]]), "real numeric dtype"),
    ],
)
def test_bad_images(tiny_model, image, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SamPredictor(tiny_model).set_image(image)


def test_predict_before_set_image(tiny_model):
    with pytest.raises(RuntimeError, match="set_image"):
        SamPredictor(tiny_model).predict(np.array([[1, 1]]), np.array([1]))


def test_bad_prompts(tiny_model, blobs_image):
    image, _ = blobs_image
    p = SamPredictor(tiny_model)
    p.set_image(image)
    with pytest.raises(ValueError, match="no prompt"):
        p.predict()
    with pytest.raises(ValueError, match="together"):
        p.predict(point_coords=np.array([[3, 3]]))
    with pytest.raises(ValueError, match="one label per point"):
        p.predict(np.array([[3, 3], [4, 4]]), np.array([1]))
    with pytest.raises(ValueError, match="1 \\(positive\\), 0"):
        p.predict(np.array([[3, 3]]), np.array([2]))
    with pytest.raises(ValueError, match="outside"):
        p.predict(np.array([[500, 3]]), np.array([1]))
    with pytest.raises(ValueError, match="outside"):
        p.predict(np.array([[-0.6, 3]]), np.array([1]))
    masks, _, _ = p.predict(np.array([[-0.4, -0.4]]), np.array([1]))  # the corner pixel's outer half
    assert masks.shape == (3, 96, 128)
    with pytest.raises(ValueError, match="x0 <= x1"):
        p.predict(box=np.array([50, 10, 20, 40]))
    with pytest.raises(ValueError, match="lies outside"):
        p.predict(box=np.array([500, 500, 600, 600]))
    with pytest.warns(UserWarning, match="clipped"):
        masks, iou, low = p.predict(box=np.array([-5, 10, 40, 40]))
    assert masks.shape == (3, 96, 128)
    with pytest.raises(ValueError, match="mask_input"):
        p.predict(np.array([[3, 3]]), np.array([1]), mask_input=np.zeros((1, 10, 10)))


def test_outputs_and_single_mask(tiny_model, blobs_image):
    image, _ = blobs_image
    p = SamPredictor(tiny_model)
    p.set_image(image)
    masks, iou, low = p.predict(np.array([[20, 20]]), np.array([1]))
    assert masks.shape == (3, 96, 128) and masks.dtype == bool
    assert iou.shape == (3,) and low.shape == (3, 64, 64)
    logits, _, _ = p.predict(np.array([[20, 20]]), np.array([1]), multimask_output=False, return_logits=True)
    assert logits.shape == (1, 96, 128) and logits.dtype == np.float32
    # feeding back low-res logits as mask input works
    again, _, _ = p.predict(np.array([[20, 20]]), np.array([1]), mask_input=low[:1])
    assert again.shape == (3, 96, 128)


def test_embedding_cache_reuses_and_bounds(tiny_model, blobs_image):
    image, _ = blobs_image
    cache = EmbeddingCache(max_bytes=10 * 2**20)
    p = SamPredictor(tiny_model, cache=cache)
    p.set_image(image)
    p.set_image(image * 2)  # same picture after percentile scaling: cache hit
    assert p.encoder_calls == 1
    p.set_image(image[::-1].copy())
    p.set_image(image)  # seen before: no encoder pass
    assert p.encoder_calls == 2
    one = cache.nbytes // len(cache)
    cache.set_max_bytes(one)
    assert len(cache) == 1
    # different contrast limits are a different image for the model
    p.set_image(image, contrast_limits=(0, 10000))
    assert p.encoder_calls == 3


def test_max_upscale_caps_how_far_small_images_are_enlarged(tiny_model):
    from napari_tinysam.predictor import compute_embedding

    assert preprocess_shape(61, 57, 768) == (768, 718)  # SAM's rule: longest side -> input
    assert preprocess_shape(61, 57, 768, max_upscale=4.0) == (244, 228)
    assert preprocess_shape(520, 696, 768, max_upscale=4.0) == preprocess_shape(520, 696, 768)
    assert tiny_model.max_upscale is None  # no meta: official behaviour
    tiny_model.meta = {"max_upscale": 2.0}
    try:
        emb = compute_embedding(tiny_model, np.zeros((40, 30, 3), np.uint8))
        assert emb.input_size == (80, 60) and emb.original_size == (40, 30)
        pred = SamPredictor(tiny_model)
        pred.set_image(np.zeros((40, 30), np.uint16))
        masks, _, _ = pred.predict(point_coords=[[10, 20]], point_labels=[1])
        assert masks.shape == (3, 40, 30)
    finally:
        del tiny_model.meta


def test_embeddings_are_computed_without_autograd(tiny_model, blobs_image):
    """``set_image`` runs the encoder as inference (no autograd), whatever the caller's
    mode: the in-place activations and the compiled encoder apply, and nothing is recorded."""
    import torch

    seen = []
    hook = tiny_model.image_encoder.register_forward_pre_hook(lambda *a: seen.append(torch.is_grad_enabled()))
    try:
        with torch.enable_grad():
            SamPredictor(tiny_model).set_image(blobs_image[0])
    finally:
        hook.remove()
    assert seen == [False]
