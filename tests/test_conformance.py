"""Number-for-number agreement with the public TinySAM reference implementation
(../shared/conformance), with the tolerances of its README."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_tinysam import SamPredictor, load_model
from napari_tinysam.predictor import ImageEmbedding, preprocess_shape

WEIGHTS = {"vit_t": "vit_t_perturbed_fp16.pt", "vit_mini": "vit_mini_perturbed_fp16.pt"}


def _cases(conformance_dir):
    spec = json.loads((conformance_dir / "public_cases.json").read_text())["cases"]
    return spec


@pytest.fixture(scope="module")
def models(conformance_dir):
    return {k: load_model(conformance_dir / v, precision="fp32") for k, v in WEIGHTS.items()}


CASE_FILES = ["public_vit_t_img0.npz", "public_vit_t_img1.npz", "public_vit_mini_img0.npz"]


def _prompt_kwargs(prompt, data):
    kw = {}
    if "points" in prompt:
        kw["point_coords"] = np.array(prompt["points"])
        kw["point_labels"] = np.array(prompt["labels"])
    if "box" in prompt:
        kw["box"] = np.array(prompt["box"])
    if "mask_from" in prompt:
        kw["mask_input"] = data[prompt["name"] + "/mask_input"]
    return kw


@pytest.mark.parametrize("case_file", CASE_FILES)
def test_conformance_case(case_file, conformance_dir, models):
    spec = _cases(conformance_dir)[case_file]
    data = np.load(conformance_dir / case_file)
    model = models[spec["model"]]
    image = data["image_uint8_rgb"]
    assert list(image.shape[:2]) == spec["shape"]

    # 1. embedding, from our preprocessing of the uint8 RGB image
    pred = SamPredictor(model)
    pred.set_image(image)
    diff = (pred.get_image_embedding() - torch.from_numpy(data["embedding"])).abs()
    assert diff.max().item() <= 1e-3
    assert diff.mean().item() <= 1e-5

    # 2. decoder outputs fed the stored embedding
    stored = SamPredictor(model)
    h, w = image.shape[:2]
    stored.set_embedding(
        ImageEmbedding(torch.from_numpy(data["embedding"]), (h, w), preprocess_shape(h, w, model.img_size))
    )
    for prompt in spec["prompts"]:
        name = prompt["name"]
        kw = _prompt_kwargs(prompt, data)
        with torch.no_grad():
            _, _, _ = stored.predict(**kw)
            # all four tokens, low resolution, and the prompt encoder's outputs
            from napari_tinysam.predictor import _batch_prompts_to_model

            pts, box = _batch_prompts_to_model(
                stored,
                None if "point_coords" not in kw else kw["point_coords"][None],
                None if "point_labels" not in kw else kw["point_labels"][None],
                None if "box" not in kw else kw["box"][None],
            )
            mask_in = None if "mask_input" not in kw else torch.from_numpy(kw["mask_input"])[None]
            sparse, dense = model.prompt_encoder(pts, box, mask_in)
            low, iou = model.decode(stored.get_image_embedding(), pts, box, mask_in)
        np.testing.assert_allclose(sparse.detach().numpy(), data[f"{name}/sparse_embeddings"], atol=1e-4)
        np.testing.assert_allclose(
            dense.detach().mean((2, 3)).numpy(), data[f"{name}/dense_embeddings_mean"], atol=1e-4
        )
        assert np.abs(low.numpy() - data[f"{name}/lowres_logits_all4"]).max() <= 1e-3, name
        assert np.abs(iou.numpy() - data[f"{name}/iou_all4"]).max() <= 1e-3, name

        # 3. end to end from the image: multimask masks at full size
        masks, iou_mm, _ = pred.predict(**kw, multimask_output=True)
        expected = data[f"{name}/masks_multimask"]
        assert masks.shape == expected.shape
        for m, e in zip(masks, expected):
            union = np.logical_or(m, e).sum()
            iou_val = np.logical_and(m, e).sum() / union if union else 1.0
            assert iou_val >= 0.999, (name, iou_val)
        np.testing.assert_allclose(iou_mm, data[f"{name}/iou_multimask"], atol=1e-3)
        # single-mask output is token 0
        single, iou0, _ = pred.predict(**kw, multimask_output=False)
        assert single.shape == (1, h, w)
        assert abs(iou0[0] - data[f"{name}/iou_all4"][0, 0]) <= 1e-3
