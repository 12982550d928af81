"""Import the public TinySAM reference implementation (github.com/xinghaochen/TinySAM)
from a checkout, as the in-run baseline of the speed benchmarks.

The reference imports three helpers from timm and two from torchvision; neither is a
dependency of this project (each pulls another torch build), so minimal stand-ins with
the same behaviour at inference are registered before the import: ``DropPath`` with
rate 0 is the identity, ``trunc_normal_`` only initialises weights that the checkpoint
then overwrites, and the image resize is PIL's bilinear resize, which is what
torchvision does for PIL images.

    git clone https://github.com/xinghaochen/TinySAM /tmp/TinySAM   # or any snapshot
"""

from __future__ import annotations

import sys
import types
from pathlib import Path


def _install_shims() -> None:
    import torch
    from PIL import Image

    if "timm" not in sys.modules:
        layers = types.ModuleType("timm.models.layers")

        class DropPath(torch.nn.Module):
            def __init__(self, drop_prob: float = 0.0) -> None:
                super().__init__()
                self.drop_prob = drop_prob

            def forward(self, x):
                return x

        layers.DropPath = DropPath
        layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
        layers.trunc_normal_ = lambda t, std=1.0, **_: torch.nn.init.trunc_normal_(t, std=std)
        registry = types.ModuleType("timm.models.registry")
        registry.register_model = lambda fn: fn
        models = types.ModuleType("timm.models")
        models.layers, models.registry = layers, registry
        timm = types.ModuleType("timm")
        timm.models = models
        sys.modules.update(
            {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}
        )
    if "torchvision" not in sys.modules:
        functional = types.ModuleType("torchvision.transforms.functional")
        functional.to_pil_image = Image.fromarray
        functional.resize = lambda img, size: img.resize((size[1], size[0]), Image.BILINEAR)
        transforms = types.ModuleType("torchvision.transforms")
        transforms.functional = functional
        # imported by the reference's everything generator, which these benchmarks do not run
        boxes = types.ModuleType("torchvision.ops.boxes")
        boxes.box_area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

        def batched_nms(*_args, **_kwargs):
            raise RuntimeError("the reference's everything mode needs the real torchvision")

        boxes.batched_nms = batched_nms
        ops = types.ModuleType("torchvision.ops")
        ops.boxes = boxes
        tv = types.ModuleType("torchvision")
        tv.transforms, tv.ops = transforms, ops
        sys.modules.update(
            {
                "torchvision": tv,
                "torchvision.transforms": transforms,
                "torchvision.transforms.functional": functional,
                "torchvision.ops": ops,
                "torchvision.ops.boxes": boxes,
            }
        )


def load_reference(checkout: str | Path, weights: str | Path):
    """(model, SamPredictor class) of the reference vit_t with ``weights`` loaded."""
    checkout = Path(checkout)
    if not (checkout / "tinysam" / "build_sam.py").is_file():
        raise SystemExit(f"{checkout} is not a TinySAM checkout (no tinysam/build_sam.py)")
    _install_shims()
    sys.path.insert(0, str(checkout))
    from tinysam.build_sam import build_sam_vit_t  # type: ignore[import-not-found]
    from tinysam.predictor import SamPredictor  # type: ignore[import-not-found]

    return build_sam_vit_t(checkpoint=str(weights)).eval(), SamPredictor
