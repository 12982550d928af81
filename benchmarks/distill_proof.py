"""Distillation proof: the same narrow student, the same start, the same budget, three ways.

1. full-stage distillation from a teacher (embedding, token and hard-mask-weighted logit
   L1 terms) plus ground truth, with online hard prompt sampling;
2. ground truth only, with hard prompt sampling (`--teacher none`);
3. distillation without hard prompt sampling.

Reports val click, box and click + 3 corrective clicks mIoU of each student (BBBC039 val;
selection-free: the final checkpoint of each run is evaluated). Hard prompt sampling trains
the use of extra points and of the previous mask, which only the corrective protocol uses.

    .venv/bin/python benchmarks/distill_proof.py --teacher default --steps 300 --out runs/proof
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from napari_tinysam.bench import print_table
from napari_tinysam.distill import TrainConfig, Trainer
from napari_tinysam.distill.data import load_folder
from napari_tinysam.evaluation import evaluate_prompts
from napari_tinysam.model import architecture_config, build_sam, save_checkpoint
from napari_tinysam.weights import load_model

KD_TERMS = ("embedding", "tokens", "logits")  # the distillation terms whose weights are options


def half_width_student(img_size: int) -> dict:
    cfg = architecture_config("vit_t", img_size)
    cfg["image_encoder"].update(embed_dims=[32, 64, 80, 160], num_heads=[1, 2, 5, 5], num_classes=0)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/proof")
    ap.add_argument("--data", default=os.environ.get("TINYSAM_DATA_DIR", "../shared/data"))
    ap.add_argument("--val-fields", type=int, default=20)
    ap.add_argument("--val-objects", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--only",
        action="append",
        choices=["kd", "gt", "kd-no-hard"],
        help="run only these variants (repeatable; default: all three)",
    )
    defaults = TrainConfig(train_images="", out_dir="")
    for term in KD_TERMS:
        ap.add_argument(
            f"--w-{term}",
            type=float,
            default=getattr(defaults, f"w_{term}"),
            help=f"weight of the {term} distillation term (default: the trainer's)",
        )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_model(args.teacher)
    train = str(Path(args.data) / "bbbc039" / "train" / "images")
    val = load_folder(Path(args.data) / "bbbc039" / "val" / "images")[: args.val_fields]
    variants = {
        "distillation + hard prompts": dict(key="kd", teacher=teacher, hard_prompts=True),
        "ground truth + hard prompts": dict(key="gt", teacher=None, hard_prompts=True),
        "distillation, no hard prompts": dict(key="kd-no-hard", teacher=teacher, hard_prompts=False),
    }
    variants = {k: v for k, v in variants.items() if not args.only or v["key"] in args.only}
    weights = {f"w_{t}": getattr(args, f"w_{t}") for t in KD_TERMS}
    # Every student starts from the same point: a random half-width encoder and, where
    # the shapes allow (prompt encoder, mask decoder, the neck's last convolution), the
    # teacher's weights; the budget then goes to the encoder, which is what TinySAM distils.
    Path(args.out).mkdir(parents=True, exist_ok=True)
    init = Path(args.out) / "student_init.pt"
    torch.manual_seed(0)
    student = build_sam(half_width_student(teacher.img_size))
    own, src = student.state_dict(), teacher.state_dict()
    copied = {
        k: src[k]
        for k in own
        if k in src
        and src[k].shape == own[k].shape
        and not k.startswith("image_encoder.layers")
        and not k.startswith("image_encoder.patch_embed")
    }
    student.load_state_dict({**own, **copied})
    save_checkpoint(student.eval(), init)
    print(
        f"student init: {len(copied)} of {len(own)} tensors from the teacher (prompt encoder, "
        "mask decoder, neck); the TinyViT stages random"
    )
    rows = []
    for name, v in variants.items():
        out = Path(args.out) / name.replace(" ", "_").replace(",", "").replace("+", "plus")
        cfg = TrainConfig(
            train_images=train,
            out_dir=str(out),
            student=str(init),
            teacher=None if v["teacher"] is None else args.teacher,
            img_size=teacher.img_size,
            scale=teacher.img_size / 696,
            max_rounds=2,
            hard_prompts=v["hard_prompts"],
            steps=args.steps,
            lr=5e-4,
            warmup=min(100, args.steps // 5),
            val_every=10**9,
            teacher_store=str(Path(args.out) / "teacher_store"),
            threads=args.threads,
            **weights,
        )
        model = Trainer(cfg, teacher=v["teacher"]).run()
        res = evaluate_prompts(model.eval(), val, max_objects=args.val_objects, corrective_clicks=3)
        rows.append(
            {
                "student (half widths)": name,
                "steps": args.steps,
                "val click mIoU": f"{res['click']:.3f}",
                "val box mIoU": f"{res['box']:.3f}",
                "click + 3 corrective": f"{res['click3']:.3f}",
            }
        )
    print_table(rows, ["student (half widths)", "steps", "val click mIoU", "val box mIoU", "click + 3 corrective"])


if __name__ == "__main__":
    main()
