"""Interactive annotation logic, independent of napari: prompts on one slice -> mask
candidates, committing a mask into a label volume under a new id, and exact undo.

The napari widgets translate layers and events into these calls; scripts can use them
directly on arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .predictor import SamPredictor, image_key, to_uint8_rgb


@dataclass
class Prompts:
    """The prompts of one object on one 2D slice, in that slice's pixel coordinates.

    points: (N, 2) as (x, y) = (column, row); labels: (N,) 1 positive / 0 negative;
    box: (4,) XYXY or None.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    box: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return len(self.points) == 0 and self.box is None


@dataclass
class Candidates:
    """Mask candidates for one prompt set: masks (C, H, W) bool, scores (C,), their
    low-resolution logits (C, s/4, s/4), and ``chosen``: the one shown (first the one with
    the highest predicted IoU; the user may pick another)."""

    masks: np.ndarray
    scores: np.ndarray
    low_res: np.ndarray
    chosen: int = -1

    def __post_init__(self) -> None:
        if self.chosen < 0:
            self.chosen = self.best

    @property
    def best(self) -> int:
        return int(np.argmax(self.scores))

    @property
    def mask(self) -> np.ndarray:
        """The chosen mask (H, W) bool."""
        return self.masks[self.chosen]


def slice_rgb(image2d: np.ndarray, contrast_limits: tuple[float, float] | None) -> np.ndarray:
    """What the model sees of a slice: uint8 RGB scaled by the layer's contrast limits."""
    return to_uint8_rgb(image2d, contrast_limits)


def is_embedded(predictor: SamPredictor, rgb: np.ndarray) -> bool:
    """Whether the embedding of this exact slice is in the predictor's cache."""
    return image_key(predictor.model, rgb) in predictor.cache


def _prefix_key(prompts: Prompts, n_points: int) -> bytes:
    box = b"" if prompts.box is None else np.asarray(prompts.box, np.float64).tobytes()
    pts = np.asarray(prompts.points[:n_points], np.float64).tobytes()
    return box + b"|" + pts + b"|" + np.asarray(prompts.labels[:n_points], np.int64).tobytes()


@dataclass
class ClickHistory:
    """The masks of one object's prompt prefixes on one embedded slice, kept across calls
    of :func:`segment_prompts` (use one per object; ``clear`` it for the next)."""

    features: object = None  # the embedding the masks were decoded on
    steps: dict[bytes, tuple[int | None, Candidates]] = field(default_factory=dict)  # key -> (parent's choice, masks)

    def clear(self) -> None:
        self.features = None
        self.steps.clear()


def segment_prompts(
    predictor: SamPredictor, rgb: np.ndarray, prompts: Prompts, history: ClickHistory | None = None
) -> Candidates:
    """Masks for one object's prompts on a slice (embedding from the cache or computed now).

    The prompts are taken as a sequence of clicks, SAM's interactive way: the box, or the
    first point, gives the first masks (a single point: TinySAM's three candidates; a box:
    the single-mask output); each further point refines the mask chosen for the prompts
    before it, whose low-resolution logits go in as mask input, and gives one mask (see
    the README for what this is worth against decoding every point set from scratch).

    ``history`` keeps the masks of the earlier prompts, so that each added point costs one
    decoder pass and a candidate the user picked (``Candidates.chosen``) is the one refined
    by later points. Without it every prefix is decoded again: the same masks.
    """
    if prompts.empty:
        raise ValueError("no prompts on this slice: add a point or draw a box")
    predictor.set_image(rgb)
    history = ClickHistory() if history is None else history
    features = predictor.get_image_embedding()  # the same tensor while this slice stays embedded
    if history.features is not features:
        history.clear()
        history.features = features
    previous: Candidates | None = None
    keys = []
    for n in range(0 if prompts.box is not None else 1, len(prompts.points) + 1):
        keys.append(_prefix_key(prompts, n))
        parent = None if previous is None else previous.chosen
        parent_used, cands = history.steps.get(keys[-1], (None, None))
        if cands is None or parent_used != parent:  # new, or the user picked another mask before it
            masks, scores, low = predictor.predict(
                point_coords=prompts.points[:n] if n else None,
                point_labels=prompts.labels[:n] if n else None,
                box=prompts.box,
                mask_input=None if previous is None else previous.low_res[previous.chosen][None],
                multimask_output=previous is None and prompts.box is None,
            )
            cands = Candidates(masks, scores, low)
            history.steps[keys[-1]] = (parent, cands)
        previous = cands
    # prompts moved or deleted: their masks no longer apply
    history.steps = {k: history.steps[k] for k in keys}
    assert previous is not None
    return previous


@dataclass
class UndoRecord:
    """What a commit overwrote: the slice index, the patch origin and its old values."""

    index: tuple[int, ...]
    origin: tuple[int, int]
    previous: np.ndarray
    label: int


def next_free_id(labels: np.ndarray) -> int:
    """The id for a new object: one more than the largest id in the whole volume."""
    return int(labels.max()) + 1 if labels.size else 1


def commit_mask(
    labels: np.ndarray,
    index: tuple[int, ...],
    mask: np.ndarray,
    overwrite: bool = False,
    label: int | None = None,
) -> UndoRecord | None:
    """Write ``mask`` (H, W) bool into ``labels[index]`` under a new id, in place.

    Pixels of other objects are kept unless ``overwrite``. Returns an undo record
    (None when nothing was written).
    """
    plane = labels[index]
    if plane.shape != mask.shape:
        raise ValueError(
            f"labels slice has shape {plane.shape} but the mask has shape {mask.shape}; "
            "the Labels layer must have the image's shape"
        )
    write = mask if overwrite else mask & (plane == 0)
    if not write.any():
        return None
    rows = np.flatnonzero(write.any(1))
    cols = np.flatnonzero(write.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    label = next_free_id(labels) if label is None else label
    previous = plane[y0:y1, x0:x1].copy()
    plane[y0:y1, x0:x1][write[y0:y1, x0:x1]] = label
    return UndoRecord(tuple(index), (int(y0), int(x0)), previous, label)


def undo_commit(labels: np.ndarray, record: UndoRecord) -> None:
    """Restore exactly what :func:`commit_mask` overwrote."""
    y0, x0 = record.origin
    h, w = record.previous.shape
    labels[record.index][y0 : y0 + h, x0 : x0 + w] = record.previous
