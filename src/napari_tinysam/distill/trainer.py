"""The training loop: ground truth and/or full-stage distillation with online hard
prompt sampling, checkpoints with resume, validation and model selection."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluation import evaluate_prompts
from ..model import Sam, architecture_config, build_sam, save_checkpoint
from ..model.build import read_checkpoint
from .data import Augment, load_folder, seeded_crop
from .losses import (
    dice_loss,
    embedding_l1,
    focal_loss,
    hard_mask_weight,
    mask_iou,
    token_l1,
    weighted_logit_l1,
)
from .prompts import boxes_from_masks, jitter_boxes, sample_error_points, sample_points_in


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in checkpoints and ``meta``)."""

    train_images: str
    out_dir: str
    val_images: str | None = None
    teacher: str | None = None  # checkpoint path/name, or None for ground truth only
    student: str | dict = "vit_t"  # architecture name, config dict, or checkpoint to start from
    img_size: int | None = None  # student input size (None: the teacher's, the checkpoint's, else 512)
    crop: int = 256
    scale: float = 1.0  # base resize of training images (e.g. img_size / longest side)
    batch_crops: int = 4
    objects_per_crop: int = 12
    min_object_area: int = 12
    # objects under small_object_area pixels (of the crop, at the model's scale; 180 is about
    # 150 field pixels at 768/696) are drawn this many times as often as the others when a
    # crop holds more than objects_per_crop; 1 draws uniformly (the earlier random stream)
    small_object_boost: float = 1.0
    small_object_area: int = 180
    max_rounds: int = 9  # hard-prompt rounds drawn from 0..max_rounds per step
    center_fraction: float = 0.0  # share of hard prompts at the innermost point of the largest error region
    box_fraction: float = 0.5
    steps: int = 2000
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    checkpoint_minutes: float = 3.0
    device: str = "cpu"  # "cuda" trains on a GPU
    amp: bool = False  # bfloat16 autocast for the forward passes (weights and losses stay float32)
    workers: int = 0  # processes that make augmented crops ahead of the step (0: in the main process)
    minutes: float | None = None  # time budget: a fresh run sets ``steps`` to fit it after timing
    val_every: int = 200
    val_fields: int = 6
    val_objects: int = 15
    hard_prompts: bool = True
    teacher_views: int = 2000  # fixed views whose teacher embeddings are stored
    teacher_store: str | None = None  # folder of the store (default: out_dir/teacher_store)
    # loss weights. The distillation defaults balance the terms' gradients on the image
    # encoder at the start of training (measured with a half-width student and the bundled
    # teacher: at weight 1 the logit L1 gave 116, the ground-truth terms 25, the embedding
    # L1 2.7, the tokens 3.5), so that no term drowns the others.
    w_focal: float = 20.0
    w_dice: float = 1.0
    w_iou: float = 1.0
    w_embedding: float = 10.0
    w_tokens: float = 1.0
    w_logits: float = 0.1
    augment: dict = field(default_factory=dict)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 1% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


UNFITTED = 10**9  # ``steps`` of a budgeted run before its timing fixes the count
_WORKER: tuple | None = None  # (samples, crop, augment) inherited by the crop workers


def _init_worker(samples, crop, aug) -> None:
    global _WORKER
    _WORKER = (samples, crop, aug)
    torch.set_num_threads(1)


def _worker_crop(seed) -> tuple[np.ndarray, np.ndarray | None]:
    samples, crop, aug = _WORKER
    return seeded_crop(samples, seed, crop, aug, require_objects=True)


def _val_line(res: dict[str, float]) -> str:
    return f"val click {res['click']:.3f} box {res['box']:.3f} click+3 {res['click3']:.3f}"


def make_student(cfg: TrainConfig) -> Sam:
    """The student of ``cfg``: an architecture, a config, or a checkpoint to start from.

    A checkpoint keeps its input size unless ``cfg.img_size`` asks for another; TinyViT
    weights do not depend on it (window attention, no absolute position table), so the
    same weights are rebuilt at the new size. Plain ViT encoders cannot be re-sized."""
    if isinstance(cfg.student, dict):
        config = dict(cfg.student)
        if cfg.img_size:
            config["img_size"] = cfg.img_size
        return build_sam(config)
    if cfg.student in ("vit_t", "vit_b", "vit_l", "vit_h"):
        return build_sam(architecture_config(cfg.student, cfg.img_size or 512))
    ckpt = read_checkpoint(cfg.student)
    config = dict(ckpt["config"])
    if cfg.img_size and cfg.img_size != config["img_size"]:
        if config["image_encoder"].get("type") != "tiny_vit":
            raise ValueError(
                f"{cfg.student}: a {config['image_encoder'].get('type')} encoder has position tables for "
                f"img_size {config['img_size']}; train it at that size (leave --img-size out)"
            )
        config["img_size"] = cfg.img_size
    model = build_sam(config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
    return model


class Trainer:
    """Runs ``TrainConfig``; ``run()`` resumes from ``out_dir/last.pt`` when present."""

    def __init__(self, cfg: TrainConfig, teacher: Sam | None = None, log=print) -> None:
        self.cfg = cfg
        self.log = log
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        self.train_samples = [s for s in load_folder(cfg.train_images) if s.labels is not None or teacher]
        self.val_samples = load_folder(cfg.val_images)[: cfg.val_fields] if cfg.val_images else []
        self.aug = Augment(scale=cfg.scale, **cfg.augment)
        self.pool = None
        self.pending = None
        if cfg.workers > 0 and teacher is None:
            import multiprocessing as mp

            # forked before the model touches the GPU; the fields are inherited, not pickled
            ctx = mp.get_context("fork")
            self.pool = ctx.Pool(cfg.workers, _init_worker, (self.train_samples, cfg.crop, self.aug))
        self.model = make_student(cfg).to(self.device)
        self.model.train()
        self.teacher = None if teacher is None else teacher.to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.best: dict[str, Any] = {"score": -1.0}
        self.history: list[dict[str, Any]] = []
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = None
        if teacher is not None:
            if teacher.img_size != self.model.img_size:
                raise ValueError(
                    f"teacher img_size {teacher.img_size} != student img_size {self.model.img_size}; "
                    "train the student at the teacher's input size (--img-size)"
                )
            from .teacher import TeacherStore

            self.store = TeacherStore(
                cfg.teacher_store or self.out / "teacher_store",
                teacher,
                self.train_samples,
                cfg.teacher_views,
                cfg.crop,
                self.aug,
                cfg.seed,
            )
            missing = int((~self.store.done).sum())
            if missing:
                self.log(f"computing {missing} teacher embeddings (stored in {self.store.folder})")
                self.store.compute()

    # -- state --------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "format": "napari-tinysam-train",
            "config": asdict(self.cfg),
            "model_config": self.model.config,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "rng": json.dumps(self.rng.bit_generator.state),
            "torch_rng": self.gen.get_state(),
            "best": json.dumps(self.best),
            "history": json.dumps(self.history),
        }

    def save_state(self) -> None:
        path = self.out / "last.pt"
        tmp = path.with_name("last.pt.partial")
        torch.save(self._state(), tmp)
        os.replace(tmp, path)

    def try_resume(self) -> bool:
        path = self.out / "last.pt"
        if not path.is_file():
            return False
        st = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.step = int(st["step"])
        if self.cfg.minutes is not None:  # a budgeted run keeps the step count it fitted
            self.cfg.steps = int(st["config"]["steps"])
        self.rng.bit_generator.state = json.loads(st["rng"])
        try:
            self.gen.set_state(st["torch_rng"])
        except RuntimeError:  # saved on another kind of device (e.g. a GPU run resumed on a CPU)
            self.gen.manual_seed(self.cfg.seed + self.step)
            self.log("prompt sampler state was saved on another device: reseeded")
        self.best = json.loads(st["best"])
        self.history = json.loads(st["history"])
        self.log(f"resumed from {path} at step {self.step}")
        return True

    # -- one step -----------------------------------------------------------------------
    def _crop_batch(self) -> tuple[torch.Tensor, list[np.ndarray], torch.Tensor | None]:
        imgs, labs = [], []
        if self.store is not None:
            idx = self.rng.integers(0, self.store.n_views, self.cfg.batch_crops)
            for i in idx:
                img, lab = self.store.view(int(i))
                imgs.append(img)
                labs.append(lab)
            x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().contiguous()
            emb = torch.cat([self.store.get(int(i)) for i in idx])
            return x.to(self.device), labs, emb.to(self.device)
        if self.pool is None:
            crops = [
                seeded_crop(self.train_samples, seed, self.cfg.crop, self.aug, require_objects=True)
                for seed in self._seeds(self.step)
            ]
        else:
            # the next step's batch is made by the workers while this step runs
            if self.pending is None or self.pending[0] != self.step:
                self.pending = (self.step, self.pool.map_async(_worker_crop, self._seeds(self.step)))
            crops = self.pending[1].get()
            self.pending = (self.step + 1, self.pool.map_async(_worker_crop, self._seeds(self.step + 1)))
        x = torch.from_numpy(np.stack([c[0] for c in crops])).permute(0, 3, 1, 2).float().contiguous()
        return x.to(self.device), [c[1] for c in crops], None

    def _seeds(self, step: int) -> list[list[int]]:
        """The crop seeds of a step: derived from the run's seed and the step, not drawn,
        so that prefetching, the worker count and resuming change nothing."""
        return [[self.cfg.seed, step, j] for j in range(self.cfg.batch_crops)]

    def close(self) -> None:
        """Stop the crop workers (``run`` does this when it ends)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None
            self.pending = None

    def _objects(self, lab: np.ndarray) -> torch.Tensor | None:
        ids, counts = np.unique(lab, return_counts=True)
        usable = (ids > 0) & (counts >= self.cfg.min_object_area)
        keep, area = ids[usable], counts[usable]
        if len(keep) == 0:
            return None
        if len(keep) > self.cfg.objects_per_crop:
            p = None
            if self.cfg.small_object_boost != 1.0:
                p = np.where(area < self.cfg.small_object_area, self.cfg.small_object_boost, 1.0)
                p = p / p.sum()
            keep = self.rng.choice(keep, self.cfg.objects_per_crop, replace=False, p=p)
        return torch.from_numpy(lab[None] == keep[:, None, None])

    def _mask_losses(self, logits: torch.Tensor, iou_pred: torch.Tensor, gt: torch.Tensor):
        """logits (N, T, h, w) low-res, gt (N, H, W) bool -> per-mask loss (N, T), IoU loss
        (N, T) and actual IoU (N, T)."""
        up = F.interpolate(logits, size=gt.shape[-2:], mode="bilinear", align_corners=False)
        target = gt[:, None].float().expand_as(up)
        seg = self.cfg.w_focal * focal_loss(up, target) + self.cfg.w_dice * dice_loss(up, target)
        actual = mask_iou(up.detach() > 0, target > 0.5)
        iou_l = (iou_pred - actual) ** 2
        return seg, iou_l, actual, up

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp)

    def _gather_objects(self, labs: list[np.ndarray | None]):
        """The objects of every crop of the batch as one set: masks (N, crop, crop), the
        crop each comes from (N,), each object's pixel offset (x, y) on the model's canvas
        (N, 2), and each crop's place (b, oy, ox) in grid cells. The crop is placed at a
        random cell offset so that the decoder sees the positional encodings of a full-size
        input."""
        grid = self.cfg.crop // 16
        n_cells = self.model.img_size // 16 - grid
        gts, owner, offsets, cells = [], [], [], []
        for b, lab in enumerate(labs):
            gt = self._objects(lab) if lab is not None else None
            if gt is None:
                continue
            oy, ox = (int(v) for v in self.rng.integers(0, n_cells + 1, size=2))
            gts.append(gt)
            owner += [b] * gt.shape[0]
            offsets += [(ox * 16.0, oy * 16.0)] * gt.shape[0]
            cells.append((b, oy, ox))
        if not gts:
            return None
        dev = self.device
        return (torch.cat(gts).to(dev), torch.tensor(owner, device=dev), torch.tensor(offsets, device=dev), cells)

    @staticmethod
    def _object_pe(pe: torch.Tensor, cells, owner: torch.Tensor, batch: int, grid: int) -> torch.Tensor:
        """Each object's window (N, C, grid, grid) of the full positional encoding."""
        per_crop = pe.new_zeros(batch, pe.shape[1], grid, grid)
        for b, oy, ox in cells:
            per_crop[b] = pe[0, :, oy : oy + grid, ox : ox + grid]
        return per_crop[owner]

    def train_step(self) -> dict[str, float]:
        cfg, model, dev = self.cfg, self.model, self.device
        x, labs, teacher_emb = self._crop_batch()
        grid = cfg.crop // 16
        with self._autocast():
            emb = model.image_encoder((x - model.pixel_mean) / model.pixel_std)
        emb = emb.float()
        terms: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor) -> None:
            terms[name] = terms.get(name, 0.0) + value

        if teacher_emb is not None:
            add("embedding", cfg.w_embedding * embedding_l1(emb, teacher_emb))
        rounds = int(self.rng.integers(0, cfg.max_rounds + 1)) if cfg.hard_prompts else 0
        n_masks = 0
        objects = self._gather_objects(labs)
        if objects is not None:
            gt_all, owner_all, offset_all, cells = objects
            pe_all = self._object_pe(model.prompt_encoder.get_dense_pe(), cells, owner_all, len(labs), grid)
            if self.teacher is not None:
                t_pe_all = self._object_pe(
                    self.teacher.prompt_encoder.get_dense_pe(), cells, owner_all, len(labs), grid
                )
            use_box = torch.rand(gt_all.shape[0], generator=self.gen, device=dev) < cfg.box_fraction
            for group, is_box in ((~use_box, False), (use_box, True)):
                if not group.any():
                    continue
                g, owner, offset, pe = gt_all[group], owner_all[group], offset_all[group], pe_all[group]
                n = g.shape[0]
                ar = torch.arange(n, device=dev)
                coords = torch.zeros(n, 0, 2, device=dev)
                labels = torch.zeros(n, 0, device=dev)
                boxes = None
                if is_box:
                    boxes = jitter_boxes(boxes_from_masks(g), g.shape[-2:], generator=self.gen) + offset.repeat(1, 2)
                else:
                    coords = (sample_points_in(g, self.gen) + offset)[:, None]
                    labels = torch.ones(n, 1, device=dev)
                mask_in = None
                for r in range(rounds + 1):
                    pts = (coords, labels) if coords.shape[1] else None
                    with self._autocast():
                        sparse, dense = model.prompt_encoder(pts, boxes, mask_in, (grid, grid))
                        logits, iou_pred, tokens = model.mask_decoder(emb[owner], pe, sparse, dense, return_tokens=True)
                    logits, iou_pred, tokens = logits.float(), iou_pred.float(), tokens.float()
                    single = is_box or r > 0
                    sel = slice(0, 1) if single else slice(1, None)
                    seg, iou_l, actual, up = self._mask_losses(logits[:, sel], iou_pred[:, sel], g)
                    best = seg.detach().argmin(1)
                    add("mask", seg[ar, best].sum())
                    add("iou", cfg.w_iou * iou_l.mean(1).sum())
                    n_masks += n
                    if self.teacher is not None:
                        with torch.no_grad(), self._autocast():
                            t_logits, _, t_tokens = self.teacher.mask_decoder(
                                teacher_emb[owner],
                                t_pe_all[group],
                                *self.teacher.prompt_encoder(pts, boxes, mask_in, (grid, grid)),
                                return_tokens=True,
                            )
                        t_logits, t_tokens = t_logits.float(), t_tokens.float()
                        t_up = F.interpolate(t_logits[:, sel], size=g.shape[-2:], mode="bilinear", align_corners=False)
                        t_iou = mask_iou(t_up > 0, g[:, None].expand_as(t_up))
                        h = hard_mask_weight(t_iou, actual)
                        add("tokens", cfg.w_tokens * token_l1(tokens, t_tokens) * n)
                        add("logits", cfg.w_logits * weighted_logit_l1(logits[:, sel], t_logits[:, sel], h) * n)
                    if r == rounds:
                        break
                    chosen_low = logits[ar, (best if not single else torch.zeros_like(best)) + sel.start]
                    pred = up[ar, best].detach() > 0
                    new_c, new_l = sample_error_points(pred, g, self.gen, cfg.center_fraction)
                    coords = torch.cat([coords, (new_c + offset)[:, None]], 1)
                    labels = torch.cat([labels, new_l[:, None]], 1)
                    mask_in = chosen_low.detach()[:, None]
        loss = sum(v / max(1, n_masks) if k != "embedding" else v for k, v in terms.items())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.opt.step()
        self.step += 1
        out = {
            k: float(v.detach() if torch.is_tensor(v) else v) / (1 if k == "embedding" else max(1, n_masks))
            for k, v in terms.items()
        }
        out["loss"] = float(loss.detach())
        out["rounds"] = rounds
        return out

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        self.model.eval()
        try:
            res = evaluate_prompts(self.model, self.val_samples, max_objects=self.cfg.val_objects)
        finally:
            self.model.train()
        res["step"] = self.step
        self.history.append(res)
        # the three protocols of the quality benchmark weigh equally in model selection
        score = (res["click"] + res["box"] + res["click3"]) / 3
        if score > self.best["score"]:
            self.best = {"score": score, **res}
            self.export(self.out / "best.pt")
        return res

    def export(self, path: Path, half: bool = False) -> None:
        meta = {
            "train_images": self.cfg.train_images,
            "val_images": self.cfg.val_images,
            "steps": self.step,
            "teacher": self.cfg.teacher,
            "recipe": asdict(self.cfg),
            "validation": self.history[-1] if self.history else None,
            "date": time.strftime("%Y-%m-%d"),
        }
        was_training = self.model.training
        self.model.eval()
        save_checkpoint(self.model, path, meta=meta, half=half)
        self.model.train(was_training)

    # -- loop ---------------------------------------------------------------------------
    def run(self, progress: bool = True, stop_after: int | None = None) -> Sam:
        try:
            return self._run(progress, stop_after)
        finally:
            self.close()

    #: a budgeted run times its steps after the first WARMUP_STEPS (compilation, caches,
    #: GPU clocks) and fits the step count at these steps: early, then again once the
    #: timing has settled (the early estimate under-used a GPU budget by a quarter)
    WARMUP_STEPS = 5
    FIT_AT = (25, 125)

    def _fit_steps(self, elapsed: float, step_seconds: float, val_seconds: float) -> int:
        """The step count that ends a fresh run inside ``cfg.minutes``: the time left over
        the measured cost of a step (plus its share of the validations), 3% held back for
        checkpoints and the final export."""
        left = 0.97 * 60 * self.cfg.minutes - elapsed
        per_step = step_seconds + (val_seconds / self.cfg.val_every if self.val_samples else 0.0)
        return self.step + max(1, int(left / per_step))

    def _run(self, progress: bool, stop_after: int | None) -> Sam:
        torch.set_num_threads(self.cfg.threads)
        started = time.time()
        resumed = self.try_resume()
        # a budgeted run times itself unless it resumes with a step count already fitted
        budget = self.cfg.minutes is not None and (not resumed or self.cfg.steps >= UNFITTED)
        last_ckpt = time.time()
        val_seconds = 0.0
        if budget and self.val_samples and not resumed:
            t0 = time.time()
            res = self.validate()
            val_seconds = time.time() - t0
            self.log(f"step 0: {_val_line(res)} ({val_seconds:.1f} s)")
        if budget:
            self.cfg.steps = UNFITTED  # until the timing below fixes it
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", mininterval=5)
        done_here = 0
        step_time, timed = 0.0, 0  # train-step seconds after warm-up (budgeted runs)
        while self.step < self.cfg.steps:
            t_step = time.time()
            terms = self.train_step()
            done_here += 1
            if budget and done_here > self.WARMUP_STEPS:
                step_time += time.time() - t_step
                timed += 1
                if done_here in self.FIT_AT:
                    self.cfg.steps = self._fit_steps(time.time() - started, step_time / timed, val_seconds)
                    self.log(
                        f"{step_time / timed * 1000:.0f} ms per step: {self.cfg.steps} steps fit {self.cfg.minutes} min"
                    )
                    if bar is not None:
                        bar.total = self.cfg.steps
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items() if k != "rounds"}, refresh=False)
            if self.val_samples and (self.step % self.cfg.val_every == 0 or self.step == self.cfg.steps):
                t0 = time.time()
                res = self.validate()
                val_seconds = time.time() - t0
                self.log(f"step {self.step}: {_val_line(res)}")
            if time.time() - last_ckpt > 60 * self.cfg.checkpoint_minutes or self.step == self.cfg.steps:
                self.save_state()
                last_ckpt = time.time()
            if stop_after is not None and done_here >= stop_after:
                self.save_state()
                break
        if bar is not None:
            bar.close()
        self.export(self.out / "final.pt")
        return self.model
