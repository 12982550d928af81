"""Pure PyTorch TinySAM / SAM networks and checkpoint loading (knows nothing of napari)."""

from .build import (
    CheckpointError,
    StoreMismatch,
    architecture_config,
    build_sam,
    infer_config,
    model_fingerprint,
    read_checkpoint,
    sam_from_checkpoint,
    save_checkpoint,
)
from .sam import Sam

__all__ = [
    "CheckpointError",
    "Sam",
    "architecture_config",
    "build_sam",
    "StoreMismatch",
    "infer_config",
    "model_fingerprint",
    "read_checkpoint",
    "sam_from_checkpoint",
    "save_checkpoint",
]
