"""Synthetic noisy stacks and fields for tests that run the bundled model."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def gapped_nuclei_stack() -> tuple[np.ndarray, np.ndarray]:
    """A finely sampled (42, 96, 96) uint16 stack of three nuclei (slices 0.73 pixels
    apart: each spans about 30 slices) with Poisson and read noise at SNR 2, and its
    instance labels. The first nucleus (centre z 18, y 30, x 30) does not show on slices
    17-19, as a nucleus may not in a real stack."""
    zz, yy, xx = np.mgrid[:42, :96, :96]
    truth = np.zeros(zz.shape, np.int32)
    for i, (cz, cy, cx, r) in enumerate(((18, 30, 30, 13), (21, 62, 70, 11), (18, 88, 22, 12)), 1):
        truth[((zz - cz) / 15) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 <= 1] = i
    signal = 100.0 * (truth > 0)
    signal[17:20][truth[17:20] == 1] = 0
    rng = np.random.default_rng(2)
    clean = ndimage.gaussian_filter(signal, (0.7, 1, 1))
    photons = 2.0**2 / 100  # a nucleus's signal at SNR 2
    noisy = rng.poisson(clean * photons) / photons + 150 + rng.normal(0, 15, clean.shape)
    return noisy.clip(0, None).astype(np.uint16), truth


def noisy_nuclei_field(snr: float = 2.0, background: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """The bundled sample field of nuclei as a camera records it at a low light level:
    Poisson noise over ``background`` photons, the typical nucleus ``snr`` standard
    deviations of the background's noise above it. float32, and the field's labels."""
    from napari_tinysam import samples

    field, truth = samples.nuclei_2d().astype(np.float32), samples.nuclei_2d_labels()
    signal = np.clip(field - np.percentile(field, 5), 0, None)
    photons = snr * np.sqrt(background) / np.median(signal[truth > 0])
    return np.random.default_rng(1).poisson(signal * photons + background).astype(np.float32), truth
