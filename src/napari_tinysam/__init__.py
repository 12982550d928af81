"""napari-tinysam: TinySAM for microscopy in napari, Python and the command line."""

from .everything import segment_everything, segment_volume
from .model import CheckpointError, Sam
from .predictor import EmbeddingCache, SamPredictor
from .propagate import VolumeMask, segment_object_in_volume
from .quantize import load_quantized as _load_quantized  # noqa: F401  (registers int8 checkpoints)
from .weights import load_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "EmbeddingCache",
    "Sam",
    "SamPredictor",
    "VolumeMask",
    "load_model",
    "segment_everything",
    "segment_object_in_volume",
    "segment_volume",
    "__version__",
]
