"""Sample data for napari's File > Open Sample menu."""

from __future__ import annotations

from .. import samples

_BBBC = (
    "BBBC039v1 field IXMtest_A09_s1, Broad Bioimage Benchmark Collection (Caicedo et al. 2019; Ljosa et al. 2012), CC0"
)


def nuclei_2d():
    image = samples.nuclei_2d()
    return [
        (
            image,
            {
                "name": "nuclei",
                "metadata": {"source": _BBBC},
                "contrast_limits": [float(image.min()), float(image.max())],
            },
            "image",
        )
    ]


def nuclei_3d():
    return [
        (
            samples.nuclei_3d(),
            {
                "name": "nuclei 3d",
                "scale": (2.0, 1.0, 1.0),
                "metadata": {"source": "synthetic nuclei from the StarDist project (BSD-3-Clause)"},
            },
            "image",
        )
    ]
