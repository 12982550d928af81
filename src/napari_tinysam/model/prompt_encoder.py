"""SAM's prompt encoder: points, boxes and low-resolution masks to embeddings."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .common import LayerNorm2d


class FactoredDense(NamedTuple):
    """One mask prompt's dense embedding (1, C, h, w), kept as the two factors of the mask
    encoder's last layer, a 1x1 convolution from r = 16 channels: per grid cell,
    ``features @ weight.T`` with the bias as weight's last column against a column of
    ones. The decoder's first block projects only these r + 1 columns onto what it has
    projected once for the image with the no-mask embedding (``MaskDecoder.run_transformer``).
    """

    features: torch.Tensor  #: (1, h*w, r + 1): the mask features of each cell, channels last, and 1
    weight: torch.Tensor  #: (C, r + 1): the 1x1 convolution's weights and bias
    no_mask: torch.Tensor  #: (C,): the no-mask embedding, which replaces this one where no mask is given
    size: tuple[int, int]  #: (h, w) of the grid

    def full(self) -> torch.Tensor:
        """The dense embedding (1, C, h, w)."""
        h, w = self.size
        return (self.features @ self.weight.T).transpose(1, 2).reshape(1, -1, h, w)

    def no_mask_grid(self) -> torch.Tensor:
        """The no-mask embedding over the grid (1, C, h, w), expanded as the prompt encoder gives it."""
        return self.no_mask.reshape(1, -1, 1, 1).expand(1, -1, *self.size)

    def change(self) -> torch.Tensor:
        """weight with the no-mask embedding taken from the bias: ``features @ change().T``
        is this embedding minus the no-mask one, per cell."""
        return torch.cat([self.weight[:, :-1], (self.weight[:, -1] - self.no_mask)[:, None]], 1)


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Fourier features)."""

    def __init__(self, num_pos_feats: int = 64, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (..., 2) normalised to [0, 1] -> (..., 2 * num_pos_feats)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an (h, w) grid: (C, h, w)."""
        h, w = size
        dev = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((h, w), device=dev, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        pe = self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1))
        return pe.permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """coords (B, N, 2) as (x, y) in model-input pixels -> (B, N, C)."""
        coords = coords_input.clone().to(torch.float)
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self._pe_encoding(coords)


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Args:
        embed_dim: prompt embedding width (256).
        image_embedding_size: (h, w) of the image embedding grid.
        input_image_size: (H, W) of the padded model input, in pixels.
        mask_in_chans: hidden channels for encoding mask prompts (16).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # negative point, positive point, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: (1, C, h, w), float32.

        It depends only on the Gaussian matrix and the grid size, so it is computed once
        (its sines and cosines cost about 5% of a click) and again only when the
        matrix's values, dtype or device change. The cache compares the matrix itself
        (2 x C/2 numbers): a tensor's address and version can repeat after its storage
        is replaced (``model.half().float()`` frees one and allocates its twin)."""
        g = self.pe_layer.positional_encoding_gaussian_matrix
        size = tuple(self.image_embedding_size)
        cached = self.__dict__.get("_dense_pe")
        fresh = (
            cached is not None
            and cached[0] == size
            and cached[1].device == g.device
            and cached[1].dtype == g.dtype
            and torch.equal(cached[1], g)
        )
        if not fresh or torch.is_grad_enabled():
            with torch.autocast(g.device.type, enabled=False):
                pe = self.pe_layer(self.image_embedding_size).unsqueeze(0)
            if torch.is_grad_enabled():
                return pe
            cached = self.__dict__["_dense_pe"] = (size, g.detach().clone(), pe)
        return cached[2]

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # centre of the pixel
        if pad:
            padding_point = torch.zeros((points.shape[0], 1, 2), device=points.device)
            padding_label = -torch.ones((labels.shape[0], 1), device=labels.device)
            points = torch.cat([points, padding_point], dim=1)
            labels = torch.cat([labels, padding_label], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        emb = emb + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        emb = emb + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        coords = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        corner = torch.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])
        return emb + corner

    def _factorable(self, masks: torch.Tensor) -> bool:
        last = self.mask_downscaling[-1]
        return (
            masks.shape[0] == 1
            and not torch.is_grad_enabled()
            and type(last) is nn.Conv2d
            and last.kernel_size == (1, 1)
            and last.bias is not None
        )

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        dense_size: tuple[int, int] | None = None,
        factored: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | FactoredDense]:
        """Embed prompts.

        Args:
            points: coordinates (B, N, 2) as (x, y) in model-input pixels and labels
                (B, N): 1 positive, 0 negative, -1 padding.
            boxes: (B, 4) XYXY in model-input pixels.
            masks: (B, 1, 4h, 4w) low-resolution mask logits.
            dense_size: (h, w) of the dense output when no mask is given (default: the
                image embedding grid; training on crops uses a smaller grid).
            factored: give one mask prompt's dense embedding as a :class:`FactoredDense`
                (outside autograd, with the float mask encoder; otherwise a tensor).

        Returns:
            sparse (B, N', embed_dim) and dense (B, embed_dim, h, w) embeddings.
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        dev = self.no_mask_embed.weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=dev)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], 1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None and factored and self._factorable(masks):
            *layers, last = self.mask_downscaling
            features = nn.Sequential(*layers)(masks)  # (1, r, h, w)
            h, w = features.shape[-2:]
            ones = features.new_ones((1, h * w, 1))
            dense = FactoredDense(
                torch.cat([features.flatten(2).transpose(1, 2), ones], 2),
                torch.cat([last.weight.flatten(1), last.bias[:, None]], 1).to(features.dtype),
                self.no_mask_embed.weight[0],
                (h, w),
            )
        elif masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = dense_size or self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense
