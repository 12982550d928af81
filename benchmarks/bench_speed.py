"""Embedding and click speed against the public TinySAM reference in the same run, at
each precision (float32, bfloat16, and what ``precision="auto"`` picks on this CPU) and
with the compiled encoder (``compile=True``, its one-off compile time printed apart), with
peak memory of embedding and everything mode.

    .venv/bin/python benchmarks/bench_speed.py --reference /tmp/TinySAM \
        --weights ../shared/conformance/vit_t_perturbed_fp16.pt [--repeats 5]

The reference (github.com/xinghaochen/TinySAM, any checkout) runs in float32 as published.
Every implementation is loaded first and then timed in turns, one embedding (or click) of
each per round, so that a shared host's drifting speed does not tilt the ratios.
Peak memory is measured in a fresh process per row: the resident set's high-water mark
(VmHWM, reset after loading the model and one warm-up embedding) minus the resident set
at the reset, so one row's allocations do not hide another's. Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))


def _memory_child(model: str, precision: str, what: str, compiled: str = "eager") -> None:
    """Run one task after loading the model; print peak RSS growth in MB as JSON."""
    from napari_tinysam import load_model, samples, segment_everything
    from napari_tinysam.predictor import compute_embedding, to_uint8_rgb

    torch.set_num_threads(2)
    m = load_model(model, precision=precision, compile=compiled == "compiled")
    rgb = to_uint8_rgb(samples.nuclei_2d())

    def peak_rss_mb() -> float:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB -> MB

    def current_rss_mb() -> float:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    # A warm-up call, then reset the high-water mark to today's RSS (Linux: "5" > clear_refs).
    with torch.no_grad():
        compute_embedding(m, rgb)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = current_rss_mb()
    with torch.no_grad():
        if what == "embedding":
            compute_embedding(m, rgb)
        else:
            segment_everything(m, samples.nuclei_2d())
    print(json.dumps({"peak_mb": peak_rss_mb() - before}))


REF_OWN = "public reference (fp32), own process"
REF_HERE = "public reference (fp32), in this process"


def _reference_child(checkout: str, weights: str, threads: int) -> None:
    """Serve timed calls of the reference on stdin/stdout: ``embed``, ``rgb`` (set the
    field's image), ``click``; each answered with its wall time in seconds. A process of
    its own runs the reference as a user would, with the allocator as the process starts
    (this library tunes glibc's thresholds process-wide on its first embedding,
    ``runtime.tune_allocator``)."""
    from reference_tinysam import load_reference

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    rgb, square, pt, lab = _inputs()
    ref, RefPredictor = load_reference(checkout, weights)
    rp = RefPredictor(ref)
    calls = {
        "embed": lambda: rp.set_image(square),
        "rgb": lambda: rp.set_image(rgb),
        "click": lambda: rp.predict(pt, lab),
    }
    print("ready", flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        calls[line.strip()]()
        print(time.perf_counter() - t0, flush=True)


class _ReferenceProcess:
    """The reference in a child process (``_reference_child``): ``call(what)`` runs one
    call there and returns its wall time as the child measured it."""

    def __init__(self, checkout: str, weights: str, threads: int) -> None:
        cmd = [sys.executable, __file__, "--reference-child", checkout, weights, str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the reference process did not start (see its error above)")

    def call(self, what: str) -> float:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _inputs():
    """The benchmark's field (520x696 RGB), its 1024x1024 tiling and the click."""
    from napari_tinysam import samples
    from napari_tinysam.predictor import to_uint8_rgb

    rgb = to_uint8_rgb(samples.nuclei_2d())
    square = np.ascontiguousarray(np.resize(rgb, (1024, 1024, 3)))
    h, w = rgb.shape[:2]
    return rgb, square, np.array([[w * 0.4, h * 0.6]]), np.array([1])


def peak_memory(model: str, precision: str, what: str, compiled: bool = False) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", model, precision, what, "compiled" if compiled else "eager"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", help="a checkout of github.com/xinghaochen/TinySAM (baseline rows)")
    ap.add_argument(
        "--weights",
        default="../shared/conformance/vit_t_perturbed_fp16.pt",
        help="official vit_t-layout weights (both implementations load them)",
    )
    ap.add_argument("--model", default="default", help="model of the memory rows")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled-encoder row")
    ap.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--reference-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        _memory_child(*args.memory_child)
        return
    if args.reference_child:
        checkout, weights, threads = args.reference_child
        _reference_child(checkout, weights, int(threads))
        return

    from napari_tinysam import SamPredictor, load_model
    from napari_tinysam.bench import cpu_name, interleaved_medians, print_table
    from napari_tinysam.precision import native_bf16, resolve_precision
    from napari_tinysam.predictor import compute_embedding

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    rgb, square, pt, lab = _inputs()
    h, w = rgb.shape[:2]
    cpu = cpu_name()
    print(
        f"{cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"native bf16: {native_bf16()}; precision='auto' -> {resolve_precision('auto')}"
    )

    # every implementation is loaded first, then timed in turns (``interleaved_medians``);
    # the reference twice: in a process of its own, as a user runs it, and in this one,
    # where it shares the allocator settings this library applies
    embed_fns, clicks, set_images = {}, {}, []
    child = None
    if args.reference:
        from reference_tinysam import load_reference

        child = _ReferenceProcess(args.reference, args.weights, args.threads)
        embed_fns[REF_OWN] = lambda: child.call("embed")
        clicks[REF_OWN] = lambda: child.call("click")
        set_images.append(lambda _rgb: child.call("rgb"))
        ref, RefPredictor = load_reference(args.reference, args.weights)
        rp = RefPredictor(ref)
        embed_fns[REF_HERE] = lambda: rp.set_image(square)
        clicks[REF_HERE] = lambda: rp.predict(pt, lab)
        set_images.append(rp.set_image)
    runs = [("fp32", False), ("bf16", False)] + ([] if args.no_compile else [("bf16", True)])
    for precision, compiled in runs:
        m = load_model(args.weights, precision=precision, compile=compiled)
        pred = SamPredictor(m)
        if compiled:  # the one-off compilation, reported apart from the medians
            t0 = time.perf_counter()
            compute_embedding(m, square)
            print(f"compiling the encoder ({precision}): {time.perf_counter() - t0:.1f} s")
        name = f"ours, {precision}{', compiled encoder' if compiled else ''}"
        embed_fns[name] = lambda m=m: compute_embedding(m, square)
        clicks[name] = lambda pred=pred: pred.predict(pt, lab)
        set_images.append(pred.set_image)
    t_embed = interleaved_medians(embed_fns, args.repeats, self_timed=[REF_OWN])
    for set_image in set_images:
        set_image(rgb)
    t_click = interleaved_medians(clicks, args.repeats * 4, self_timed=[REF_OWN])
    if child is not None:
        child.close()
    timings = {name: (t_embed[name], t_click[name]) for name in embed_fns}
    base = timings.get(REF_OWN, timings["ours, fp32"])
    rows = [
        {
            "implementation": name,
            "embedding 1024 ms": f"{e * 1e3:.0f}",
            "vs baseline": f"{base[0] / e:.2f}x",
            f"click {h}x{w} ms": f"{c * 1e3:.1f}",
            "click vs baseline": f"{base[1] / c:.2f}x",
        }
        for name, (e, c) in timings.items()
    ]
    print()
    print_table(rows, list(rows[0]))
    if not args.no_memory:
        mem = []
        for precision, compiled in runs:
            mem.append(
                {
                    "precision": precision + (", compiled encoder" if compiled else ""),
                    "embedding peak MB": f"{peak_memory(args.model, precision, 'embedding', compiled):.0f}",
                    "everything peak MB": f"{peak_memory(args.model, precision, 'everything', compiled):.0f}",
                }
            )
        print(f"\npeak memory above the loaded model ({args.model}, one 520x696 field, default mode)")
        print_table(mem, list(mem[0]))


if __name__ == "__main__":
    main()
