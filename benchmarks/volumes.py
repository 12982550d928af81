"""3D test volumes for the benchmarks: the real GoNuclear crops and a noisy stand-in for
confocal embryo stacks built from 2D BBBC039 fields (nuclei that grow and shrink through
z, drift, out-of-focus blur, dim nuclei and Poisson noise at a low signal-to-noise ratio).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_tinysam.io import read_image


def gonuclear(data: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, labels) of every GoNuclear crop (ZYX, uint8 / uint16)."""
    out = []
    for raw in sorted((data / "gonuclear3d").glob("*_raw.tif")):
        lab = raw.with_name(raw.name.replace("_raw", "_labels"))
        out.append((raw.stem.replace("_raw", ""), read_image(raw), read_image(lab).astype(np.int32)))
    return out


#: GoNuclear's voxel size (z, y, x) in um (../shared/data/README.md).
GONUCLEAR_VOXEL = (0.28, 0.127, 0.127)
#: z resamplings of a stack for the voxel-size tables: (name, factor on the slice count).
Z_RESAMPLINGS = (("as acquired", 1.0), ("every other slice", 0.5), ("twice as many slices", 2.0))


def resampled_in_z(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """A stack and its labels with ``factor`` times as many slices: every other slice for
    0.5, linear interpolation of the image (nearest slice for the labels) for 2."""
    if factor == 1.0:
        return image, labels
    if factor < 1.0:
        step = round(1 / factor)
        return image[::step], labels[::step]
    return (
        ndimage.zoom(image.astype(np.float32), (factor, 1, 1), order=1),
        ndimage.zoom(labels, (factor, 1, 1), order=0),
    )


def resampled_gonuclear(data: Path):
    """(crop, z sampling, image, labels, voxel size (z, y, x)) of every GoNuclear crop
    with an image (1139 holds noise only) in each of :data:`Z_RESAMPLINGS`."""
    for name, img, lab in gonuclear(data):
        if name.endswith("1139"):
            continue
        for what, factor in Z_RESAMPLINGS:
            im, lb = resampled_in_z(img, lab, factor)
            yield name, what, im, lb, (GONUCLEAR_VOXEL[0] / factor, *GONUCLEAR_VOXEL[1:])


def shrunk(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """A 2D field and its labels resampled by ``factor`` (the image smoothed against
    aliasing when shrunk, float32; labels nearest)."""
    from skimage.transform import rescale

    img = rescale(image.astype(np.float32), factor, anti_aliasing=factor < 1, preserve_range=True)
    lab = ndimage.zoom(labels, factor, order=0, grid_mode=True, mode="grid-constant")
    return img.astype(np.float32), lab[: img.shape[0], : img.shape[1]]


def noisy_stack(
    image: np.ndarray,
    labels: np.ndarray,
    depth: int = 24,
    size: int = 128,
    snr: float = 3.0,
    seed: int = 0,
    blur: float = 1.0,
    shrink: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A (depth, size, size) noisy stack and its instance labels from a 2D field: every
    nucleus of a random crop gets a z centre and half-extent (3-7 slices) and, in each
    slice, keeps the part of its mask deeper than its ellipsoidal profile (it grows, then
    shrinks); a third of the nuclei are dimmed to 30-60%; slices drift by up to 2 px;
    Gaussian blur (``blur`` pixels in the plane, 0.7 of it across slices) and Poisson noise
    at ``snr`` for a typical nucleus. ``shrink`` resamples the field first
    (:func:`shrunk`), so the nuclei are that many times as wide: 0.5 turns BBBC039's
    nuclei (median 29 px across) into ones of the size found in confocal stacks of embryos
    (10-25 px)."""
    rng = np.random.default_rng(seed)
    if shrink != 1.0:
        image, labels = shrunk(image, labels, shrink)
    h, w = labels.shape
    y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    lab = labels[y0 : y0 + size, x0 : x0 + size]
    img = image[y0 : y0 + size, x0 : x0 + size].astype(np.float32)
    bg = float(np.percentile(img, 5))
    signal = np.clip(img - bg, 0, None)
    depth_map = np.zeros(lab.shape, np.float32)  # normalised depth inside each nucleus
    for i, sl in enumerate(ndimage.find_objects(lab), 1):
        if sl is None:
            continue
        m = lab[sl] == i
        edt = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        depth_map[sl][m] = edt[m] / edt.max()
    n = int(lab.max())
    zc = rng.uniform(0, depth - 1, n + 1)
    half = rng.uniform(3, 7, n + 1)
    dim = np.where(rng.random(n + 1) < 1 / 3, rng.uniform(0.3, 0.6, n + 1), 1.0)
    stack = np.zeros((depth, size, size), np.float32)
    truth = np.zeros((depth, size, size), np.int32)
    drift = np.cumsum(rng.integers(-1, 2, (depth, 2)), 0).clip(-2, 2)
    for z in range(depth):
        r = 1 - ((z - zc) / half) ** 2  # squared radius of the ellipsoid's section
        keep = np.sqrt(np.clip(r, 0, 1))  # relative radius
        inside = (lab > 0) & (depth_map >= 1 - keep[lab]) & (r[lab] > 0)
        sl_lab = np.where(inside, lab, 0)
        sl_img = bg + signal * inside * dim[lab]
        dy, dx = drift[z]
        truth[z] = np.roll(sl_lab, (dy, dx), (0, 1))
        stack[z] = np.roll(sl_img, (dy, dx), (0, 1))
    stack = ndimage.gaussian_filter(stack, (0.7 * blur, blur, blur))
    level = float(np.median(signal[lab > 0])) if (lab > 0).any() else 1.0
    photons = snr**2 / max(level, 1e-3)
    noisy = rng.poisson(np.clip(stack - bg, 0, None) * photons) / photons + bg
    noisy += rng.normal(0, 0.3 * level / snr, noisy.shape)
    keep_ids = np.unique(truth[truth > 0])
    lut = np.zeros(n + 1, np.int32)
    lut[keep_ids] = np.arange(1, len(keep_ids) + 1)
    return np.clip(noisy, 0, 65535).astype(np.uint16), lut[truth]


def noisy_field(
    image: np.ndarray, labels: np.ndarray, snr: float, background: float = 30.0, seed: int = 0
) -> np.ndarray:
    """A 2D field as a camera at a low light level records it: Poisson noise over a
    background of ``background`` photons, the typical nucleus (median of the signal above
    the 5th percentile inside the labels) ``snr`` standard deviations of the background's
    noise above it. float32."""
    img = image.astype(np.float32)
    signal = np.clip(img - np.percentile(img, 5), 0, None)
    level = float(np.median(signal[labels > 0])) if (labels > 0).any() else 1.0
    photons = snr * np.sqrt(background) / max(level, 1e-6)
    return np.random.default_rng(seed).poisson(signal * photons + background).astype(np.float32)


def mosaics(fields, side: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Large images with small objects: side x side BBBC039 fields placed edge to edge
    (1040x1392 for 2, 1560x2088 for 3), each field's nuclei keeping their size."""
    out = []
    n = side * side
    for k in range(len(fields) // n):
        group = fields[k * n : (k + 1) * n]
        labels, offset = [], 0
        for f in group:
            lab = f.labels.astype(np.int32)
            labels.append(np.where(lab > 0, lab + offset, 0))
            offset += int(lab.max())
        rows = range(side)
        out.append(
            (
                np.block([[group[r * side + c].image for c in rows] for r in rows]),
                np.block([[labels[r * side + c] for c in rows] for r in rows]),
            )
        )
    return out
