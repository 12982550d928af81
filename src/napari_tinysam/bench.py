"""Speed measurements printed as tables (``napari-tinysam bench``; ``benchmarks/``)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Collection

import numpy as np
import torch

from .model import Sam, architecture_config, build_sam
from .model.transformer import Attention as TwoWayAttention
from .predictor import SamPredictor, compute_embedding, to_uint8_rgb


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1, self_timed: Collection[str] = ()
) -> dict[str, float]:
    """Median wall time in seconds of each of ``fns``, timed in turns (one call of each per
    round, ``repeats`` rounds after ``warmup``): on a shared host whose speed drifts
    within minutes, every implementation then sees the same conditions and their ratios
    hold, where timing one after the other would compare different hours. The functions
    named in ``self_timed`` return their own time (a call in another process)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            times[name].append(float(out) if name in self_timed else time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_name() -> str:
    """The CPU's model name (benchmark tables say which machine they came from)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_table(rows: list[dict], columns: list[str]) -> str:
    """Format rows as a Markdown table (also returned)."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)) + " |")
    text = "\n".join(lines)
    print(text)
    return text


@torch.no_grad()
def core_benchmark(
    image: np.ndarray, model_1024: Sam | None = None, default_model: Sam | None = None, repeats: int = 5
) -> list[dict]:
    """Embedding time at 1024x1024 and click latency (prompt -> full-size masks) on
    ``image``, with the reference's mask upscaling as the in-run baseline."""
    torch.set_grad_enabled(False)
    rows = []
    model = model_1024 or build_sam(architecture_config("vit_t", 1024)).eval()
    rgb = to_uint8_rgb(image)
    square = np.ascontiguousarray(np.resize(rgb, (1024, 1024, 3)))
    t, _ = median_time(lambda: compute_embedding(model, square), repeats)
    rows.append({"measure": f"embedding 1024x1024 (vit_t, {model.precision})", "median_ms": f"{t * 1e3:.0f}"})
    pred = SamPredictor(model)
    pred.set_image(rgb)
    h, w = rgb.shape[:2]
    pt = np.array([[w * 0.4, h * 0.6]])
    lab = np.array([1])
    TwoWayAttention.reassociate = False
    try:
        t_ref, _ = median_time(lambda: pred.predict(pt, lab), repeats * 4)
    finally:
        TwoWayAttention.reassociate = True
    t_click, _ = median_time(lambda: pred.predict(pt, lab), repeats * 4)
    rows.append(
        {
            "measure": f"click {h}x{w}, textbook decoder attention (baseline, same run)",
            "median_ms": f"{t_ref * 1e3:.1f}",
            "ratio": "1.00x",
        }
    )
    rows.append(
        {"measure": f"click {h}x{w}, ours", "median_ms": f"{t_click * 1e3:.1f}", "ratio": f"{t_ref / t_click:.2f}x"}
    )
    if default_model is not None:
        pred_d = SamPredictor(default_model)
        t_emb, _ = median_time(lambda: compute_embedding(default_model, rgb), repeats)
        pred_d.set_image(rgb)
        t_c, _ = median_time(lambda: pred_d.predict(pt, lab), repeats * 4)
        s = default_model.img_size
        rows.append({"measure": f"default model: embedding {h}x{w} at {s}", "median_ms": f"{t_emb * 1e3:.0f}"})
        rows.append({"measure": f"default model: click {h}x{w}", "median_ms": f"{t_c * 1e3:.1f}"})
    return rows
