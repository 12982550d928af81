"""Inference options: precision (the "auto" choice, explicit values, bfloat16 agreement with
float32, the channels-last upscaling path of the decoder) and the compiled encoder."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from napari_tinysam import SamPredictor, load_model, samples
from napari_tinysam import precision as prec
from napari_tinysam.model.common import LayerNorm2d


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.delenv(prec.ENV_VAR, raising=False)
    monkeypatch.setattr(prec, "native_bf16", lambda device="cpu": True)
    assert prec.resolve_precision("auto") == "bf16"
    assert prec.resolve_precision(None) == "bf16"
    monkeypatch.setattr(prec, "native_bf16", lambda device="cpu": False)
    assert prec.resolve_precision("auto") == "fp32"
    # explicit values are honoured whatever the hardware; emulated bfloat16 is slow, and
    # the user is told so
    with pytest.warns(UserWarning, match="no native bfloat16"):
        assert prec.resolve_precision("bf16") == "bf16"
    assert prec.resolve_precision("fp32") == "fp32"
    monkeypatch.setattr(prec, "native_bf16", lambda device="cpu": True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prec.resolve_precision("bf16") == "bf16"


def test_environment_replaces_auto(monkeypatch):
    monkeypatch.setattr(prec, "native_bf16", lambda device="cpu": True)
    monkeypatch.setenv(prec.ENV_VAR, "fp32")
    assert prec.resolve_precision("auto") == "fp32"
    assert prec.resolve_precision("bf16") == "bf16"  # an explicit argument wins
    monkeypatch.setenv(prec.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="TINYSAM_PRECISION"):
        prec.resolve_precision("auto")


def test_bad_precisions_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        load_model("default", precision="int4")
    with pytest.raises(ValueError, match="CUDA"):
        load_model("default", precision="fp16")


def test_int8_model_refuses_bf16_and_stays_fp32_on_auto():
    assert load_model("default-int8", precision="auto").precision == "fp32"
    with pytest.raises(ValueError, match="int8"):
        load_model("default-int8", precision="bf16")


def test_precision_change_invalidates_cached_embeddings():
    model = load_model("default", precision="fp32")
    pred = SamPredictor(model)
    pred.set_image(samples.nuclei_2d()[:128, :128])
    pred.set_image(samples.nuclei_2d()[:128, :128])
    assert pred.encoder_calls == 1
    model.set_precision("bf16")
    pred.set_image(samples.nuclei_2d()[:128, :128])
    assert pred.encoder_calls == 2
    assert pred.get_image_embedding().dtype == torch.float32  # what leaves the model is float32


def test_bf16_agrees_with_fp32_on_clicks():
    image, truth = samples.nuclei_2d(), samples.nuclei_2d_labels()
    f32, b16 = (
        SamPredictor(load_model("default", precision="fp32")),
        SamPredictor(load_model("default", precision="bf16")),
    )
    for p in (f32, b16):
        p.set_image(image)
    from napari_tinysam.evaluation import innermost_point

    ious = []
    for i in [i for i in np.unique(truth) if i][:12]:
        x, y = innermost_point(truth == i)
        a = f32.predict(np.array([[x, y]]), np.array([1]))[0]
        b = b16.predict(np.array([[x, y]]), np.array([1]))[0]
        ious += [np.logical_and(a[k], b[k]).sum() / max(np.logical_or(a[k], b[k]).sum(), 1) for k in range(3)]
    assert np.mean(ious) >= 0.97


def test_a_clicks_large_products_run_in_bf16_and_follow_weight_changes():
    """With bf16 precision a single click's decoder runs in float32 but its products over
    every image token in bfloat16 (cached weight copies): close to float32, and a weight
    changed in place (a training step) reaches the cached copies."""
    model = load_model("default", precision="fp32")
    assert model.mask_decoder.product_dtype is None
    assert load_model("default", precision="bf16").mask_decoder.product_dtype == torch.bfloat16
    pred = SamPredictor(model)
    pred.set_image(samples.nuclei_2d()[:256, :256])
    pt, lab = np.array([[120.0, 130.0]]), np.array([1])

    def both():
        model.mask_decoder.set_product_dtype(None)
        exact = pred.predict(pt, lab, return_logits=True)[0]
        model.mask_decoder.set_product_dtype(torch.bfloat16)
        return exact, pred.predict(pt, lab, return_logits=True)[0]

    exact, low = both()
    assert not np.array_equal(exact, low)
    assert np.abs(low - exact).max() < 0.05 * np.abs(exact).max()
    assert ((low > 0) == (exact > 0)).mean() > 0.995
    with torch.no_grad():
        model.mask_decoder.output_upscaling[0].weight.mul_(1.5)
    exact2, low2 = both()
    assert np.abs(exact2 - exact).max() > 0.5  # the change matters...
    assert np.abs(low2 - exact2).max() < 0.05 * np.abs(exact2).max()  # ...and the copies follow it


def test_channels_last_upscaling_equals_the_module_path(tiny_model):
    dec = tiny_model.mask_decoder
    assert dec._plain_upscaling()
    torch.manual_seed(0)
    src = torch.randn(2, 8, 8, dec.transformer_dim)
    hyper = torch.randn(2, dec.num_mask_tokens, dec.transformer_dim // 8)
    fast = dec._upscale_channels_last(src, hyper)
    up = dec.output_upscaling(src.permute(0, 3, 1, 2))
    ref = torch.matmul(hyper, up.flatten(2)).view(2, -1, 32, 32)
    assert fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    assert isinstance(dec.output_upscaling[1], LayerNorm2d)


def test_compiled_encoder_equals_eager(tiny_model):
    """``set_compiled`` swaps in an inductor-compiled encoder: same embedding within float
    tolerance, nothing added to the state dict, eager again when autograd is on."""
    torch.manual_seed(1)
    x = torch.rand(1, 3, 200, 256) * 255
    keys = set(tiny_model.state_dict())
    with torch.no_grad():
        eager = tiny_model.embed(x)
    tiny_model.set_compiled(True)
    try:
        assert tiny_model.compiled
        with torch.no_grad():
            compiled = tiny_model.embed(x)
        assert tiny_model.compiled, "compilation failed and fell back to eager"
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
        assert set(tiny_model.state_dict()) == keys
        with torch.enable_grad():
            assert tiny_model.embed(x).requires_grad  # training runs the eager encoder
    finally:
        tiny_model.set_compiled(False)
    assert not tiny_model.compiled


def test_compile_option_of_load_model(monkeypatch):
    monkeypatch.delenv("TINYSAM_COMPILE", raising=False)
    assert not load_model("default").compiled
    assert load_model("default", compile=True).compiled
    monkeypatch.setenv("TINYSAM_COMPILE", "1")
    assert load_model("default").compiled
    assert not load_model("default-int8").compiled  # the environment does not apply to int8
    with pytest.raises(ValueError, match="int8"):
        load_model("default-int8", compile=True)
