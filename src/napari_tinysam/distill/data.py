"""Training data: folders of images with optional instance labels, augmentation and
random crops at the model's input scale."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..io import read_image
from ..predictor import to_uint8_rgb

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy")


@dataclass
class Sample:
    """One 2D training field: uint8-ready raw image (H, W) or (H, W, 3) and optional
    instance labels (H, W) int32 (0 = background)."""

    name: str
    image: np.ndarray
    labels: np.ndarray | None


def _find_labels(image_path: Path, labels_dir: Path | None) -> Path | None:
    if labels_dir is None:
        return None
    for suffix in IMAGE_SUFFIXES:
        cand = labels_dir / (image_path.stem + suffix)
        if cand.is_file():
            return cand
    return None


def load_folder(
    images: str | os.PathLike, labels: str | os.PathLike | None = None, limit: int | None = None
) -> list[Sample]:
    """Load every image of a folder (2D, RGB, or 3D stacks split into slices), with the
    instance label image of the same name from ``labels`` when there is one.

    With ``labels=None`` a sibling folder named ``labels`` next to an ``images`` folder is
    used when it exists (the BBBC039 layout: ``train/images``, ``train/labels``).
    """
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")
    if labels is None and images.name == "images" and (images.parent / "labels").is_dir():
        labels = images.parent / "labels"
    labels_dir = Path(labels) if labels is not None else None
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
    out: list[Sample] = []
    for path in files[:limit]:
        img = read_image(path)
        lab_path = _find_labels(path, labels_dir)
        lab = read_image(lab_path).astype(np.int32) if lab_path is not None else None
        rgb = img.ndim == 3 and img.shape[-1] in (3, 4)
        if img.ndim == 2 or rgb:
            out.append(Sample(path.stem, img, lab))
        elif img.ndim == 3:  # a stack: one sample per slice
            for z in range(img.shape[0]):
                out.append(Sample(f"{path.stem}[{z}]", img[z], None if lab is None else lab[z]))
        else:
            raise ValueError(f"{path}: expected 2D, RGB or 3D data, got shape {img.shape}")
    return out


def _resize(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    h, w = size
    if arr.ndim == 2:
        mode = "I" if nearest else "F"
        im = Image.fromarray(arr.astype(np.int32 if nearest else np.float32), mode=mode)
        return np.asarray(im.resize((w, h), Image.NEAREST if nearest else Image.BILINEAR))
    return np.stack([_resize(arr[..., c], size, nearest) for c in range(arr.shape[-1])], -1)


@dataclass
class Augment:
    """Augmentation settings. ``scale`` is the base factor that brings training images to
    the scale they are seen at by the model (e.g. 512 / 696 for BBBC039 at img_size 512).
    With ``fit`` > 0 the base factor is instead each image's own inference scale:
    ``min(fit / longest side, max_upscale)``, as ``SamPredictor`` resizes it.

    The microscope augmentations (all off by default) act on the raw intensities, in the
    image's own pixels, before scaling to uint8 and resizing, as a real microscope's
    defects do: ``dim`` (probability that a random subset of the objects is dimmed to
    15-70% of its contrast), ``illumination`` (largest relative amplitude of a smooth
    illumination gradient), ``blur`` (largest Gaussian sigma of a defocus blur, applied
    to half the views), ``shot_noise`` (probability of Poisson noise at a signal-to-noise
    ratio drawn log-uniformly in [``snr_min``, 20], plus Gaussian read noise).
    """

    scale: float = 1.0
    scale_jitter: float = 0.25  # factor drawn log-uniformly in [1/(1+j), 1+j]
    gamma_jitter: float = 0.3
    contrast_jitter: float = 2.0  # percentile offsets, in percent
    noise: float = 0.03  # std of additive Gaussian noise, fraction of 255
    flips: bool = True
    fit: int = 0
    max_upscale: float = 4.0
    dim: float = 0.0
    illumination: float = 0.0
    blur: float = 0.0
    shot_noise: float = 0.0
    snr_min: float = 2.0

    @property
    def microscope(self) -> bool:
        return bool(self.dim or self.illumination or self.blur or self.shot_noise)


def _microscope(
    raw: np.ndarray, lab: np.ndarray | None, lo: float, hi: float, aug: Augment, rng: np.random.Generator
) -> np.ndarray:
    """Raw-intensity augmentations of a (crop of a) 2D or RGB image, float32 result in the
    image's intensity units; ``lo``/``hi`` are its display limits (background / bright)."""
    img = raw.astype(np.float32)
    span = max(hi - lo, 1e-6)
    if lab is not None and aug.dim and rng.random() < aug.dim:
        ids = np.unique(lab[lab > 0])
        if len(ids):
            chosen = ids[rng.random(len(ids)) < rng.uniform(0.2, 0.8)]
            factor = np.ones(int(lab.max()) + 1, np.float32)
            factor[chosen] = rng.uniform(0.15, 0.7, len(chosen))
            f = factor[lab]
            if img.ndim == 3:
                f = f[..., None]
            img = lo + (img - lo) * f
    if aug.illumination:
        h, w = img.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        theta = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(theta) * xx + np.sin(theta) * yy) / max(h, w)
        gain = 1 + rng.uniform(-1, 1) * aug.illumination * (ramp - ramp.mean())
        img = lo + (img - lo) * (gain[..., None] if img.ndim == 3 else gain)
    if aug.blur and rng.random() < 0.5:
        sigma = rng.uniform(0.5, aug.blur)
        sig = (sigma, sigma, 0) if img.ndim == 3 else sigma
        img = ndimage.gaussian_filter(img, sig)
    if aug.shot_noise and rng.random() < aug.shot_noise:
        snr = float(np.exp(rng.uniform(np.log(aug.snr_min), np.log(20.0))))
        signal = np.clip((img - lo) / span, 0, None)  # 0 background, ~1 bright objects
        fg = signal[signal > 0.25]
        level = float(np.median(fg)) if fg.size else 1.0
        photons = snr**2 / max(level, 1e-3)  # Poisson: SNR = sqrt(photons at the typical object)
        noisy = rng.poisson(signal * photons).astype(np.float32) / photons
        noisy += rng.normal(0, rng.uniform(0, 0.5) * level / snr, noisy.shape).astype(np.float32)
        img = lo + noisy * span
    return img


def augment_crop(
    sample: Sample, crop: int, aug: Augment, rng: np.random.Generator, pad: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """A random augmented crop: uint8 RGB (crop, crop, 3) and labels (crop, crop) int32.
    Images smaller than the crop are zero-padded (as the model pads its input); with
    ``pad=False`` the crop keeps its own size (at most crop x crop)."""
    img, lab = sample.image, sample.labels
    lo = max(0.0, 0.5 + rng.uniform(-1, 1) * aug.contrast_jitter / 2)
    hi = min(100.0, 99.5 + rng.uniform(-1, 1) * aug.contrast_jitter / 2)
    rgb_in = img.ndim == 3
    if aug.microscope:
        limits = tuple(float(v) for v in np.percentile(img, (lo, hi)))
    else:
        img = to_uint8_rgb(img, percentiles=(lo, hi)) if img.dtype != np.uint8 or img.ndim == 2 else img[..., :3]
    base = aug.scale
    if aug.fit:
        base = min(aug.fit / max(img.shape[:2]), aug.max_upscale)
    f = base * float(np.exp(rng.uniform(-1, 1) * np.log1p(aug.scale_jitter)))
    h, w = img.shape[:2]
    # Crop first in original pixels (with margin), then resize: cheaper than resizing all.
    ch, cw = min(h, int(np.ceil(crop / f)) + 2), min(w, int(np.ceil(crop / f)) + 2)
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    rgb = img[y0 : y0 + ch, x0 : x0 + cw]
    if lab is not None:
        lab = lab[y0 : y0 + ch, x0 : x0 + cw]
    if aug.microscope:
        raw = _microscope(rgb[..., :3] if rgb_in else rgb, lab, *limits, aug, rng)
        rgb = to_uint8_rgb(raw, contrast_limits=limits)
    nh, nw = max(2, int(round(ch * f))), max(2, int(round(cw * f)))
    rgb = np.clip(_resize(rgb.astype(np.float32), (nh, nw), False), 0, 255)
    if lab is not None:
        lab = _resize(lab, (nh, nw), True)
    rgb, lab = rgb[:crop, :crop], None if lab is None else lab[:crop, :crop]
    if aug.gamma_jitter:
        g = float(np.exp(rng.uniform(-1, 1) * aug.gamma_jitter))
        rgb = 255.0 * (rgb / 255.0) ** g
    if aug.noise:
        rgb = rgb + rng.normal(0, aug.noise * 255 * rng.uniform(0, 1), rgb.shape)
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if aug.flips:
        k = int(rng.integers(0, 4))
        rgb = np.rot90(rgb, k)
        lab = None if lab is None else np.rot90(lab, k)
        if rng.random() < 0.5:
            rgb = rgb[:, ::-1]
            lab = None if lab is None else lab[:, ::-1]
    if not pad:
        return np.ascontiguousarray(rgb), None if lab is None else np.ascontiguousarray(lab, dtype=np.int32)
    out = np.zeros((crop, crop, 3), np.uint8)
    out[: rgb.shape[0], : rgb.shape[1]] = rgb
    out_lab = None
    if lab is not None:
        out_lab = np.zeros((crop, crop), np.int32)
        out_lab[: lab.shape[0], : lab.shape[1]] = lab
    return out, out_lab


def seeded_crop(
    samples: list[Sample],
    seed,
    crop: int,
    aug: Augment,
    require_objects: bool = False,
    weights: np.ndarray | None = None,
    pad: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The augmented crop of ``seed`` (an int or a sequence of ints): a random field of
    ``samples`` (drawn with probabilities ``weights`` when given, else uniformly), then a
    random crop of it, a pure function of the seed. With ``require_objects`` a labelled
    crop without any object is drawn again."""
    rng = np.random.default_rng(seed)
    while True:
        pick = int(rng.integers(len(samples))) if weights is None else int(rng.choice(len(samples), p=weights))
        img, lab = augment_crop(samples[pick], crop, aug, rng, pad=pad)
        if not require_objects or lab is None or lab.max() > 0:
            return img, lab
