"""Model construction, architecture inference and checkpoint loading."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from napari_tinysam import CheckpointError, load_model
from napari_tinysam.model import (
    architecture_config,
    build_sam,
    infer_config,
    read_checkpoint,
    sam_from_checkpoint,
    save_checkpoint,
)


def test_vit_t_keys_match_official_layout(conformance_dir):
    official = torch.load(conformance_dir / "vit_t_perturbed_fp16.pt", weights_only=True)
    model = build_sam(architecture_config("vit_t"))
    assert set(model.state_dict()) == set(official)
    assert len(official) == 439
    for k, v in model.state_dict().items():
        assert tuple(v.shape) == tuple(official[k].shape), k


def test_infer_config_vit_t_and_vit_mini(conformance_dir):
    sd = torch.load(conformance_dir / "vit_t_perturbed_fp16.pt", weights_only=True)
    cfg = infer_config(sd)
    assert cfg["image_encoder"]["embed_dims"] == [64, 128, 160, 320]
    assert cfg["image_encoder"]["num_heads"][1:] == [4, 5, 10]
    assert cfg["image_encoder"]["window_sizes"][1:] == [7, 14, 7]
    assert cfg["img_size"] == 1024
    sd = torch.load(conformance_dir / "vit_mini_perturbed_fp16.pt", weights_only=True)
    enc = infer_config(sd)["image_encoder"]
    assert (enc["embed_dim"], enc["depth"], enc["num_heads"]) == (192, 4, 4)
    assert enc["global_attn_indexes"] == [1, 3] and enc["window_size"] == 14


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_infer_config_roundtrip_official_vit_sizes(name):
    # shapes only: build on the meta device, infer back, compare
    cfg = architecture_config(name)
    with torch.device("meta"):
        sd = build_sam(cfg).state_dict()
    inferred = infer_config(sd)["image_encoder"]
    for key in ("embed_dim", "depth", "num_heads", "global_attn_indexes", "window_size"):
        assert inferred[key] == cfg["image_encoder"][key], key


def test_attention_biases_never_stale(conformance_dir):
    """A model put in eval mode before its weights load must use the loaded biases."""
    sd = torch.load(conformance_dir / "vit_t_perturbed_fp16.pt", weights_only=True)
    a = build_sam(architecture_config("vit_t", 256)).eval()
    a.load_state_dict({k: v.float() for k, v in sd.items()})
    b = build_sam(architecture_config("vit_t", 256))
    b.load_state_dict({k: v.float() for k, v in sd.items()})
    b.eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ya, yb = a.image_encoder(x), b.image_encoder(x)
        blk = a.image_encoder.layers[1].blocks[0].attn
        blk.attention_biases.add_(3 * torch.randn_like(blk.attention_biases))  # changed after eval()
        yc = a.image_encoder(x)
    assert torch.allclose(ya, yb, atol=1e-5)
    assert not torch.allclose(ya, yc, atol=1e-3)


def test_encoder_accepts_any_multiple_of_16(tiny_model):
    with torch.no_grad():
        out = tiny_model.image_encoder(torch.randn(1, 3, 128, 192))
    assert out.shape == (1, 256, 8, 12)
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny_model.image_encoder(torch.randn(1, 3, 100, 128))


def test_a_model_at_another_input_size_shares_its_weights_and_equals_one_built_at_that_size(tiny_model):
    import numpy as np

    from napari_tinysam import SamPredictor

    sized = tiny_model.at_input_size(320)
    assert sized is tiny_model.at_input_size(320) and tiny_model.at_input_size(256) is tiny_model
    assert (tiny_model.img_size, sized.img_size) == (256, 320)
    assert tiny_model.prompt_encoder.image_embedding_size == (16, 16)  # the model itself is unchanged
    built = build_sam({**tiny_model.config, "img_size": 320}).eval()
    built.load_state_dict(tiny_model.state_dict())
    for a, b in zip(tiny_model.parameters(), sized.parameters()):
        assert a.data_ptr() == b.data_ptr()  # no copy of any weight
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    got, want = SamPredictor(sized), SamPredictor(built)
    got.set_image(image)
    want.set_image(image)
    assert got._embedding.features.shape == (1, 256, 20, 20)
    assert torch.equal(got._embedding.features, want._embedding.features)
    point, label = np.array([[120.0, 80.0]]), np.array([1])
    masks, scores, low = got.predict(point, label)
    masks2, scores2, low2 = want.predict(point, label)
    assert np.array_equal(masks, masks2) and np.allclose(scores, scores2) and np.allclose(low, low2)
    # embeddings of the two sizes never mix in a shared cache
    from napari_tinysam.predictor import image_key

    assert image_key(sized, image) != image_key(tiny_model, image)
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_model.at_input_size(300)


def test_project_checkpoint_roundtrip(tmp_path, tiny_model):
    path = tmp_path / "m.pt"
    save_checkpoint(tiny_model, path, meta={"steps": 3}, half=True)
    ckpt = read_checkpoint(path)
    assert ckpt["meta"] == {"steps": 3}
    model = load_model(path)
    assert model.img_size == 256 and model.meta["steps"] == 3
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ref = tiny_model.half().float().image_encoder(x)
        assert torch.allclose(model.image_encoder(x), ref, atol=1e-4)


def test_bad_checkpoints(tmp_path, conformance_dir):
    with pytest.raises(CheckpointError, match="neither a registry name"):
        load_model(tmp_path / "missing.pt")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes((conformance_dir / "vit_t_perturbed_fp16.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(trunc)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError):
        load_model(text)
    # a pickled module (like the official Q-TinySAM file) is refused, not executed
    pickled = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    with pytest.raises(CheckpointError, match="pickled"):
        load_model(pickled)
    # another architecture: keys named
    sd = torch.load(conformance_dir / "vit_t_perturbed_fp16.pt", weights_only=True)
    del sd["mask_decoder.iou_token.weight"]
    sd["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pt"
    torch.save(sd, broken)
    with pytest.raises(
        CheckpointError, match=r"missing keys: mask_decoder\.iou_token\.weight.*unexpected keys: extra\.weight"
    ):
        sam_from_checkpoint(broken)
    # not a SAM at all
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(CheckpointError, match="not a SAM-family state dict"):
        load_model(other)
    assert pickle  # the module under test never unpickles objects


def test_registry_names_without_files_say_where_to_put_them():
    with pytest.raises(CheckpointError, match=r"tinysam_42\.3\.pth.*TINYSAM_CACHE_DIR"):
        load_model("tinysam")


def test_batched_decoding_equals_one_prompt_at_a_time_and_the_textbook_form(vit_t_model, monkeypatch):
    """A batch of prompts on one image shares the image side of the decoder's first block;
    the masks and scores are those of each prompt decoded alone, and of SAM's textbook
    attention."""
    from napari_tinysam.model.transformer import Attention

    calls = []
    prepared_keys = Attention.prepared_keys

    def spy(self, q, kh, vh):
        calls.append(q.shape[0])
        return prepared_keys(self, q, kh, vh)

    monkeypatch.setattr(Attention, "prepared_keys", spy)
    model = vit_t_model
    g = torch.Generator().manual_seed(0)
    side = model.img_size // 16
    features = torch.randn(1, 256, side, side, generator=g)
    coords = torch.rand(6, 2, 2, generator=g) * model.img_size
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]] * 3)
    with torch.no_grad():
        low, iou = model.decode(features, (coords, labels), None, None)
        assert calls == [6]  # the batch took the shared path, in the first block only
        alone = [model.decode(features, (coords[i : i + 1], labels[i : i + 1]), None, None) for i in range(6)]
        Attention.reassociate = False
        try:
            low_tb, iou_tb = model.decode(features, (coords, labels), None, None)
        finally:
            Attention.reassociate = True
    scale = float(low_tb.abs().max())
    for ref_low, ref_iou in ((torch.cat([a[0] for a in alone]), torch.cat([a[1] for a in alone])), (low_tb, iou_tb)):
        assert (low - ref_low).abs().max() <= 1e-5 * scale
        assert torch.allclose(iou, ref_iou, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_clicks_on_one_embedding_reuse_its_first_block_image_side_and_decode_the_same(
    vit_t_model, precision, monkeypatch
):
    """The image side of the decoder's first block is computed once per embedding: every
    later click on it, corrective clicks with a mask prompt included, reuses it and
    decodes what the uncached decoder decodes; a changed or new embedding is not served a
    stale entry."""
    from napari_tinysam.model.mask_decoder import MaskDecoder
    from napari_tinysam.model.prompt_encoder import PromptEncoder
    from napari_tinysam.model.transformer import TwoWayTransformer

    model = copy.deepcopy(vit_t_model).set_precision(precision)
    prepares, changes = [], []
    prepare, prepare_change = TwoWayTransformer.prepare, TwoWayTransformer.prepare_change

    def spy(self, *args):
        prepares.append(1)
        return prepare(self, *args)

    def spy_change(self, *args):
        changes.append(1)
        return prepare_change(self, *args)

    monkeypatch.setattr(TwoWayTransformer, "prepare", spy)
    monkeypatch.setattr(TwoWayTransformer, "prepare_change", spy_change)
    g = torch.Generator().manual_seed(1)
    side = model.img_size // 16
    features = torch.randn(1, 256, side, side, generator=g)
    clicks = [(torch.rand(1, 1, 2, generator=g) * model.img_size, torch.ones(1, 1)) for _ in range(3)]
    low_res = torch.randn(1, 1, 4 * side, 4 * side, generator=g) * 5

    def decode_all(f):
        return [model.decode(f, c) for c in clicks] + [model.decode(f, clicks[0], mask_input=low_res)]

    def uncached(f):  # every image token projected per click, the mask prompt's dense embedding as a tensor
        with monkeypatch.context() as mp:
            mp.setattr(MaskDecoder, "prepared_image", lambda *a: None)
            mp.setattr(PromptEncoder, "_factorable", lambda *a: False)
            return decode_all(f)

    tol = 1e-5 if precision == "fp32" else 0.1  # bfloat16 products round differently

    def assert_same(got, ref):
        for (low, iou), (ref_low, ref_iou) in zip(got, ref, strict=True):
            assert (low - ref_low).abs().max() <= tol * float(ref_low.abs().max())
            assert torch.allclose(iou, ref_iou, atol=tol / 10)

    with torch.no_grad():
        cached = decode_all(features)
        assert len(prepares) == 1 and len(changes) == 1  # four clicks, one preparation
        assert_same(cached, uncached(features))
        with monkeypatch.context() as mp:  # no prepared side: the factored mask prompt's full embedding
            mp.setattr(MaskDecoder, "prepared_image", lambda *a: None)
            assert_same([model.decode(features, clicks[0], mask_input=low_res)], uncached(features)[-1:])
        same_values = features.clone()
        model.decode(same_values, clicks[0], mask_input=low_res)
        assert len(prepares) == 2  # another tensor: its own entry, never another's
        features.mul_(-1)  # changed in place: the entry is stale
        flipped = decode_all(features)
        assert len(prepares) == 3
        assert_same(flipped, uncached(features))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_decoding_only_the_asked_mask_tokens_gives_their_masks(vit_t_model, precision):
    """A click asks for its tokens (``Sam.mask_tokens``); the other tokens' masks are not
    computed, and the ones returned are those of decoding all four."""
    model = copy.deepcopy(vit_t_model).set_precision(precision)
    g = torch.Generator().manual_seed(2)
    side = model.img_size // 16
    features = torch.randn(1, 256, side, side, generator=g)
    click = (torch.rand(1, 1, 2, generator=g) * model.img_size, torch.ones(1, 1))
    low_res = torch.randn(1, 1, 4 * side, 4 * side, generator=g)
    with torch.no_grad():
        for multimask, mask_input in ((True, None), (False, None), (False, low_res)):
            low, iou = model.decode(features, click, mask_input=mask_input, tokens=model.mask_tokens(multimask))
            tokens = model.mask_tokens(multimask)
            all_low, all_iou = (t[:, tokens] for t in model.decode(features, click, mask_input=mask_input))
            assert low.shape == all_low.shape == (1, 3 if multimask else 1, 4 * side, 4 * side)
            torch.testing.assert_close(iou, all_iou)
            torch.testing.assert_close(low, all_low, atol=1e-4 * float(all_low.abs().max()), rtol=0)


def test_image_to_token_attention_adds_its_output_to_the_residual_in_the_product():
    """``Attention.added_to`` (a bfloat16 click's image tokens, which stay bfloat16): the
    residual plus the attention's output, bias included, at the residual's dtype."""
    from napari_tinysam.model.transformer import Attention

    g = torch.Generator().manual_seed(3)
    att = Attention(64, 8, downsample_rate=2)
    with torch.no_grad():
        for p in att.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        images, prompt = torch.randn(1, 256, 64, generator=g), torch.randn(1, 7, 64, generator=g)
        residual = torch.randn(1, 256, 64, generator=g)
        want = residual + att(images, prompt, prompt)
        torch.testing.assert_close(att.added_to(residual, images, prompt, prompt), want, atol=1e-5, rtol=1e-5)
        att.product_dtype = torch.bfloat16
        got = att.added_to(residual.bfloat16(), images.bfloat16(), prompt, prompt)
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max() <= 0.03 * float(want.abs().max())
        with pytest.raises(ValueError, match="few keys"):
            att.added_to(prompt, prompt, images, images)


def test_dense_positional_encoding_is_cached_until_the_weights_change(tiny_model):
    pe_enc = tiny_model.prompt_encoder
    with torch.no_grad():
        first = pe_enc.get_dense_pe()
        assert pe_enc.get_dense_pe() is first  # computed once per grid
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert pe_enc.get_dense_pe().dtype == torch.float32
        torch.testing.assert_close(first, pe_enc.pe_layer(pe_enc.image_embedding_size)[None])
        state = {k: v.clone() for k, v in pe_enc.state_dict().items()}
        changed = dict(state)
        key = "pe_layer.positional_encoding_gaussian_matrix"
        changed[key] = state[key] * 2
        pe_enc.load_state_dict(changed)
        try:
            again = pe_enc.get_dense_pe()
            assert not torch.equal(again, first)
            torch.testing.assert_close(again, pe_enc.pe_layer(pe_enc.image_embedding_size)[None])
        finally:
            pe_enc.load_state_dict(state)
        torch.testing.assert_close(pe_enc.get_dense_pe(), first)
        # a round trip through float16 replaces the matrix's storage (its address and
        # version can repeat) and rounds it: the encoding follows the rounded values
        saved = pe_enc.pe_layer.positional_encoding_gaussian_matrix.detach().clone()
        try:
            pe_enc.pe_layer.positional_encoding_gaussian_matrix.add_(1e-3 / 3)  # off the float16 grid
            off_grid = pe_enc.pe_layer.positional_encoding_gaussian_matrix.clone()
            pe_enc.get_dense_pe()
            pe_enc.half().float()
            assert not torch.equal(pe_enc.pe_layer.positional_encoding_gaussian_matrix, off_grid)
            torch.testing.assert_close(pe_enc.get_dense_pe(), pe_enc.pe_layer(pe_enc.image_embedding_size)[None])
        finally:
            with torch.no_grad():
                pe_enc.pe_layer.positional_encoding_gaussian_matrix.copy_(saved)
        torch.testing.assert_close(pe_enc.get_dense_pe(), first)


@pytest.mark.parametrize(
    "input_size, original",
    [((192, 256), (520, 696)), ((256, 171), (3000, 2000)), ((256, 256), (64, 64)), ((100, 256), (37, 95))],
)
def test_mask_upscaling_equals_the_references_two_resizes(tiny_model, input_size, original):
    """Masks reach the image through SAM's two bilinear resizes (to the padded input,
    crop, to the original size); the composed matrices give the same logits."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    low = torch.randn(2, 3, 64, 64) * 4
    s = tiny_model.img_size
    ref = F.interpolate(low, (s, s), mode="bilinear", align_corners=False)[..., : input_size[0], : input_size[1]]
    ref = F.interpolate(ref, original, mode="bilinear", align_corners=False)
    out = tiny_model.postprocess_masks(low, input_size, original)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # a click on a bfloat16 model upscales in bfloat16: the same map at that precision
    low16 = tiny_model.postprocess_masks(low, input_size, original, torch.bfloat16)
    assert low16.dtype == torch.bfloat16 and low16.shape == ref.shape
    torch.testing.assert_close(low16.float(), ref, atol=0.1, rtol=0.02)


def test_encoder_activations_in_place_only_without_autograd(tiny_model):
    """Inference runs the encoder's GELUs in place over its own intermediates (memory
    order for channels-last maps); with autograd on they stay out of place, so training
    through the encoder still has the inputs its backward pass needs."""
    from napari_tinysam.model.tiny_vit import gelu_

    x = torch.randn(1, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.gelu(x)
    with torch.no_grad():
        y = x.clone(memory_format=torch.channels_last)
        assert gelu_(y) is y
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)  # kernels differ in the last bit
    leaf = x.clone().requires_grad_(True)
    out = gelu_(leaf)
    assert out is not leaf and torch.equal(out.detach(), y)  # the same values either way
    img = torch.randn(1, 3, 64, 64, requires_grad=True)
    tiny_model.image_encoder(img).sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()
    with torch.no_grad():
        assert torch.allclose(tiny_model.image_encoder(img), tiny_model.image_encoder(img.detach()))
