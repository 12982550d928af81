"""Prompt sampling for training: first prompts from the ground truth, then online hard
prompts from the regions where the student is still wrong."""

from __future__ import annotations

import numpy as np
import torch

from ..evaluation import corrective_point


def sample_points_in(masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniformly random pixel inside each mask: masks (N, H, W) bool -> (N, 2) (x, y)
    float pixel coordinates. Empty masks get (0, 0)."""
    n, h, w = masks.shape
    weights = masks.reshape(n, -1).float()
    empty = weights.sum(1) == 0
    weights[empty, 0] = 1.0
    idx = torch.multinomial(weights, 1, generator=generator)[:, 0]
    return torch.stack([(idx % w).float(), (idx // w).float()], dim=1)


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (N, 4) of masks (N, H, W); pixel coordinates of the extreme
    pixels (x1, y1 inclusive), as SAM's ``batched_mask_to_box``."""
    n, h, w = masks.shape
    rows = masks.any(2)
    cols = masks.any(1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values
    x0 = torch.where(cols, ar_w, w).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    boxes[~rows.any(1)] = 0
    return boxes


def jitter_boxes(
    boxes: torch.Tensor,
    size: tuple[int, int],
    frac: float = 0.1,
    max_px: float = 20.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Move each box edge by Gaussian noise with std ``frac`` of the box side (at most
    ``max_px``), as SAM's training does; clipped to the image."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0).repeat(1, 2)
    noise = torch.randn(boxes.shape, generator=generator, device=boxes.device) * (frac * wh).clamp(max=max_px)
    out = boxes + noise
    h, w = size
    out[:, 0::2] = out[:, 0::2].clamp(0, w - 1)
    out[:, 1::2] = out[:, 1::2].clamp(0, h - 1)
    x0, x1 = torch.minimum(out[:, 0], out[:, 2]), torch.maximum(out[:, 0], out[:, 2])
    y0, y1 = torch.minimum(out[:, 1], out[:, 3]), torch.maximum(out[:, 1], out[:, 3])
    return torch.stack([x0, y0, x1, y1], 1)


def sample_error_points(
    pred: torch.Tensor,
    gt: torch.Tensor,
    generator: torch.Generator | None = None,
    center_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online hard prompt: one point per object from the region where ``pred`` is wrong.

    pred, gt: (N, H, W) bool. A false-negative pixel gives a positive point (label 1), a
    false-positive pixel a negative point (label 0); objects with no error get a
    padding point (label -1), which the prompt encoder ignores.
    The point is uniform in the error region (SAM's training), except for a random
    ``center_fraction`` of the objects, which get the innermost point of their largest
    error region (the click of SAM's interactive evaluation and of a careful user).
    Returns coords (N, 2) as (x, y) and labels (N,).
    """
    fn = gt & ~pred
    fp = pred & ~gt
    err = fn | fp
    coords = sample_points_in(err, generator)
    if center_fraction > 0:
        pick = torch.rand(len(gt), generator=generator, device=gt.device) < center_fraction
        pick &= err.flatten(1).any(1)
        idx = pick.nonzero()[:, 0].tolist()
        if idx:
            p_np, g_np = pred[idx].cpu().numpy(), gt[idx].cpu().numpy()
            centers = [corrective_point(a, b)[0] for a, b in zip(p_np, g_np)]
            coords[idx] = torch.tensor(np.array(centers), dtype=coords.dtype, device=coords.device)
    n, h, w = gt.shape
    xi = coords[:, 0].long().clamp(0, w - 1)
    yi = coords[:, 1].long().clamp(0, h - 1)
    ar = torch.arange(n, device=gt.device)
    labels = torch.where(fn[ar, yi, xi], 1.0, 0.0)
    labels[~err.reshape(n, -1).any(1)] = -1.0
    return coords, labels
