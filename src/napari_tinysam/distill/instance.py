"""Training the instance head on frozen image embeddings.

Training data is a weighted mixture of sources (folders of 2D images with instance
labels, or 3D stacks sliced along every axis). Fixed augmented views are embedded once by
the frozen encoder, exactly as inference embeds an image (unpadded crop, the model pads
it), and stored with their targets (``HeadStore``); the head then trains on the stored
embeddings for many epochs at a fraction of an encoder pass per view. Validation runs
the head-only segmentation on held-out folders and reports F1@0.5 per folder; the best
mean is kept. Runs checkpoint and resume.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..io import read_image
from ..model import Sam, save_checkpoint
from ..model.build import encoder_fingerprint
from ..model.instance_head import DEFAULT_HEAD, build_instance_head
from ..precision import autocast, resolve_precision
from .data import IMAGE_SUFFIXES, Augment, Sample, _resize, load_folder, seeded_crop
from .teacher import TeacherStore

#: Microscope augmentations used for the head (see ``Augment``).
HEAD_AUGMENT = dict(
    scale_jitter=0.75,
    gamma_jitter=0.4,
    contrast_jitter=2.0,
    noise=0.02,
    dim=0.3,
    illumination=0.5,
    blur=2.5,
    shot_noise=0.5,
    snr_min=2.0,
)


# -- data -------------------------------------------------------------------------------
def parse_source(spec: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:WEIGHT`` -> (path, weight)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and weight.replace(".", "", 1).isdigit():
        return path, float(weight)
    return spec, 1.0


def _stack_labels(path: Path) -> Path | None:
    for a, b in (("_raw", "_labels"), ("img", "mask"), ("_image", "_labels")):
        if a in path.stem:
            cand = path.with_name(path.stem.replace(a, b) + path.suffix)
            if cand.is_file():
                return cand
    return None


def stack_slices(name: str, image: np.ndarray, labels: np.ndarray, z_step: float = 1.0) -> list[Sample]:
    """2D samples of a (Z, Y, X) stack along every axis. ``z_step`` is the z spacing over
    the in-plane spacing: side views (ZX and ZY planes) are stretched along z by it so
    that anisotropic nuclei are not fed squashed."""
    out = [Sample(f"{name}[z{z}]", image[z], labels[z]) for z in range(image.shape[0])]
    for axis, tag in ((1, "y"), (2, "x")):
        for i in range(image.shape[axis]):
            img = np.take(image, i, axis=axis)
            lab = np.take(labels, i, axis=axis)
            if z_step != 1.0:
                size = (max(2, int(round(img.shape[0] * z_step))), img.shape[1])
                img = _resize(img.astype(np.float32), size, False)
                lab = _resize(lab, size, True)
            out.append(Sample(f"{name}[{tag}{i}]", img, lab))
    return out


def load_source(path: str | Path, z_step: float = 1.0, axes: str = "all") -> list[Sample]:
    """Labelled 2D samples of a source: a folder with ``images/`` and ``labels/`` (or an
    ``images`` folder itself), a 3D stack file with a label file beside it
    (``NAME_raw.tif`` / ``NAME_labels.tif``), or a folder of such stacks. Stacks give
    slices along every axis (``axes="all"``) or z only (``"z"``)."""
    path = Path(path)
    if path.is_dir() and (path / "images").is_dir():
        return load_folder(path / "images")
    if path.is_dir() and path.name == "images":
        return load_folder(path)
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES and _stack_labels(p) is not None)
    )
    if not files:
        raise FileNotFoundError(
            f"{path}: expected a folder with images/ and labels/, or 3D stacks with label files "
            "beside them (NAME_raw.tif and NAME_labels.tif)"
        )
    out: list[Sample] = []
    for f in files:
        lab_path = _stack_labels(f)
        if lab_path is None:
            raise FileNotFoundError(f"{f}: no label file beside it (NAME_labels.tif)")
        img, lab = read_image(f), read_image(lab_path).astype(np.int32)
        if img.shape != lab.shape or img.ndim != 3:
            raise ValueError(f"{f}: expected a 3D stack and labels of the same shape, got {img.shape}, {lab.shape}")
        samples = stack_slices(f.stem, img, lab, z_step)
        out.extend(samples if axes == "all" else samples[: img.shape[0]])
    return out


def mixture(sources: list[tuple[list[Sample], float]]) -> tuple[list[Sample], np.ndarray]:
    """Concatenated samples and per-sample draw probabilities: each source gets its weight's
    share of the draws, spread evenly over its samples; samples without objects are left out."""
    samples, probs = [], []
    total = sum(w for _, w in sources)
    for smp, w in sources:
        smp = [s for s in smp if s.labels is not None and s.labels.max() > 0]
        if not smp:
            continue
        samples.extend(smp)
        probs.extend([w / total / len(smp)] * len(smp))
    p = np.asarray(probs)
    return samples, p / p.sum()


def instance_targets(labels: np.ndarray, factor: int = 4, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Targets of the head for an instance label image: (3, H/factor, W/factor) float32 in
    [0, 1]: foreground fraction, normalised centre distance and normalised boundary
    distance (both 0 at the object's innermost point, 1 in the background), averaged over
    factor x factor blocks. ``shape`` pads the result (with background) to that size."""
    h, w = labels.shape
    H, W = -(-h // factor) * factor, -(-w // factor) * factor
    maps = np.ones((3, H, W), np.float32)
    maps[0] = 0
    for i, sl in enumerate(ndimage.find_objects(labels), 1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(sl, (h, w)))
        m = labels[sl] == i
        edt = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        cy, cx = np.unravel_index(int(np.argmax(edt)), edt.shape)
        yy, xx = np.nonzero(m)
        d = np.hypot(yy - cy, xx - cx)
        view = (slice(None),) + sl
        block = maps[view]
        block[0][m] = 1
        block[1][m] = d / max(float(d.max()), 1.0)
        block[2][m] = 1 - edt[m] / float(edt.max())
    out = maps.reshape(3, H // factor, factor, W // factor, factor).mean((2, 4))
    if shape is not None:
        full = np.ones((3, *shape), np.float32)
        full[0] = 0
        full[:, : out.shape[1], : out.shape[2]] = out
        out = full
    return out


class HeadStore(TeacherStore):
    """Frozen-encoder embeddings of fixed augmented views, with the head's targets.

    A view is an unpadded crop at most ``crop`` x ``crop`` (the model input size) at the
    image's inference scale (``Augment.fit``), embedded as inference embeds an image.
    Adds ``targets.npy`` (uint8, (N, 3, crop/4, crop/4)) and ``sizes.npy`` (valid grid
    rows and columns of each view).
    """

    def _teacher_fingerprint(self) -> str:
        # the views depend on the encoder only: a model whose head changed keeps its store
        return encoder_fingerprint(self.teacher)

    def _extra_signature(self) -> dict:
        return {"kind": "instance-head", "max_upscale": self.teacher.max_upscale}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        g = self.crop // 4
        path = self.folder / "targets.npy"
        mode = "r+" if path.exists() else "w+"
        self.targets = np.lib.format.open_memmap(path, mode=mode, dtype=np.uint8, shape=(self.n_views, 3, g, g))
        path = self.folder / "sizes.npy"
        mode = "r+" if path.exists() else "w+"
        self.sizes = np.lib.format.open_memmap(path, mode=mode, dtype=np.int32, shape=(self.n_views, 2))

    def view(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        return seeded_crop(
            self.samples,
            [self.seed, i],
            self.crop,
            self.augment,
            require_objects=True,
            weights=self.weights,
            pad=False,
        )

    @torch.no_grad()
    def compute(self, batch: int = 1, progress: Callable[[int, int], None] | None = None) -> None:
        todo = np.flatnonzero(~self.done)
        model = self.teacher
        g = self.crop // 4
        for i in todo:
            rgb, lab = self.view(int(i))
            x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float()
            self.embeddings[i] = model.embed(x)[0].numpy().astype(np.float16)
            self.encoder_calls += 1
            t = instance_targets(lab, 4, (g, g))
            self.targets[i] = np.rint(t * 255).astype(np.uint8)
            self.sizes[i] = (-(-rgb.shape[0] // 4), -(-rgb.shape[1] // 4))
            if i % 16 == 15 or i == todo[-1]:
                for arr in (self.embeddings, self.targets, self.sizes):
                    arr.flush()
                self._mark_done(todo[(todo <= i) & ~self.done[todo]])
                if progress:
                    progress(int(self.done.sum()), self.n_views)

    def batch(self, idx: np.ndarray):
        """Embeddings (B, 256, g, g), targets (B, 3, 4g, 4g) and valid masks (B, 1, 4g, 4g)
        of stored views, as float32 tensors."""
        emb = torch.from_numpy(np.asarray(self.embeddings[idx], dtype=np.float32))
        tgt = torch.from_numpy(np.asarray(self.targets[idx], dtype=np.float32) / 255.0)
        valid = torch.zeros(len(idx), 1, *tgt.shape[-2:])
        for j, (gh, gw) in enumerate(self.sizes[idx]):
            valid[j, :, :gh, :gw] = 1
        return emb, tgt, valid


# -- inference-side validation ----------------------------------------------------------
def validate_head(
    model: Sam,
    val_sets: dict[str, list[tuple[np.ndarray, np.ndarray]]],
    embeddings: dict[str, list],
    params: dict | None = None,
) -> dict[str, float]:
    """Head-only F1@0.5 per validation folder (embeddings precomputed, see ``embed_val``)."""
    from ..instances import head_only_labels
    from ..metrics import match_instances

    out = {}
    for name, items in val_sets.items():
        f1 = []
        for (_, truth), emb in zip(items, embeddings[name]):
            labels = head_only_labels(model, emb, **(params or {}))
            f1.append(match_instances(labels, truth)["f1"])
        out[name] = float(np.mean(f1))
    out["mean"] = float(np.mean([out[k] for k in val_sets]))
    return out


def embed_val(model: Sam, val_sets: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> dict[str, list]:
    from ..predictor import SamPredictor

    predictor = SamPredictor(model)
    out = {}
    for name, items in val_sets.items():
        out[name] = []
        for image, _ in items:
            predictor.set_image(image)
            out[name].append(predictor._embedding)
        predictor.cache.clear()
    return out


# -- training ---------------------------------------------------------------------------
@dataclass
class HeadConfig:
    """Settings of an instance-head run (saved in the run folder and the checkpoint)."""

    sources: list[str]
    out_dir: str
    model: str = "default"
    val: list[str] = field(default_factory=list)
    views: int = 2400
    z_step: float = 1.0
    steps: int = 6000
    batch: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    seed: int = 0
    val_every: int = 500
    val_limit: int = 30
    minutes: float | None = None
    init: str | None = None
    precision: str = "auto"
    augment: dict = field(default_factory=lambda: dict(HEAD_AUGMENT))
    head: dict = field(default_factory=lambda: dict(DEFAULT_HEAD))


def head_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Soft-target binary cross-entropy on the three maps, over the valid (unpadded)
    grid; distances count only near objects (foreground or its one-cell rim)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    near = (F.max_pool2d(target[:, :1], 3, 1, 1) > 0).float() * valid
    n_valid, n_near = valid.sum().clamp(min=1), near.sum().clamp(min=1)
    fg = (bce[:, :1] * valid).sum() / n_valid
    dist = (bce[:, 1:] * near).sum() / n_near / 2
    return fg + 2 * dist


def _load_val(specs: list[str], z_step: float, limit: int) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    out = {}
    for spec in specs:
        path, _ = parse_source(spec)
        smp = [s for s in load_source(path, z_step, axes="z") if s.labels is not None and s.labels.max() > 0]
        if len(smp) > limit:  # evenly spaced, deterministic
            smp = [smp[int(i)] for i in np.linspace(0, len(smp) - 1, limit)]
        out[Path(path).name if Path(path).name not in ("images", "val") else str(path)] = [
            (s.image, s.labels) for s in smp
        ]
    return out


def _head_state(name_or_path: str, config: dict) -> dict:
    """Float32 weights of the instance head of a model (to start training from them)."""
    from ..weights import load_model

    model = load_model(name_or_path, precision="fp32")
    head = getattr(model, "instance_head", None)
    if head is None:
        raise ValueError(f"{name_or_path!r} has no instance head to start from; leave --init out")
    if dict(model.config.get("instance_head", {})) != dict(config):
        raise ValueError(f"the instance head of {name_or_path!r} differs from this run's head config")
    return {k: v.float() for k, v in head.state_dict().items()}


def build_store(cfg: HeadConfig, model: Sam) -> HeadStore:
    """The run's view store (``OUT/views``), computing the views it still lacks."""
    from tqdm import tqdm

    sources = [(load_source(p, cfg.z_step), w) for p, w in map(parse_source, cfg.sources)]
    samples, weights = mixture(sources)
    aug = Augment(fit=model.img_size, max_upscale=model.max_upscale or 1.0, **cfg.augment)
    store = HeadStore(Path(cfg.out_dir) / "views", model, samples, cfg.views, model.img_size, aug, cfg.seed, weights)
    if not store.done.all():
        with tqdm(total=cfg.views, initial=int(store.done.sum()), desc="embedding views", unit="view") as bar:
            store.compute(progress=lambda d, n: bar.update(d - bar.n))
    return store


def train_head(cfg: HeadConfig, log: Callable[[str], None] = print) -> Path:
    """Build the view store (resumable), train the head (resumable), and write
    ``OUT/model.pt``: the model with the head that scored best on validation."""
    from tqdm import tqdm

    from ..weights import load_model

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    model = load_model(cfg.model)
    if hasattr(model, "quantization"):
        raise ValueError("train the head on a float model; quantize the result afterwards")
    store = build_store(cfg, model)
    val_sets = _load_val(cfg.val, cfg.z_step, cfg.val_limit)
    val_emb = embed_val(model, val_sets) if val_sets else {}

    torch.manual_seed(cfg.seed)
    head = build_instance_head(cfg.head)
    if cfg.init:
        head.load_state_dict(_head_state(cfg.init, cfg.head))
        log(f"head initialised from {cfg.init}")
    amp = resolve_precision(cfg.precision)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state_path = out / "last.pt"
    step, best, history = 0, -1.0, []
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step, best, history = int(state["step"]), float(state["best"]), json.loads(state["history"])
        log(f"resumed at step {step} (best validation F1 {best:.4f})")
    rng = np.random.default_rng([cfg.seed, step])
    steps = cfg.steps
    t0, last_ckpt = time.time(), time.time()
    model.instance_head = head
    bar = tqdm(total=steps, initial=step, desc="training head", unit="step")
    while step < steps:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = np.sort(rng.choice(cfg.views, cfg.batch, replace=False))
        emb, tgt, valid = store.batch(idx)
        head.train()
        with autocast(torch.device("cpu"), amp):
            logits = head(emb)
        loss = head_loss(logits.float(), tgt, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.minutes and step == 50:
            per = (time.time() - t0) / 50
            steps = min(steps, int(cfg.minutes * 60 / per))
            bar.total = steps
        if step % cfg.val_every == 0 or step == steps:
            head.eval()
            row = {"step": step, "loss": float(loss.item())}
            if val_sets:
                with torch.no_grad():
                    row.update(validate_head(model, val_sets, val_emb))
                if row["mean"] > best:
                    best = row["mean"]
                    torch.save({"head": head.state_dict()}, out / "best_head.pt")
            history.append(row)
            log(json.dumps(row))
        if step == steps or time.time() - last_ckpt > 120:
            tmp = out / "last.pt.partial"
            torch.save(
                {
                    "head": head.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "best": best,
                    "history": json.dumps(history),
                },
                tmp,
            )
            tmp.replace(state_path)
            last_ckpt = time.time()
    bar.close()
    if (out / "best_head.pt").exists():
        head.load_state_dict(torch.load(out / "best_head.pt", map_location="cpu", weights_only=True)["head"])
    head.eval()
    model.instance_head = head
    model.config = {**model.config, "instance_head": dict(cfg.head)}
    meta = dict(getattr(model, "meta", {}) or {})
    meta["instance_head"] = {
        "config": asdict(cfg),
        "validation": history[-1] if history else None,
        "best_validation_mean_f1": best,
        "history": history,
    }
    save_checkpoint(model, out / "model.pt", meta=meta, half=True)  # as bundled
    return out / "model.pt"
