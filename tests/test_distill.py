"""Distillation losses, hard prompt sampling and a tiny training run."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tifffile
import torch

from napari_tinysam import load_model
from napari_tinysam.distill import TrainConfig, Trainer
from napari_tinysam.distill.losses import (
    dice_loss,
    focal_loss,
    hard_mask_weight,
    mask_iou,
    weighted_logit_l1,
)
from napari_tinysam.distill.prompts import boxes_from_masks, sample_error_points, sample_points_in
from napari_tinysam.evaluation import corrective_point


def test_hard_mask_weight_known_values():
    t = torch.tensor([0.9, 0.5, 0.0])
    s = torch.tensor([0.9, 0.25, 0.5])
    h = hard_mask_weight(t, s, eps=0.0)
    expected = torch.sigmoid(torch.tensor([0.0, 1.0, -1.0]))
    assert torch.allclose(h, expected)
    # a student far worse than the teacher weighs more than one that matches it
    assert hard_mask_weight(torch.tensor(0.9), torch.tensor(0.1)) > hard_mask_weight(
        torch.tensor(0.9), torch.tensor(0.9)
    )


def test_losses_on_hand_made_tensors():
    target = torch.zeros(1, 1, 2, 2)
    target[..., 0, 0] = 1
    perfect = (target * 2 - 1) * 50
    assert dice_loss(perfect, target).item() < 1e-3
    assert focal_loss(perfect, target).item() < 1e-6
    zero = torch.zeros(1, 1, 2, 2)
    # focal at p = 0.5: ce = ln 2, (1 - p_t)^2 = 1/4, alpha 0.25 (1 pixel) / 0.75 (3 pixels)
    expected = np.log(2) * 0.25 * (0.25 * 1 + 0.75 * 3) / 4
    assert focal_loss(zero, target).item() == pytest.approx(expected, rel=1e-5)
    # dice at p = 0.5: 1 - (2*0.5 + 1) / (2 + 1 + 1)
    assert dice_loss(zero, target).item() == pytest.approx(0.5)
    assert mask_iou(torch.tensor([[1, 1], [0, 0]]), torch.tensor([[1, 0], [0, 0]])).item() == 0.5
    w = torch.tensor([[2.0]])
    assert weighted_logit_l1(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), w).item() == 2.0


def test_error_points_only_in_error_regions():
    gen = torch.Generator().manual_seed(0)
    gt = torch.zeros(50, 20, 20, dtype=torch.bool)
    gt[:, 5:15, 5:15] = True
    pred = torch.zeros_like(gt)
    pred[:25, 5:15, 5:10] = True  # false negatives only
    pred[25:, 0:15, 0:15] = True  # false positives only
    coords, labels = sample_error_points(pred, gt, gen)
    for i in range(50):
        x, y = int(coords[i, 0]), int(coords[i, 1])
        if labels[i] == 1:
            assert gt[i, y, x] and not pred[i, y, x]
        else:
            assert labels[i] == 0 and pred[i, y, x] and not gt[i, y, x]
    assert (labels[:25] == 1).all() and (labels[25:] == 0).all()
    # no error: a padding point
    _, lab = sample_error_points(gt.clone(), gt, gen)
    assert (lab == -1).all()


def test_points_inside_and_boxes():
    m = torch.zeros(3, 10, 12, dtype=torch.bool)
    m[0, 2:5, 3:7] = True
    m[1, 9, 11] = True
    m[2, 0:10, 0:1] = True
    pts = sample_points_in(m)
    for i in range(3):
        assert m[i, int(pts[i, 1]), int(pts[i, 0])]
    assert boxes_from_masks(m).tolist() == [[3, 2, 6, 4], [11, 9, 11, 9], [0, 0, 0, 9]]


@pytest.fixture
def tiny_folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    yy, xx = np.mgrid[:96, :96]
    for n in range(3):
        lab = np.zeros((96, 96), np.uint16)
        for i in range(1, 6):
            cy, cx, r = rng.integers(12, 84), rng.integers(12, 84), rng.integers(5, 10)
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
        img = (100 + 1000 * (lab > 0) + rng.normal(0, 20, lab.shape)).astype(np.uint16)
        tifffile.imwrite(tmp_path / "images" / f"f{n}.tif", img)
        tifffile.imwrite(tmp_path / "labels" / f"f{n}.tif", lab)
    return tmp_path


def _tiny_config(folder, out, steps):
    student = {
        "image_encoder": {
            "type": "tiny_vit",
            "embed_dims": [8, 16, 24, 32],
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 2, 2],
            "window_sizes": [7, 7, 7, 7],
            "num_classes": 0,
        },
        "img_size": 64,
        "prompt_embed_dim": 256,
        "mask_decoder": {"depth": 1, "mlp_dim": 64},
    }
    return TrainConfig(
        train_images=str(folder / "images"),
        out_dir=str(out),
        val_images=str(folder / "images"),
        student=student,
        img_size=64,
        crop=64,
        batch_crops=2,
        objects_per_crop=4,
        max_rounds=1,
        steps=steps,
        lr=1e-3,
        warmup=2,
        val_every=1000,
        val_fields=1,
        checkpoint_minutes=1000,
    )


def test_tiny_training_lowers_loss_and_resumes(tiny_folder, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(_tiny_config(tiny_folder, out, steps=40), log=lambda *_: None)
    torch.manual_seed(0)
    losses = [trainer.train_step()["loss"] for _ in range(40)]
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    trainer.save_state()
    trainer.export(out / "final.pt")
    model = load_model(out / "final.pt")
    assert model.img_size == 64 and model.meta["steps"] == 40
    # resume: a new trainer picks up the step count and weights
    cfg = _tiny_config(tiny_folder, out, steps=42)
    again = Trainer(cfg, log=lambda *_: None)
    assert again.try_resume() and again.step == 40
    ref = trainer.model.state_dict()
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    again.run(progress=False)
    assert again.step == 42 and (out / "final.pt").is_file()


def test_distillation_uses_stored_teacher_embeddings(tiny_folder, tmp_path):
    from napari_tinysam.distill.teacher import StoreMismatch
    from napari_tinysam.model import build_sam

    cfg = _tiny_config(tiny_folder, tmp_path / "kd", steps=3)
    cfg.teacher_views = 6
    torch.manual_seed(1)
    teacher = build_sam(cfg.student).eval()
    trainer = Trainer(cfg, teacher=teacher, log=lambda *_: None)
    assert trainer.store.done.all() and trainer.store.encoder_calls > 0
    terms = trainer.train_step()
    assert {"embedding", "tokens", "logits", "mask"} <= set(terms)
    # stored embeddings are the teacher's embeddings of exactly the student's views
    img, _ = trainer.store.view(2)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        ref = teacher.image_encoder((x - teacher.pixel_mean) / teacher.pixel_std)
    assert torch.allclose(trainer.store.get(2), ref, atol=1e-2)
    # a second run reuses the store: no teacher encoder pass
    again = Trainer(cfg, teacher=teacher, log=lambda *_: None)
    assert again.store.encoder_calls == 0
    # another teacher: refused with a clear message
    torch.manual_seed(2)
    other = build_sam(cfg.student).eval()
    with pytest.raises(StoreMismatch, match="teacher"):
        Trainer(cfg, teacher=other, log=lambda *_: None)


def test_student_checkpoint_keeps_or_changes_its_input_size(tiny_folder, tmp_path):
    """Fine-tuning a checkpoint at another input size keeps its weights (TinyViT has no
    position table); leaving the size out keeps the checkpoint's."""
    from napari_tinysam.distill.trainer import make_student
    from napari_tinysam.model import build_sam, save_checkpoint

    base = _tiny_config(tiny_folder, tmp_path / "unused", steps=1)
    torch.manual_seed(3)
    src = build_sam(base.student).eval()
    save_checkpoint(src, tmp_path / "s.pt")
    kept = make_student(TrainConfig(train_images="", out_dir="", student=str(tmp_path / "s.pt")))
    assert kept.img_size == 64
    bigger = make_student(TrainConfig(train_images="", out_dir="", student=str(tmp_path / "s.pt"), img_size=96))
    assert bigger.img_size == 96 and bigger.prompt_encoder.get_dense_pe().shape[-1] == 6
    ref = src.state_dict()
    for k, v in bigger.state_dict().items():
        assert torch.equal(v, ref[k]), k
    x = torch.rand(1, 3, 96, 96) * 255
    with torch.no_grad():
        assert bigger.image_encoder(bigger.preprocess(x)).shape[-1] == 6


def test_cli_distill_passes_loss_weights_and_keeps_the_checkpoint_size(tiny_folder, tmp_path):
    from napari_tinysam.cli import main
    from napari_tinysam.model import build_sam, save_checkpoint

    torch.manual_seed(4)
    save_checkpoint(build_sam(_tiny_config(tiny_folder, tmp_path, 1).student).eval(), tmp_path / "s.pt")
    out = tmp_path / "run"
    rc = main(
        [
            "distill",
            str(tiny_folder / "images"),
            "-o",
            str(out),
            "--student",
            str(tmp_path / "s.pt"),
            "--crop",
            "64",
            "--batch",
            "1",
            "--objects",
            "2",
            "--max-rounds",
            "0",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--w-focal",
            "5",
            "--w-logits",
            "0.5",
        ]
    )
    assert rc == 0
    model = load_model(out / "final.pt")
    recipe = model.meta["recipe"]
    assert model.img_size == 64 and recipe["w_focal"] == 5 and recipe["w_logits"] == 0.5
    assert recipe["w_dice"] == TrainConfig(train_images="", out_dir="").w_dice


def test_training_does_not_depend_on_the_worker_count(tiny_folder, tmp_path):
    """Worker processes make the same crops as the main process (each crop is a function
    of the run's seed and the step), so a run gives the same losses with any worker
    count."""
    runs = []
    for workers in (0, 2):
        cfg = _tiny_config(tiny_folder, tmp_path / f"w{workers}", steps=3)
        cfg.workers = workers
        trainer = Trainer(cfg, log=lambda *_: None)
        try:
            x, labs, _ = trainer._crop_batch()
            losses = [trainer.train_step()["loss"] for _ in range(3)]
        finally:
            trainer.close()
        runs.append((x, labs, losses))
    (x0, labs0, losses0), (x1, labs1, losses1) = runs
    assert torch.equal(x0, x1)
    assert all(np.array_equal(a, b) for a, b in zip(labs0, labs1))
    assert all(lab.max() > 0 for lab in labs0)  # crops without objects are drawn again
    assert losses0 == losses1


def test_time_budget_sets_the_step_count(tiny_folder, tmp_path):
    cfg = _tiny_config(tiny_folder, tmp_path / "budget", steps=5)
    cfg.minutes, cfg.val_every = 1.0, 4
    trainer = Trainer(cfg, log=lambda *_: None)
    # 58.2 s of the budget left after 10 s: 48.2 s at 0.5 s a step plus 2 s every 4 steps
    assert trainer._fit_steps(elapsed=10.0, step_seconds=0.5, val_seconds=2.0) == 48
    trainer.step = 30
    assert trainer._fit_steps(elapsed=70.0, step_seconds=0.5, val_seconds=2.0) == 31  # over: one more
    # a fresh run replaces --steps by what fits; a tiny budget stops right after the timing
    cfg = _tiny_config(tiny_folder, tmp_path / "budget2", steps=5)
    cfg.minutes = 0.001
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.run(progress=False)
    assert trainer.cfg.steps == trainer.step == 26
    assert load_model(tmp_path / "budget2" / "final.pt").meta["steps"] == 26


def test_a_gpu_run_resumes_on_a_cpu(tiny_folder, tmp_path):
    """A GPU run's checkpoint keeps a 16-byte CUDA generator state; resuming it on a CPU
    reseeds the prompt sampler instead of failing."""
    cfg = _tiny_config(tiny_folder, tmp_path / "run", steps=3)
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.train_step()
    trainer.save_state()
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    state["torch_rng"] = torch.arange(16, dtype=torch.uint8)  # what a CUDA generator saves
    torch.save(state, tmp_path / "run" / "last.pt")
    logged = []
    again = Trainer(_tiny_config(tiny_folder, tmp_path / "run", steps=3), log=logged.append)
    assert again.try_resume() and again.step == 1
    assert any("reseeded" in line for line in logged)
    again.run(progress=False)
    assert again.step == 3


def test_a_budgeted_run_resumes_with_the_step_count_it_fitted(tiny_folder, tmp_path):
    """Rerunning the same command (--minutes) after an interruption keeps the schedule of
    the first run instead of falling back to --steps."""
    cfg = _tiny_config(tiny_folder, tmp_path / "run", steps=2000)
    cfg.minutes = 5.0
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.train_step()
    trainer.cfg.steps = 3  # what the timing fitted
    trainer.save_state()
    again_cfg = _tiny_config(tiny_folder, tmp_path / "run", steps=2000)
    again_cfg.minutes = 5.0
    again = Trainer(again_cfg, log=lambda *_: None)
    again.run(progress=False)
    assert again.cfg.steps == 3 and again.step == 3


def test_center_error_points_are_the_benchmark_corrective_clicks():
    gen = torch.Generator().manual_seed(0)
    gt = torch.zeros(6, 40, 40, dtype=torch.bool)
    gt[:, 5:35, 5:35] = True
    pred = gt.clone()
    pred[:3, 5:35, 5:20] = False  # a missed half: the click goes to its middle, positive
    pred[3:, 0:40, 30:40] = True  # a spill to the right: negative
    pred[5] = gt[5]  # no error: padding point
    coords, labels = sample_error_points(pred, gt, gen, center_fraction=1.0)
    for i in range(5):
        (x, y), label = corrective_point(pred[i].numpy(), gt[i].numpy())
        assert (float(coords[i, 0]), float(coords[i, 1])) == (x, y) and labels[i] == label
    assert labels.tolist() == [1, 1, 1, 0, 0, -1]


def test_a_budgeted_run_refits_its_step_count_when_steps_get_slower(tiny_folder, tmp_path, monkeypatch):
    cfg = _tiny_config(tiny_folder, tmp_path / "refit", steps=5)
    cfg.minutes = 1.0
    monkeypatch.setattr(Trainer, "FIT_AT", (8, 12))
    logs: list[str] = []
    trainer = Trainer(cfg, log=logs.append)
    fast_step = trainer.train_step

    def step():  # steps 10-12 are slower (a GPU that throttles, a laptop that gets busy)
        out = fast_step()
        if trainer.step > 9:
            time.sleep(0.2)
        return out

    trainer.train_step = step
    trainer.run(progress=False, stop_after=12)
    fits = [int(line.split(": ")[1].split()[0]) for line in logs if "steps fit" in line]
    assert len(fits) == 2 and fits[1] < fits[0]
    assert trainer.cfg.steps == fits[1]


def test_small_object_boost_draws_small_objects_more_often():
    # a crop with 30 nuclei-sized objects and 6 fragments; 6 objects are drawn per crop
    lab = np.zeros((128, 128), np.int32)
    for n in range(30):
        y, x = divmod(n, 6)
        lab[y * 20 + 2 : y * 20 + 16, x * 20 + 2 : x * 20 + 16] = n + 1  # 196 px
    for n in range(6):
        lab[110:115, n * 20 + 2 : n * 20 + 7] = 31 + n  # 25 px
    lab[120:122, 0:2] = 40  # 4 px: under min_object_area, never drawn

    def share_of_small(boost: float) -> float:
        cfg = TrainConfig(train_images="", out_dir="", objects_per_crop=6, small_object_boost=boost)
        me = type("T", (), {"cfg": cfg, "rng": np.random.default_rng(0)})()
        drawn = [Trainer._objects(me, lab) for _ in range(300)]
        sizes = torch.cat([d.flatten(1).sum(1) for d in drawn])
        assert sizes.min() >= cfg.min_object_area and len(sizes) == 1800
        return float((sizes < cfg.small_object_area).float().mean())

    assert abs(share_of_small(1.0) - 6 / 36) < 0.03  # uniform
    assert share_of_small(10.0) > 0.5  # 6 fragments at weight 10 against 30 at weight 1
