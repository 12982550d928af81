"""SAM's mask decoder: a two-way transformer over prompt and image tokens, then
hypernetwork MLPs that turn each mask token into a low-resolution mask."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm2d, MatMul
from .transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts masks and their IoU from image and prompt embeddings.

    Always computes all ``num_multimask_outputs + 1`` mask tokens: token 0 is SAM's
    single-mask output, tokens 1..3 the multimask outputs (the only ones TinySAM returns).
    Choosing among them is the caller's business (see ``Sam.select_masks``).
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            [
                MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
                for _ in range(self.num_mask_tokens)
            ]
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )
        self.hyper_product = MatMul()  # hypernetwork weights @ upscaled image features

    def run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer: tokens (B, 1 + T + N, C) and image tokens
        (B, C, h, w). The IoU head needs only the tokens, so callers that filter on
        predicted IoU can skip :meth:`masks_from_tokens` for rejected prompts."""
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        dense = dense_prompt_embeddings
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            dense = dense[:1]  # the same for every prompt (no mask input): added once
        src = image_embeddings + dense
        if src.shape[0] != b:  # one image for the batch: stays shared (see TwoWayTransformer)
            src = src.expand(b, -1, -1, -1)
        _, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        return hs, src.transpose(1, 2).reshape(b, c, h, w)

    def predict_iou(self, hs: torch.Tensor) -> torch.Tensor:
        """IoU predictions (B, T) from the transformer's tokens."""
        return self.iou_prediction_head(hs[:, 0, :])

    def masks_from_tokens(self, hs: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """Low-resolution mask logits (B, T, 4h, 4w) from tokens and image tokens."""
        b = hs.shape[0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        upscaled = self.output_upscaling(src)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        _, uc, uh, uw = upscaled.shape
        return self.hyper_product(hyper_in, upscaled.reshape(b, uc, uh * uw)).view(b, -1, uh, uw)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        return_tokens: bool = False,
    ):
        """Decode masks.

        Args:
            image_embeddings: (1 or B, C, h, w); one embedding is shared by all B prompts.
            image_pe: (1, C, h, w) positional encoding of the grid.
            sparse_prompt_embeddings: (B, N, C).
            dense_prompt_embeddings: (B or 1, C, h, w).
            return_tokens: also return the transformer's output tokens (B, 1 + T + N, C),
                used by distillation.

        Returns:
            low-resolution mask logits (B, T, 4h, 4w) and IoU predictions (B, T) for all
            T = num_multimask_outputs + 1 tokens (and the tokens if asked).
        """
        hs, src = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        iou_pred = self.predict_iou(hs)
        masks = self.masks_from_tokens(hs, src)
        if return_tokens:
            return masks, iou_pred, hs
        return masks, iou_pred
