"""SAM's mask decoder: a two-way transformer over prompt and image tokens, then
hypernetwork MLPs that turn each mask token into a low-resolution mask."""

from __future__ import annotations

import threading
import weakref
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, LayerNorm2d, MatMul, cached_cast, expanded_over_batch
from .prompt_encoder import FactoredDense
from .transformer import PreparedImage, TwoWayTransformer

#: How many embeddings' first-block image side a decoder keeps (``MaskDecoder.prepared_image``).
PREPARED_IMAGES = 2
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()


@lru_cache(maxsize=8)
def _subpixel_order(h: int, w: int, t: int, device: torch.device) -> torch.Tensor:
    """Where each value of the (t, 4h, 4w) masks sits in the hypernetwork product's
    output, whose rows are (i, j, di, dj, di2, dj2) and whose columns are the t tokens."""
    order = torch.arange(h * w * 16 * t, device=device).view(h, w, 2, 2, 2, 2, t).permute(6, 0, 2, 4, 1, 3, 5)
    return order.reshape(-1).contiguous()


class MaskDecoder(nn.Module):
    """Predicts masks and their IoU from image and prompt embeddings.

    Computes all ``num_multimask_outputs + 1`` mask tokens unless told which (``tokens``):
    token 0 is SAM's single-mask output, tokens 1..3 the multimask outputs (the only ones
    TinySAM returns). Choosing among them is the caller's business (see ``Sam.mask_tokens``).
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
            [MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)
        self.hyper_product = MatMul()  # hypernetwork weights @ upscaled image features
        self.set_product_dtype(None)

    def set_product_dtype(self, dtype: torch.dtype | None) -> None:
        """Run the decoder's large products on image tokens at ``dtype`` (bfloat16 on CPUs
        that run it natively) when the decoder itself runs in float32, as it does for a
        single click (``Sam.decode_autocast_batch``); None keeps them float32. The norm
        between the two upscaling products takes their low-precision values, and so do the
        final mask product and the masks' reordering (the logits come out as float32
        holding low-precision values), and so do the prompt tokens' MLPs (``MLPBlock``,
        whose weights' read is their cost). A batch's image tokens, their norms,
        residuals and softmaxes stay float32; a single prompt's image tokens on a prepared
        embedding stay at ``dtype`` (``TwoWayTransformer.forward``), their norms computed
        in float32."""
        self.product_dtype = dtype
        for m in self.transformer.modules():
            if hasattr(m, "product_dtype"):
                m.product_dtype = dtype

    def run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor | FactoredDense,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer: tokens (B, 1 + T + N, C) and image tokens
        (B, h, w, C), channels last as the transformer leaves them. The IoU head needs
        only the tokens, so callers that filter on predicted IoU can skip
        :meth:`masks_from_tokens` for rejected prompts."""
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        dense = dense_prompt_embeddings
        _, c, h, w = image_embeddings.shape
        if isinstance(dense, FactoredDense):  # one mask prompt: the image's side plus its change
            prepared = self.prepared_image(image_embeddings, image_pe, dense.no_mask_grid())
            if prepared is not None:
                prepared = self.transformer.prepare_change(prepared, dense.features, dense.change())
            else:
                dense = dense.full()
        else:
            if expanded_over_batch(dense):
                dense = dense[:1]  # the same for every prompt (no mask input): added once
            prepared = self.prepared_image(image_embeddings, image_pe, dense)
        if prepared is not None:
            hs, src = self.transformer(image_embeddings, image_pe, tokens, prepared)
            return hs, src.view(b, h, w, c)
        src = image_embeddings + dense
        if src.shape[0] != b:  # one image for the batch: stays shared (see TwoWayTransformer)
            src = src.expand(b, -1, -1, -1)
        hs, src = self.transformer(src, image_pe, tokens)
        return hs, src.view(b, h, w, c)

    def prepared_image(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> PreparedImage | None:
        """The first block's image side for one embedding without a mask prompt (a dense
        prompt constant over the grid), cached: every later prompt on the same embedding
        skips the three projections of every image token that no prompt changes (about a
        sixth of a click's products); a mask prompt's clicks add their low-rank change to
        it (``TwoWayTransformer.prepare_change``). The latest ``PREPARED_IMAGES`` embeddings are kept;
        an entry is used only for the very tensor it was made from, unchanged (same
        object, version and address), with the same weights and product dtype. None where
        it does not apply (training, a dense prompt that varies over the grid, several
        embeddings, a quantized or textbook decoder): the decoder then computes everything
        per call."""
        first = self.transformer.layers[0]
        attentions = (first.cross_attn_token_to_image, first.cross_attn_image_to_token)
        if (
            torch.is_grad_enabled()
            or image_embeddings.shape[0] != 1
            or dense.shape[0] != 1
            or dense.stride(-1) != 0
            or dense.stride(-2) != 0
            or not all(a.reassociate and type(a.q_proj) is nn.Linear for a in attentions)
        ):
            return None
        if torch.is_autocast_enabled(image_embeddings.device.type):
            dtype = torch.get_autocast_dtype(image_embeddings.device.type)
        else:
            dtype = self.product_dtype or torch.float32
        params = [image_pe, dense] + [p for a in attentions for p in a.parameters()]
        key = (dtype, tuple((t.data_ptr(), t._version) for t in params), image_embeddings._version)
        with _PREPARED_LOCK:  # napari decodes in worker threads
            entries = _PREPARED.setdefault(self, [])
            for i, (ref, entry_key, prepared) in enumerate(entries):
                if ref() is image_embeddings and entry_key == key:
                    entries.insert(0, entries.pop(i))
                    return prepared
            with torch.autocast(image_embeddings.device.type, enabled=False):
                prepared = self.transformer.prepare(image_embeddings + dense, image_pe, dtype)
            entries.insert(0, (weakref.ref(image_embeddings), key, prepared))
            del entries[PREPARED_IMAGES:]
            return prepared

    def predict_iou(self, hs: torch.Tensor) -> torch.Tensor:
        """IoU predictions (B, T) from the transformer's tokens."""
        return self.iou_prediction_head(hs[:, 0, :])

    def masks_from_tokens(self, hs: torch.Tensor, src: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        """Low-resolution mask logits (B, T, 4h, 4w) from tokens and image tokens (B, h, w, C),
        for the mask tokens ``tokens`` (default: all)."""
        b, h, w, _ = src.shape
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        chosen = range(self.num_mask_tokens)[tokens]
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in chosen], dim=1)
        if self._plain_upscaling():
            return self._upscale_channels_last(src, hyper_in)
        upscaled = self.output_upscaling(src.permute(0, 3, 1, 2))
        _, uc, uh, uw = upscaled.shape
        return self.hyper_product(hyper_in, upscaled.reshape(b, uc, uh * uw)).view(b, -1, uh, uw)

    def _plain_upscaling(self) -> bool:
        """Whether the upscaling layers are the float originals (a quantizer replaces them
        with its own modules, which then run as modules)."""
        up = self.output_upscaling
        return (
            type(up[0]) is nn.ConvTranspose2d
            and type(up[1]) is LayerNorm2d
            and type(up[2]) is nn.GELU
            and type(up[3]) is nn.ConvTranspose2d
            and type(up[4]) is nn.GELU
            and type(self.hyper_product) is MatMul
        )

    def _upscale_channels_last(self, src: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` and the hypernetwork product as three matrix products on
        channels-last image tokens, with the same arithmetic as the module path.

        A 2x2 stride-2 transposed convolution maps each input pixel to its own 2x2 output
        block: one (C_in, 4 C_out) product per pixel. Keeping the sub-pixel offsets as
        axes until the end makes the LayerNorm a norm over the last axis and avoids the
        layout conversions of the convolution path (about a fifth of a click's time).
        """
        b, h, w, c = src.shape
        conv1, norm, _, conv2, _ = self.output_upscaling
        c1, c2 = conv1.out_channels, conv2.out_channels
        lp = self.product_dtype if src.dtype in (torch.float32, self.product_dtype) else None
        w1, b1, w2, b2 = conv1.weight, conv1.bias, conv2.weight, conv2.bias
        x = src.reshape(-1, c)
        if lp is not None:  # the two large products (and the norm between) at low precision
            w1, b1, w2, b2 = (cached_cast(t, lp) for t in (w1, b1, w2, b2))
            x = x.to(lp)
        w1 = w1.permute(0, 2, 3, 1).reshape(c, 4 * c1)  # columns (di, dj, o)
        y = torch.addmm(b1.repeat(4), x, w1).view(-1, c1)
        y = F.gelu(F.layer_norm(y, (c1,), norm.weight, norm.bias, norm.eps))
        w2 = w2.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        y = F.gelu(torch.addmm(b2.repeat(4), y, w2))  # (B*h*w*4, 4*c2)
        if lp is not None:
            hyper_in = hyper_in.to(lp)
        t = hyper_in.shape[1]
        masks = torch.bmm(y.view(b, h * w * 16, c2), hyper_in.transpose(1, 2))  # (B, h*w*16, T)
        # pixel (4i + 2di + di2, 4j + 2dj + dj2) of token t, gathered by a precomputed
        # index: several times faster than the eight-axis permutation it stands for (and
        # gather twice as fast as index_select on bfloat16)
        order = _subpixel_order(h, w, t, masks.device)
        masks = torch.gather(masks.reshape(b, -1), 1, order.expand(b, -1))
        return masks.view(b, t, 4 * h, 4 * w).float()

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        return_tokens: bool = False,
        tokens: slice = slice(None),
    ):
        """Decode masks.

        Args:
            image_embeddings: (1 or B, C, h, w); one embedding is shared by all B prompts.
            image_pe: (1, C, h, w) positional encoding of the grid.
            sparse_prompt_embeddings: (B, N, C).
            dense_prompt_embeddings: (B or 1, C, h, w), or one mask prompt's
                :class:`FactoredDense`.
            return_tokens: also return the transformer's output tokens (B, 1 + T + N, C),
                used by distillation.
            tokens: which of the T = num_multimask_outputs + 1 mask tokens to return
                (default: all); the others' masks are not computed.

        Returns:
            low-resolution mask logits (B, T', 4h, 4w) and IoU predictions (B, T') of the
            chosen tokens (and the transformer's tokens if asked).
        """
        hs, src = self.run_transformer(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        iou_pred = self.predict_iou(hs)[:, tokens]
        masks = self.masks_from_tokens(hs, src, tokens)
        if return_tokens:
            return masks, iou_pred, hs
        return masks, iou_pred
