"""Loading models for the widgets off the GUI thread, shared between widgets."""

from __future__ import annotations

import threading

from ..model import Sam
from ..weights import REGISTRY, load_model

_lock = threading.Lock()
_loaded: dict[str, Sam] = {}


def model_choices() -> list[str]:
    """Registry names offered in the model pickers (a checkpoint file can be added)."""
    return list(REGISTRY)


def get_model(name_or_path: str) -> Sam:
    """Load once per name/path and reuse (models are read-only at inference)."""
    with _lock:
        model = _loaded.get(name_or_path)
    if model is None:
        model = load_model(name_or_path)
        with _lock:
            _loaded[name_or_path] = model
    return model
