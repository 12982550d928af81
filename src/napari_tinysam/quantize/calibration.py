"""Calibration: recording the layers' inputs on images with prompts, and the alternating
grid search of every scale (plain or Hessian-guided distance)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model import Sam
from .simulated import LEVELS, QConv, QLinear, QMatMul, prepare, quant_layers


# -- calibration data -------------------------------------------------------------------
@dataclass
class _Capture:
    """Sampled inputs, float outputs and output gradients of one layer."""

    inputs: list[list[torch.Tensor]]
    outputs: list[torch.Tensor]
    grads: dict[int, torch.Tensor]  # by sample index (backward visits calls in reverse)


class _Recorder:
    """Forward hooks that keep a random subsample of every quantizable layer's inputs and
    float outputs, and tensor hooks that keep the matching output gradients."""

    def __init__(self, model: nn.Module, max_rows: int, crop: int, seed: int) -> None:
        self.captures: dict[str, _Capture] = {}
        self.max_rows, self.crop = max_rows, crop
        self.gen = torch.Generator().manual_seed(seed)
        self.handles = []
        for name, m in quant_layers(model):
            self.captures[name] = _Capture([], [], {})
            self.handles.append(m.register_forward_hook(self._hook(name, m)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _pick(self, n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen)[: min(n, k)]

    def _hook(self, name: str, m: nn.Module) -> Callable:
        cap = self.captures[name]

        def hook(module, args, out):
            if isinstance(m, QLinear):
                x = args[0].reshape(-1, args[0].shape[-1])
                idx = self._pick(x.shape[0], self.max_rows)
                sel = lambda t: t.reshape(-1, t.shape[-1])[idx]  # noqa: E731
                cap.inputs.append([x[idx].detach()])
            elif isinstance(m, QMatMul):
                a, b = args
                per_item = max(a[0].numel(), b[0].numel(), out[0].numel())
                idx = self._pick(out.shape[0], max(1, self.max_rows * 256 // per_item))
                sel = lambda t: t[idx]  # noqa: E731
                cap.inputs.append([_take(a, idx).detach(), _take(b, idx).detach()])
            else:  # QConv: a spatial crop of the output and the input that produces it
                idx = self._pick(out.shape[0], 2)  # decoder convolutions see every prompt
                x = args[0][idx]
                y0, x0, ys, xs = self._crop_window(m, out.shape[-2:])
                # clone: a window is a view that would keep the whole feature map alive
                cap.inputs.append([_conv_input_crop(m, x, y0, x0, ys, xs).detach().clone()])
                sel = lambda t: t[idx][..., y0 : y0 + ys, x0 : x0 + xs].clone()  # noqa: E731
            k = len(cap.outputs)
            cap.outputs.append(sel(out).detach())
            if out.requires_grad:
                out.register_hook(lambda g: cap.grads.__setitem__(k, sel(g).detach()))

        return hook

    def _crop_window(self, m: QConv, hw) -> tuple[int, int, int, int]:
        h, w = int(hw[0]), int(hw[1])
        c = self.crop * (2 if m.transposed else 1)
        ys, xs = min(h, c), min(w, c)
        if m.transposed:  # keep the crop aligned to the stride
            s = m.stride[0]
            y0 = int(torch.randint(0, (h - ys) // s + 1, (1,), generator=self.gen)) * s
            x0 = int(torch.randint(0, (w - xs) // s + 1, (1,), generator=self.gen)) * s
        else:
            y0 = int(torch.randint(0, h - ys + 1, (1,), generator=self.gen))
            x0 = int(torch.randint(0, w - xs + 1, (1,), generator=self.gen))
        return y0, x0, ys, xs


def _consolidate(cap: _Capture, budget: int, gen: torch.Generator) -> _Capture:
    """Concatenate samples of equal trailing shapes along the batch axis, so that each
    candidate scale costs a few large kernel calls rather than many small ones, and keep a
    random subset of at most ``budget`` elements of the largest operand."""
    groups: dict[tuple, list[int]] = {}
    for i, (ins, out) in enumerate(zip(cap.inputs, cap.outputs)):
        key = tuple(tuple(t.shape[1:]) for t in ins) + (tuple(out.shape[1:]),)
        groups.setdefault(key, []).append(i)
    merged = _Capture([], [], {})
    for idx in groups.values():
        n_in = len(cap.inputs[idx[0]])
        merged.inputs.append([torch.cat([cap.inputs[i][k] for i in idx]) for k in range(n_in)])
        merged.outputs.append(torch.cat([cap.outputs[i] for i in idx]))
        if all(i in cap.grads for i in idx):
            merged.grads[len(merged.outputs) - 1] = torch.cat([cap.grads[i] for i in idx])
    for j, out in enumerate(merged.outputs):
        per_item = max(t[0].numel() for t in [*merged.inputs[j], out])
        keep = max(1, budget // per_item)
        if out.shape[0] > keep:
            sub = torch.randperm(out.shape[0], generator=gen)[:keep]
            merged.inputs[j] = [t[sub] for t in merged.inputs[j]]
            merged.outputs[j] = out[sub]
            if j in merged.grads:
                merged.grads[j] = merged.grads[j][sub]
    return merged


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The sampled batch items of an operand; one shared by every prompt (batch 1) is
    broadcast to the sample's size."""
    return t.expand(len(idx), *t.shape[1:]) if t.shape[0] == 1 else t[idx]


def _conv_input_crop(m: QConv, x: torch.Tensor, y0: int, x0: int, ys: int, xs: int) -> torch.Tensor:
    """The input window (zero-padded as the layer pads) from which a padding-free
    convolution computes exactly the output window [y0, y0+ys) x [x0, x0+xs)."""
    if m.transposed:  # kernel == stride, no overlap: output window / stride
        s = m.stride[0]
        return x[..., y0 // s : (y0 + ys) // s, x0 // s : (x0 + xs) // s]
    k = m.weight.shape[-1]
    s, p = m.stride[0], m.padding[0]
    xp = F.pad(x, (p, p, p, p)) if p else x
    return xp[..., y0 * s : y0 * s + (ys - 1) * s + k, x0 * s : x0 * s + (xs - 1) * s + k]


# -- scale search -----------------------------------------------------------------------
def candidate_alphas(n: int = 100, low: float = 0.01, high: float = 1.2) -> torch.Tensor:
    return torch.linspace(low, high, n)


def _group_reduce(err: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Sum an elementwise error over everything but ``dim`` (None: to a scalar)."""
    if dim is None:
        return err.sum()
    return err.transpose(0, dim).reshape(err.shape[dim], -1).sum(1)


@dataclass
class _Operand:
    """One searchable scale of a layer: its per-group maxima, the output dim its groups map
    to (None: per tensor), and how to write a scale into the layer."""

    amax: torch.Tensor
    out_dim: int | None
    set_scale: Callable[[torch.Tensor], None]


def _operands(m: nn.Module, samples: _Capture) -> tuple[list[_Operand], Callable]:
    """The searchable scales of layer ``m`` and ``make_eval(j)``: a function computing the
    layer's quantized outputs on every captured sample while only operand ``j`` changes
    (the other operand is quantized once, outside the candidate loop)."""
    if isinstance(m, QMatMul):
        acts = (m.act_a, m.act_b)
        ops = []
        for i, act in enumerate(acts):
            per_head = act.scale.dim() == 4
            amax = _act_amax(act.kind, [p[i] for p in samples.inputs], per_head)
            ops.append(
                _Operand(amax, 1 if per_head else None, (lambda a: lambda s: a.scale.copy_(s.view_as(a.scale)))(act))
            )

        def make_eval(j: int) -> Callable[[], list[torch.Tensor]]:
            other = 1 - j
            frozen = [acts[other](p[other]) for p in samples.inputs]
            if j == 0:
                return lambda: [torch.matmul(m.act_a(p[0]), f) for p, f in zip(samples.inputs, frozen)]
            return lambda: [torch.matmul(f, m.act_b(p[1])) for p, f in zip(samples.inputs, frozen)]

        return ops, make_eval

    xs = [s[0] for s in samples.inputs]
    if isinstance(m, QLinear):
        w_ops = _Operand(m.weight.abs().amax().reshape(()), None, lambda s: m.w_scale.copy_(s))
        apply = lambda x, w: F.linear(x, w, m.bias)  # noqa: E731
    else:
        dims = (0, 2, 3) if m.transposed else (1, 2, 3)
        w_ops = _Operand(m.weight.abs().amax(dim=dims), 1, lambda s: m.w_scale.copy_(s))
        pad = m.padding if m.transposed else 0  # the captured inputs are padded already
        apply = lambda x, w: m.conv(x, w, padding=pad)  # noqa: E731
    ops = [w_ops, _Operand(_act_amax(m.act.kind, xs), None, lambda s: m.act.scale.copy_(s))]

    def make_eval(j: int) -> Callable[[], list[torch.Tensor]]:
        if j == 0:
            xq = [m.act(x) for x in xs]
            return lambda: [apply(x, m.weight_q()) for x in xq]
        wq = m.weight_q()
        return lambda: [apply(m.act(x), wq) for x in xs]

    return ops, make_eval


def _act_amax(kind: str, xs: list[torch.Tensor], per_head: bool = False) -> torch.Tensor:
    if kind == "softmax":
        return torch.ones(xs[0].shape[1]) if per_head else torch.ones(())
    if per_head:
        return torch.stack([x.abs().transpose(0, 1).reshape(x.shape[1], -1).amax(1) for x in xs]).amax(0)
    return torch.stack([x.abs().amax() for x in xs]).amax()


def search_scales(
    m: nn.Module,
    samples: _Capture,
    distance: str = "l2",
    alphas: torch.Tensor | None = None,
    rounds: int = 3,
) -> float:
    """Alternating grid search of the scales of layer ``m`` on its captured samples
    (in place). Returns the final distance relative to that of no quantization's output
    energy (a diagnostic)."""
    alphas = candidate_alphas() if alphas is None else alphas
    ops, make_eval = _operands(m, samples)
    ys = samples.outputs
    if distance == "hessian":
        if len(samples.grads) != len(ys):
            raise RuntimeError("Hessian-guided search needs output gradients of every sample")
        ws = [samples.grads[i].square() for i in range(len(ys))]
        if not any(bool(w.any()) for w in ws):  # the output does not reach the loss
            ws = [None] * len(ys)
    elif distance in ("l2", "mse"):
        ws = [None] * len(ys)
    else:
        raise ValueError(f"unknown distance {distance!r}: use 'hessian' or 'l2'")

    def err(run: Callable, dim: int | None) -> torch.Tensor:
        total = None
        for out, y, w in zip(run(), ys, ws):
            e = (out - y).square()
            if w is not None:
                e = e * w
            r = _group_reduce(e, dim)
            total = r if total is None else total + r
        return total

    for op in ops:  # start from the max scales
        op.set_scale(op.amax / LEVELS)
    for _ in range(rounds):
        for j, op in enumerate(ops):
            run = make_eval(j)
            best_err = torch.full(op.amax.shape, float("inf"))
            best = op.amax / LEVELS
            for a in alphas:
                s = (a * op.amax / LEVELS).clamp_min(1e-12)
                op.set_scale(s)
                e = err(run, op.out_dim)
                better = e < best_err
                best_err = torch.where(better, e, best_err)
                best = torch.where(better, s, best)
            op.set_scale(best)
    final = float(err(make_eval(0), None))
    energy = sum(float(((y.square() * w) if w is not None else y.square()).sum()) for y, w in zip(ys, ws))
    return final / max(energy, 1e-30)


# -- calibration ------------------------------------------------------------------------
def _task_loss(logits: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """The loss whose gradient weights the Hessian-guided distance. At the float model the
    KL between float and quantized outputs has zero gradient, so (as PTQ4ViT does with
    class labels) the float model's own decisions serve as targets: binary cross-entropy of
    every mask logit against the float mask, and cross-entropy of the IoU head against the
    float model's choice of mask."""
    target = (logits.detach() > 0).float()
    mask_term = F.binary_cross_entropy_with_logits(logits, target, reduction="mean")
    iou_term = F.cross_entropy(iou, iou.detach().argmax(1))
    return mask_term + 0.1 * iou_term


def calibration_prompts(
    labels: np.ndarray | None, shape: tuple[int, int], n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts like in training, in original-image pixels: a random point inside each of up
    to ``n`` objects and their boxes (jittered by up to 10% of their size); without labels,
    random points and random boxes."""
    h, w = shape
    if labels is not None and labels.max() > 0:
        ids = np.unique(labels[labels > 0])
        ids = rng.choice(ids, min(n, len(ids)), replace=False)
        pts, boxes = [], []
        for i in ids:
            ys, xs = np.nonzero(labels == i)
            k = rng.integers(len(ys))
            pts.append([xs[k], ys[k]])
            x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
            jit = rng.uniform(-0.1, 0.1, 4) * np.tile([x1 - x0 + 1, y1 - y0 + 1], 2)
            boxes.append(np.clip([x0 + jit[0], y0 + jit[1], x1 + jit[2], y1 + jit[3]], 0, np.tile([w - 1, h - 1], 2)))
        return np.asarray(pts, np.float32), np.asarray(boxes, np.float32)
    pts = rng.uniform([0, 0], [w - 1, h - 1], (n, 2)).astype(np.float32)
    c = rng.uniform([0, 0], [w - 1, h - 1], (n, 2))
    half = rng.uniform(8, max(9, min(h, w) / 8), (n, 2))
    boxes = np.clip(np.concatenate([c - half, c + half], 1), 0, np.tile([w - 1, h - 1], 2)).astype(np.float32)
    return pts, boxes


def record_calibration(
    qmodel: Sam,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None] | None = None,
    prompts_per_image: int = 16,
    max_rows: int = 512,
    crop: int = 16,
    seed: int = 0,
) -> dict[str, _Capture]:
    """Run the (not yet calibrated, hence float) prepared model on calibration images and
    prompts, keeping samples of every layer's inputs, outputs and output gradients."""
    from ..predictor import preprocess_shape, resize_longest_side, to_uint8_rgb

    labels = labels or [None] * len(images)
    rng = np.random.default_rng(seed)
    # the sample budget is per layer over all images, so that calibration cost does not
    # grow with the number of images
    n = max(1, len(images))
    rec = _Recorder(qmodel, max(16, max_rows // n), max(4, round(crop * math.sqrt(2 / max(n, 2)))), seed)
    # gradients must reach every layer's output, also those that only see prompt tokens
    qmodel.requires_grad_(True)
    try:
        for img, lab in zip(images, labels):
            rgb = to_uint8_rgb(img)
            resized = resize_longest_side(rgb, qmodel.img_size, qmodel.max_upscale)
            x = torch.from_numpy(np.array(resized, copy=True)).permute(2, 0, 1)[None].float()
            x.requires_grad_(True)
            with torch.enable_grad():
                emb = qmodel.embed(x)
                h, w = rgb.shape[:2]
                nh, nw = preprocess_shape(h, w, qmodel.img_size, qmodel.max_upscale)
                scale = torch.tensor([nw / w, nh / h])
                pts, boxes = calibration_prompts(lab, (h, w), prompts_per_image, rng)
                p = torch.from_numpy(pts) * scale
                b = torch.from_numpy(boxes).view(-1, 2, 2).mul(scale).view(-1, 4)
                lp, ip = qmodel.decode(emb, points=(p[:, None], torch.ones(len(p), 1)))
                lb, ib = qmodel.decode(emb, boxes=b)
                # a second round as in interactive use: the chosen mask fed back as input
                best = ip[:, 1:].argmax(1) + 1
                prev = lp[torch.arange(len(p)), best][:, None].detach().requires_grad_(True)
                lm, im = qmodel.decode(emb, points=(p[:, None], torch.ones(len(p), 1)), mask_input=prev)
                loss = _task_loss(lp, ip) + _task_loss(lb, ib) + _task_loss(lm, im)
                if qmodel.has_instance_head:  # quantized like the rest: its layers need samples
                    loss = loss + qmodel.instance_maps(emb).square().mean()
                loss.backward()
    finally:
        rec.remove()
        qmodel.requires_grad_(False)
        qmodel.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(seed)
    return {name: _consolidate(cap, max_rows * 512, gen) for name, cap in rec.captures.items()}


def calibrate(
    qmodel: Sam,
    captures: dict[str, _Capture],
    distance: str = "l2",
    rounds: int = 3,
    n_alphas: int = 100,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, float]:
    """Search the scales of every layer of a prepared model (in place) from recorded
    calibration data; returns each layer's relative output error."""
    alphas = candidate_alphas(n_alphas)
    report = {}
    layers = quant_layers(qmodel)
    with torch.no_grad():
        for i, (name, m) in enumerate(layers):
            if not captures[name].outputs:
                raise RuntimeError(f"calibration never ran layer {name}")
            report[name] = search_scales(m, captures[name], distance, alphas, rounds)
            if isinstance(m, (QLinear, QConv)):
                m.freeze()
            if progress is not None:
                progress(i + 1, len(layers), name)
    return report


def quantize_model(
    model: Sam,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None] | None = None,
    distance: str = "l2",
    twin: str = "auto",
    prompts_per_image: int = 16,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> Sam:
    """Prepare, record calibration data and search every scale: a simulated W8A8 model."""
    q = prepare(model, twin=twin)
    q.set_precision("fp32")  # calibrated and run in float32 around its integer products
    captures = record_calibration(q, images, labels, prompts_per_image, seed=seed)
    calibrate(q, captures, distance, progress=progress)
    q.quantization.update(distance=distance, calibration_images=len(images))
    return q
