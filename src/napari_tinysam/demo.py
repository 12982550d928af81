"""The headless demo: load a model, embed the sample, segment one click, write an
overlay PNG and print timings."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from .bench import print_table
from .evaluation import innermost_point
from .everything import default_mode, segment_everything
from .metrics import match_instances
from .predictor import SamPredictor, to_uint8_rgb
from .weights import load_model


def overlay(image_rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Colour each label id over a uint8 RGB image: (H, W, 3) uint8."""
    rng = np.random.default_rng(1)
    colours = rng.integers(40, 256, size=(int(labels.max()) + 1, 3)).astype(np.float32)
    out = image_rgb.astype(np.float32)
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[labels[fg]]
    return out.astype(np.uint8)


def run_demo(model_name: str, out_dir: Path, image: np.ndarray, labels: np.ndarray, precision: str = "auto") -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    t0 = time.perf_counter()
    model = load_model(model_name, precision=precision)
    timings.append(
        {
            "step": f"load model {model_name!r} (img_size {model.img_size}, {model.precision})",
            "ms": f"{(time.perf_counter() - t0) * 1e3:.0f}",
        }
    )
    pred = SamPredictor(model)
    t0 = time.perf_counter()
    pred.set_image(image)
    timings.append(
        {"step": f"embed {image.shape[0]}x{image.shape[1]} image", "ms": f"{(time.perf_counter() - t0) * 1e3:.0f}"}
    )
    # click at the innermost point of the largest nucleus of the sample
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    target = labels == ids[np.argmax(counts)]
    x, y = innermost_point(target)
    t0 = time.perf_counter()
    masks, iou, _ = pred.predict(np.array([[x, y]]), np.array([1]))
    timings.append({"step": f"click at ({x:.0f}, {y:.0f})", "ms": f"{(time.perf_counter() - t0) * 1e3:.1f}"})
    best = int(np.argmax(iou))
    mask = masks[best]
    inter = np.logical_and(mask, target).sum()
    union = np.logical_or(mask, target).sum()
    rgb = to_uint8_rgb(image)
    result = {"click_iou_vs_ground_truth": float(inter / union), "predicted_iou": float(iou[best])}
    Image.fromarray(overlay(rgb, mask.astype(np.int32))).save(out_dir / "click.png")
    t0 = time.perf_counter()
    lab = segment_everything(pred, image)  # the model's default mode and tuned thresholds
    mode = default_mode(model)
    timings.append(
        {"step": f"everything mode ({mode}, embedding cached)", "ms": f"{(time.perf_counter() - t0) * 1e3:.0f}"}
    )
    Image.fromarray(overlay(rgb, lab)).save(out_dir / "everything.png")
    result["everything_objects"] = int(lab.max())
    f = match_instances(lab, labels)
    result["everything_f1_at_0.5_vs_ground_truth"] = f["f1"]
    print_table(timings, ["step", "ms"])
    print()
    for k, v in result.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    print(
        "(the sample is a BBBC039 training field of the bundled model: these scores show that it "
        "works, not how well it generalises; held-out numbers are in docs/benchmarks.md)"
    )
    print(f"wrote {out_dir}/click.png and {out_dir}/everything.png")
    return result
