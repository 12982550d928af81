"""Test doubles for unit tests of the everything-mode logic (never used by the product)."""

from __future__ import annotations

import numpy as np
import torch

from napari_tinysam.model import Sam


class FakeSam(torch.nn.Module):
    """Answers point prompts from a known label image instead of a network.

    The image must be square with side ``img_size`` (so model-input pixels are image
    pixels). A point on object k gets: token 1 = object k (IoU 0.95), token 2 = object k
    (IoU 0.5, filtered out), token 3 = object k again (IoU 0.9, a duplicate that NMS
    removes). A background point gets only low-IoU masks. Logits are
    +/-20 at low resolution, so masks are stable.
    """

    mask_threshold = 0.0
    click_dtype = None  # clicks upscale in float32

    def __init__(self, labels: np.ndarray, head: bool = False) -> None:
        super().__init__()
        self.head = head
        assert labels.shape[0] == labels.shape[1]
        self.labels = labels
        self.low = labels[2::4, 2::4]
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1))
        self.register_buffer("pixel_std", torch.ones(3, 1, 1))
        self.prompts_seen = 0

    @property
    def img_size(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self):
        return torch.device("cpu")

    max_upscale = None  # the image is already at the input size

    @property
    def has_instance_head(self) -> bool:
        return self.head

    def instance_maps(self, features):
        """With ``head=True``: the exact targets of the labels, as a perfect head."""
        from napari_tinysam.distill.instance import instance_targets

        return torch.from_numpy(instance_targets(self.labels, 4))[None]

    def embed(self, x):
        return torch.zeros(1, 1, 1, 1)

    postprocess_masks = Sam.postprocess_masks

    def decode_filtered(self, features, points, iou_thresh):
        low, iou = self.decode(features, points)
        iou = iou[:, 1:]
        keep = torch.nonzero((iou > iou_thresh).any(1)).flatten()
        return keep, low[keep][:, 1:], iou[keep]

    mask_tokens = staticmethod(Sam.mask_tokens)

    def decode(self, features, points=None, boxes=None, mask_input=None, tokens=slice(None)):
        coords, _ = points
        b = coords.shape[0]
        self.prompts_seen += b
        s = self.low.shape[0]
        logits = torch.full((b, 4, s, s), -20.0)
        iou = torch.full((b, 4), 0.1)
        for i in range(b):
            x, y = coords[i, 0].tolist()
            k = self.labels[min(int(y), self.img_size - 1), min(int(x), self.img_size - 1)]
            if k == 0:
                continue
            obj = torch.from_numpy(self.low == k)
            logits[i, 0][obj] = 20
            logits[i, 1][obj] = 20
            logits[i, 2][obj] = 20
            logits[i, 3][obj] = 20
            iou[i] = torch.tensor([0.95, 0.95, 0.5, 0.9])
        return logits[:, tokens], iou[:, tokens]
