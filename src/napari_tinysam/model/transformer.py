"""SAM's two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .common import MatMul, MLPBlock, cached_cast, expanded_over_batch


def _short_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last axis (a few prompt tokens): torch's kernel is about five
    times slower than these three passes for rows this short."""
    e = (x - x.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def _softmax_over_keys(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over axis -2 of float32 scores (..., nk, Nq) of few keys for many queries,
    in place outside autograd (the caller owns them). With the queries (image tokens)
    along the last axis every pass runs along contiguous rows: about eight times faster
    than the same softmax over a last axis of a few keys (docs/benchmarks.md)."""
    if torch.is_grad_enabled():
        e = (scores - scores.amax(-2, keepdim=True)).exp()
        return e / e.sum(-2, keepdim=True)
    scores.sub_(scores.amax(-2, keepdim=True)).exp_()
    return scores.div_(scores.sum(-2, keepdim=True))


class Attention(nn.Module):
    """Attention with optional down-projection of the internal width (downsample_rate)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.qk = MatMul()  # per-head q @ k^T of the textbook form
        self.av = MatMul()  # per-head softmax(...) @ v of the textbook form

    #: Reassociate the products for few-token attention (set False for the textbook
    #: form, e.g. as a benchmark baseline).
    reassociate = True
    #: dtype of the products with the image tokens in the few-token paths while the
    #: module runs in float32 (set by ``MaskDecoder.set_product_dtype``); None: float32.
    product_dtype: torch.dtype | None = None

    def _low(self, x: torch.Tensor) -> torch.dtype | None:
        return self.product_dtype if x.dtype in (torch.float32, self.product_dtype) else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C).

        The decoder attends between a handful of prompt tokens and thousands of image
        tokens. Instead of projecting every image token, the projections are moved to
        the few-token side (the same products, reassociated), which needs about a fifth
        of the arithmetic; the result equals the textbook form up to rounding.
        """
        nq, nk = q.shape[1], k.shape[1]
        if self.reassociate and nk >= 8 * nq:
            return self._few_queries(q, k, v)
        if self.reassociate and nq >= 8 * nk:
            return self._few_keys(q, k, v)
        qh = self._heads(self.q_proj(q))
        kh = self._heads(self.k_proj(k))
        vh = self._heads(self.v_proj(v))
        d = qh.shape[-1]
        # the products are modules so that a quantizer can replace them
        scores = self.qk(qh, kh.transpose(-2, -1)) * d**-0.5
        attn = _short_softmax(scores) if scores.shape[-1] <= 16 else scores.softmax(-1)
        out = self.av(attn, vh)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    def _few_queries(self, q, k, v):
        # scores_h = q_h (k W_kh^T + b_kh)^T = (q_h W_kh) k^T + const(row): the bias term
        # is constant along each softmax row and drops out.
        b, nq, c = q.shape
        h = self.num_heads
        d = self.internal_dim // h
        qh = self._heads(self.q_proj(q))  # (B, h, nq, d)
        wk = self.k_proj.weight.view(h, d, c)
        qk = torch.matmul(qh, wk).reshape(b, h * nq, c)  # (B, h*nq, C)
        lp = self._low(k)
        if lp is not None:  # the two products over every image token at low precision
            # image tokens on the left (the low-precision kernels are slow with a
            # transposed right-hand side); the softmax computes in float32 and writes lp
            scores = torch.matmul(k.to(lp), (qk * d**-0.5).to(lp).transpose(1, 2)).transpose(1, 2).contiguous()
            av = torch.matmul(scores.softmax(-1), v.to(lp)).float().view(b, h, nq, c)
        else:
            scores = torch.matmul(qk * d**-0.5, k.transpose(1, 2))  # (B, h*nq, nk)
            attn = scores.softmax(-1)
            av = torch.matmul(attn, v).view(b, h, nq, c)  # rows of attn sum to 1
        wv = self.v_proj.weight.view(h, d, c)
        out = torch.matmul(av, wv.transpose(1, 2)) + self.v_proj.bias.view(1, h, 1, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, h * d))

    def _few_keys(self, q, k, v, residual=None):
        # scores_h = (q W_qh^T + b_qh) K_h^T = q (W_qh^T K_h^T) + b_qh K_h^T, and the
        # output projection is folded into the values: out = sum_h A_h (V_h W_oh^T) + b_o.
        b, nq, c = q.shape
        nk = k.shape[1]
        h = self.num_heads
        d = self.internal_dim // h
        kh = self._heads(self.k_proj(k))  # (B, h, nk, d)
        vh = self._heads(self.v_proj(v))  # (B, h, nk, d)
        wq = self.q_proj.weight.view(h, d, c) * d**-0.5  # the softmax's scale, applied here
        m = torch.matmul(wq.transpose(1, 2), kh.transpose(2, 3))  # (B, h, C, nk)
        m = m.permute(0, 2, 1, 3).reshape(b, c, h * nk)
        bias = torch.matmul(self.q_proj.bias.view(1, h, 1, d) * d**-0.5, kh.transpose(2, 3))  # (B, h, 1, nk)
        lp = self._low(q)
        qm = torch.matmul(q, m) if lp is None else torch.matmul(q.to(lp), m.to(lp))  # (B, Nq, h*nk)
        # scores with the queries along the rows' contiguous axis (_softmax_over_keys)
        rows, bias = qm.transpose(1, 2), bias.reshape(b, h * nk, 1)
        if torch.is_grad_enabled():
            scores = (rows + bias).contiguous()
        else:
            scores = torch.add(rows, bias, out=torch.empty((b, h * nk, nq), device=q.device))
        attn = _softmax_over_keys(scores.view(b, h, nk, nq)).view(b, h * nk, nq)
        return self._folded_output(attn.transpose(1, 2), vh, lp, residual)

    def added_to(self, residual: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``residual + forward(q, k, v)`` for many queries q (B, Nq, C) and few keys, at
        the dtype of ``residual`` (B, Nq, C): the sum is formed by the output product
        itself instead of a pass of its own over the Nq rows."""
        if not (self.reassociate and q.shape[1] >= 8 * k.shape[1]):
            raise ValueError("added_to is for many queries and few keys (the image-to-token attention)")
        return self._few_keys(q, k, v, residual)

    def _folded_output(
        self,
        attn: torch.Tensor,
        vh: torch.Tensor,
        lp: torch.dtype | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sum_h A_h (V_h W_oh^T) + b_o for few keys: attention weights (B, Nq, h*nk) of
        every head side by side and the values' heads vh (B, h, nk, d) -> (B, Nq, C); the
        output projection is folded into the few values instead of applied to Nq rows.
        With ``lp`` the product over the Nq rows runs at that dtype; with ``residual``
        (B, Nq, C) the product adds to it, at its dtype."""
        b, h, nk, d = vh.shape
        c = self.out_proj.out_features
        wo = self.out_proj.weight.view(c, h, d).permute(1, 2, 0)  # (h, d, C)
        vo = torch.matmul(vh, wo).reshape(b, h * nk, c)  # (B, h*nk, C)
        if residual is not None:
            # each head's weights sum to one: the bias over h on every value row adds it once
            vo = vo + self.out_proj.bias / h
            return torch.baddbmm(residual, attn.to(residual.dtype), vo.to(residual.dtype))
        if lp is not None:
            out = torch.baddbmm(cached_cast(self.out_proj.bias, lp).expand(b, attn.shape[1], c), attn.to(lp), vo.to(lp))
            return out.float()
        return torch.baddbmm(self.out_proj.bias.expand(b, attn.shape[1], c), attn, vo)

    # -- one image shared by a batch of prompts ------------------------------------------
    # In the decoder's first block every prompt sees the same image tokens (one embedding
    # and the same dense prompt embedding). Their projections are then computed once (the
    # textbook products on the image side), for the whole batch or, cached, for every
    # prompt decoded on that embedding (``PreparedImage``), instead of once per prompt.

    def project_heads(
        self, x: torch.Tensor, proj: nn.Linear, dtype: torch.dtype | None = None, transposed: bool = False
    ) -> torch.Tensor:
        """``proj`` of one image's tokens x (1, N, C), split into heads: (h, N, d), or
        (h, d, N) if ``transposed``; contiguous, at ``dtype`` (None: as computed)."""
        xh = self._heads(proj(x))[0]
        if transposed:
            xh = xh.transpose(1, 2)
        return xh.contiguous() if dtype is None else xh.to(dtype).contiguous()

    def shared_keys(self, q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
        """``forward(q, k, v)`` for q (B, Nq, C) when every prompt's k and v are the same
        k1 and v1 (1, Nk, C)."""
        return self.prepared_keys(q, self.project_heads(k1, self.k_proj), self.project_heads(v1, self.v_proj))

    def prepared_keys(self, q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        """``forward(q, k, v)`` for q (B, Nq, C) from one image's projected keys and values
        kh, vh (h, Nk, d), shared by every prompt; products at their dtype."""
        b, nq, _ = q.shape
        h = self.num_heads
        qh = self._heads(self.q_proj(q))  # (B, h, nq, d)
        d = qh.shape[-1]
        qs = qh.transpose(0, 1).reshape(h, b * nq, d)  # every prompt's queries, per head
        if kh.dtype == torch.float32:
            scores = torch.matmul(qs, kh.transpose(1, 2))  # (h, B*nq, nk)
        else:  # image tokens on the left: the low-precision kernels are slow otherwise
            scores = torch.matmul(kh, qs.to(kh.dtype).transpose(1, 2)).transpose(1, 2).float()
        attn = (scores * d**-0.5).softmax(-1)
        out = torch.matmul(attn.to(vh.dtype), vh).float()
        return self.out_proj(out.view(h, b, nq, d).permute(1, 2, 0, 3).reshape(b, nq, h * d))

    def shared_queries(self, q1: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``forward(q, k, v)`` for few keys and values k, v (B, Nk, C) when every prompt's
        queries are the same q1 (1, Nq, C); returns (B, Nq, C)."""
        return self.prepared_queries(self.project_heads(q1, self.q_proj, transposed=True), k, v)

    def prepared_queries(
        self, qt: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``forward(q, k, v)`` for few keys and values k, v (B, Nk, C) from one image's
        projected queries, per head and transposed, qt (h, d, Nq), shared by every prompt;
        returns (B, Nq, C), added to ``residual`` (B, Nq, C) at its dtype if given."""
        b, nk, _ = k.shape
        h, d, nq = qt.shape
        kh = self._heads(self.k_proj(k)) * d**-0.5  # (B, h, nk, d), with the softmax's scale
        vh = self._heads(self.v_proj(v))
        ks = kh.transpose(0, 1).reshape(h, b * nk, d).to(qt.dtype)
        scores = torch.matmul(ks, qt).float().view(h, b, nk, nq)  # queries along the rows
        attn = _softmax_over_keys(scores).transpose(0, 1).reshape(b, h * nk, nq)
        lp = None if qt.dtype == torch.float32 else qt.dtype
        return self._folded_output(attn.transpose(1, 2), vh, lp, residual=residual)


class PreparedImage(NamedTuple):
    """One image's side of the decoder's first block, which no prompt changes: computed
    once per embedding (``MaskDecoder`` keeps the latest) and shared by every prompt
    decoded on it, instead of recomputed per click."""

    keys: torch.Tensor  #: (1, N, C) image tokens (embedding + dense prompt), float32
    key_pe: torch.Tensor  #: (1, N, C) their positional encoding, float32
    key_pe_low: torch.Tensor | None  #: key_pe at the product dtype (None: float32 products)
    #: keys at the product dtype (None: float32 products): a single prompt's image tokens
    #: then stay at that dtype through the decoder (``TwoWayTransformer.forward``)
    keys_low: torch.Tensor | None
    k: torch.Tensor  #: (h, N, d) token-to-image keys, k_proj(keys + key_pe), per head
    v: torch.Tensor  #: (h, N, d) token-to-image values, v_proj(keys), per head
    q: torch.Tensor  #: (h, d, N) image-to-token queries, q_proj(keys + key_pe), per head, transposed


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image cross-attention, MLP on tokens, and
    image-to-token cross-attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        prepared: PreparedImage | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """With ``prepared`` (first block only): the image side of both cross-attentions
        comes from it, and keys are its image tokens."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q = queries + query_pe
        # one image for every prompt of the batch (an expanded tensor): its side of both
        # cross-attentions is computed once (see Attention.shared_keys)
        shared = prepared is None and (
            expanded_over_batch(keys)
            and self.cross_attn_token_to_image.reassociate
            and self.cross_attn_image_to_token.reassociate
        )
        lp = None if shared or prepared is not None else self.cross_attn_token_to_image._low(keys)
        if prepared is not None:
            attn_out = self.cross_attn_token_to_image.prepared_keys(q, prepared.k, prepared.v)
        elif shared:
            k = keys[:1] + key_pe
            attn_out = self.cross_attn_token_to_image.shared_keys(q, k, keys[:1])
        elif lp is not None:  # image tokens cast once for the products of both attentions
            kl = keys.to(lp)
            k = kl + key_pe.to(lp)
            attn_out = self.cross_attn_token_to_image(q, k, kl)
        else:
            k = keys + key_pe  # the keys do not change before the second use below
            attn_out = self.cross_attn_token_to_image(q, k, keys)
        queries = self.norm2(queries + attn_out)
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        i2t = self.cross_attn_image_to_token
        # one prompt's image tokens kept at the product dtype (TwoWayTransformer.forward):
        # the image-to-token output product adds the residual itself, at that dtype
        low_tokens = keys.dtype == i2t.product_dtype
        if prepared is not None:
            out = i2t.prepared_queries(prepared.q, q, queries, residual=keys if low_tokens else None)
        elif shared:
            out = i2t.shared_queries(k, q, queries)
        elif low_tokens:
            out = i2t.added_to(keys, k, q, queries)
        else:
            out = i2t(k.expand_as(keys), q, queries)
        return queries, self.norm4(out if low_tokens else keys + out)


class TwoWayTransformer(nn.Module):
    """Decoder transformer.

    Args of forward: image_embedding (B, C, h, w), image_pe (B, C, h, w), point_embedding
    (B, N, C). Returns the processed tokens (B, N, C) and image tokens (B, h*w, C).
    """

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, i == 0)
                for i in range(depth)
            ]
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def prepare(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, dtype: torch.dtype) -> PreparedImage:
        """The image side of the first block for one image: image_embedding (1, C, h, w)
        (dense prompt included), image_pe (1, C, h, w); projections stored at ``dtype``."""
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        first = self.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        k = keys + key_pe
        low = self.final_attn_token_to_image._low(keys)
        return PreparedImage(
            keys,
            key_pe,
            None if low is None else key_pe.to(low),
            None if low is None else keys.to(low),
            t2i.project_heads(k, t2i.k_proj, dtype),
            t2i.project_heads(keys, t2i.v_proj, dtype),
            i2t.project_heads(k, i2t.q_proj, dtype, transposed=True),
        )

    def prepare_change(self, base: PreparedImage, features: torch.Tensor, change: torch.Tensor) -> PreparedImage:
        """``base`` (:meth:`prepare` for an image) for the same image with ``features @
        change.T`` added to every image token: features (1, N, r), change (C, r) of low
        rank r (a mask prompt's dense embedding minus the no-mask one; ``FactoredDense``).
        The projections are linear, so each gets a rank-r product added (per head N x r x d,
        r = 17 for a mask prompt) instead of its product over all C channels."""
        first = self.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        f = features[0]

        def changed(stored: torch.Tensor, attention: Attention, proj: nn.Linear, transposed: bool = False):
            h, dt = attention.num_heads, stored.dtype
            a = (proj.weight @ change).view(h, -1, change.shape[1]).to(dt)  # (h, d, r): each head's change
            fh = f.to(dt).expand(h, -1, -1)  # (h, N, r)
            if transposed:  # stored (h, d, N)
                return torch.baddbmm(stored, a, fh.transpose(1, 2))
            return torch.baddbmm(stored, fh, a.transpose(1, 2))

        keys = torch.addmm(base.keys[0], f, change.T)[None]
        return PreparedImage(
            keys,
            base.key_pe,
            base.key_pe_low,
            None if base.keys_low is None else keys.to(base.keys_low.dtype),
            changed(base.k, t2i, t2i.k_proj),
            changed(base.v, t2i, t2i.v_proj),
            changed(base.q, i2t, i2t.q_proj, transposed=True),
        )

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        prepared: PreparedImage | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """With ``prepared`` (from :meth:`prepare` for this image and positional encoding)
        the image side of the first block is not recomputed; image_embedding and image_pe
        are then not read. A single prompt on a prepared image with low-precision products
        keeps the image tokens at that dtype throughout (their residuals added by the
        image-to-token output products, their norms computed in float32 and stored at it):
        every pass over the 4096 x 256 tokens moves half the bytes, and the products read
        them at that dtype anyway. The image tokens returned are then at that dtype."""
        b = point_embedding.shape[0]
        if prepared is not None:
            one_low = prepared.keys_low is not None and b == 1
            keys = prepared.keys_low if one_low else prepared.keys.expand(b, -1, -1)
            key_pe = prepared.key_pe if prepared.key_pe_low is None or b > 1 else prepared.key_pe_low
        else:
            keys = image_embedding.flatten(2).permute(0, 2, 1)  # an expanded batch stays expanded
            key_pe = image_pe.flatten(2).permute(0, 2, 1)
            low = self.final_attn_token_to_image._low(keys)
            if low is not None and not expanded_over_batch(keys):
                key_pe = key_pe.to(low)  # added to low-precision image tokens only (once here)
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            queries, keys = layer(queries, keys, point_embedding, key_pe, prepared if i == 0 else None)
        lp = self.final_attn_token_to_image._low(keys)
        q = queries + point_embedding
        kl = keys if lp is None else keys.to(lp)
        k = kl + (key_pe if lp is None else key_pe.to(lp))
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, kl))
        return queries, keys
