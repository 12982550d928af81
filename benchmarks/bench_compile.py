"""Does ``torch.compile`` pay on this CPU? Eager against compiled (inductor, with
freezing) image encoder and mask decoder at fixed shapes, at float32 and bfloat16, in one
run: median times, the one-off compile time, and the compiled output's difference from
eager at the same precision.

    .venv/bin/python benchmarks/bench_compile.py \
        [--weights ../shared/conformance/vit_t_perturbed_fp16.pt] [--repeats 7]

The first call of a compiled module compiles it (the "compile s" columns). Inductor keeps
compiled code in an on-disk cache, so a later process compiles faster: with
``--second-process`` each precision runs twice and the second run's compile time is
reported as "... compile s, cached".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def measure(weights: str, precision: str, repeats: int, which: str) -> dict:
    """One precision, eager and compiled, in this process."""
    import torch._inductor.config as inductor_config

    from napari_tinysam import load_model, samples
    from napari_tinysam.bench import median_time
    from napari_tinysam.predictor import model_input, to_uint8_rgb

    inductor_config.freezing = True  # for the decoder compiled here (set_compiled sets its own)
    torch.set_grad_enabled(False)
    model = load_model(weights, precision=precision)
    rgb = to_uint8_rgb(samples.nuclei_2d())
    square = np.ascontiguousarray(np.resize(rgb, (model.img_size, model.img_size, 3)))
    x = model_input(model, square)
    row: dict = {"precision": precision}
    if which in ("encoder", "both"):
        ref = model.embed(x)
        t_eager, _ = median_time(lambda: model.embed(x), repeats)
        model.set_compiled(True)  # what load_model(compile=True) does
        t0 = time.perf_counter()
        out = model.embed(x)
        t_compile = time.perf_counter() - t0
        assert model.compiled, "compilation failed"
        t_comp, _ = median_time(lambda: model.embed(x), repeats)
        model.set_compiled(False)
        row.update(
            {
                "encoder eager ms": t_eager * 1e3,
                "encoder compiled ms": t_comp * 1e3,
                "encoder speedup": t_eager / t_comp,
                "encoder compile s": t_compile,
                "encoder rel diff": _rel(out, ref),
            }
        )
    if which in ("decoder", "both"):
        h, w = rgb.shape[:2]
        xx = model_input(model, rgb)
        emb = model.embed(xx)
        s = xx.shape[-2] / h
        pts = (torch.tensor([[[w * 0.4 * s, h * 0.6 * s]]]), torch.tensor([[1]]))
        # The click path runs the decoder in float32 (one prompt, see Sam.autocast).
        ref_low, _ = model.decode(emb, pts)
        t_eager, _ = median_time(lambda: model.decode(emb, pts), repeats * 4)
        eager = model.mask_decoder
        model.mask_decoder = torch.compile(eager)
        t0 = time.perf_counter()
        low, _ = model.decode(emb, pts)
        t_compile = time.perf_counter() - t0
        t_comp, _ = median_time(lambda: model.decode(emb, pts), repeats * 4)
        model.mask_decoder = eager
        row.update(
            {
                "decoder eager ms": t_eager * 1e3,
                "decoder compiled ms": t_comp * 1e3,
                "decoder speedup": t_eager / t_comp,
                "decoder compile s": t_compile,
                "decoder rel diff": _rel(low, ref_low),
            }
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="../shared/conformance/vit_t_perturbed_fp16.pt")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--which", choices=("encoder", "decoder", "both"), default="both")
    ap.add_argument(
        "--second-process",
        action="store_true",
        help="run each precision again in a new process (inductor's cache warm)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        import json

        print("ROW " + json.dumps(measure(args.weights, args.child, args.repeats, args.which)))
        return

    import json

    from napari_tinysam.bench import cpu_name, print_table

    cpu = cpu_name()
    print(f"{cpu}; torch {torch.__version__}, {args.threads} threads; weights {args.weights}")
    rows = []

    def child(precision: str) -> dict:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                precision,
                "--weights",
                args.weights,
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
                "--which",
                args.which,
            ],
            capture_output=True,
            text=True,
            env=dict(os.environ),
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            print(out.stdout[-3000:], out.stderr[-3000:])
            raise SystemExit(f"{precision}: the compiled run failed")
        return json.loads(line[4:])

    for precision in ("fp32", "bf16"):
        # A fresh process per precision: compiled graphs and caches do not leak across rows.
        r = child(precision)
        if args.second_process:
            again = child(precision)
            for part in ("encoder", "decoder"):
                if f"{part} compile s" in again:
                    r[f"{part} compile s, cached"] = again[f"{part} compile s"]
        rows.append({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items()})
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
