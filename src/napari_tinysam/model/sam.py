"""The ``Sam`` container: image encoder + prompt encoder + mask decoder, pixel
normalisation, padding and mask upscaling."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
import weakref
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from ..precision import autocast, resolve_precision
from .common import cached_cast
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

#: Set to 1 to compile the image encoder of every model ``load_model`` returns (the CLI's
#: ``--compile`` sets it, so Dask workers started from it inherit the choice).
COMPILE_ENV_VAR = "TINYSAM_COMPILE"
# Sam -> its compiled encoder (None until the first embedding builds it). Kept outside the
# module so that state dicts, copies and pickles of a model never carry compiled code.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_requested() -> bool:
    """Whether the environment variable ``TINYSAM_COMPILE`` asks for compiled encoders."""
    return os.environ.get(COMPILE_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of a 1D bilinear resize with
    ``align_corners=False`` and no antialiasing (torch's ``F.interpolate`` semantics)."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0
    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
    return m


@lru_cache(maxsize=32)
def _upscale_matrix(low: int, padded: int, valid: int, original: int) -> torch.Tensor:
    """One axis of SAM's mask postprocessing as a single (original, low) matrix:
    resize low -> padded, crop to the valid (unpadded) part, resize to the original size."""
    up = bilinear_matrix(low, padded)[:valid]
    down = bilinear_matrix(valid, original)
    return torch.from_numpy(down @ up).float()


@lru_cache(maxsize=32)
def _upscale_used(low: int, padded: int, valid: int, original: int) -> torch.Tensor:
    """``_upscale_matrix`` without its trailing all-zero columns (the low-resolution
    cells that lie in the padding), contiguous."""
    m = _upscale_matrix(low, padded, valid, original)
    used = int(torch.nonzero(m.abs().sum(0)).max()) + 1
    return m[:, :used].contiguous()


@lru_cache(maxsize=32)
def _upscale_taps(low: int, padded: int, valid: int, original: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The nonzero entries of each row of ``_upscale_matrix``: column indices and weights,
    both (original, k). An output pixel blends two pixels of the padded-size resize, each
    a blend of two neighbouring low-resolution cells, so k is 3 (4 at most); rows with
    fewer entries are padded with weight 0."""
    m = _upscale_matrix(low, padded, valid, original)
    nonzero = m != 0
    k = int(nonzero.sum(1).max())
    idx = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :k].contiguous()
    return idx, torch.gather(m, 1, idx).contiguous()


class Sam(nn.Module):
    """Segment Anything model.

    ``config`` is the plain-data description the model was built from (see
    ``napari_tinysam.model.build``); it is saved with project checkpoints.
    """

    mask_threshold: float = 0.0
    # "fp32", "bf16" or "fp16": what the forward passes run at (``load_model`` sets it
    # from its ``precision`` argument; see ``napari_tinysam.precision``).
    precision: str = "fp32"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        config: dict[str, Any] | None = None,
        instance_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Optional (project checkpoints only): foreground and distance maps from the
        # embedding, which seed everything mode with one prompt per object.
        self.instance_head = instance_head
        self.config = config or {}
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)

    @property
    def img_size(self) -> int:
        """Side of the square model input in pixels (1024 for official weights)."""
        return int(self.image_encoder.img_size)

    @property
    def max_upscale(self) -> float | None:
        """The largest factor by which an image smaller than the input is enlarged, from
        the checkpoint's meta. None (official weights): the longest side always becomes
        ``img_size``, as in SAM. Models trained on objects of one size (the bundled
        nuclei model) set it so that small slices are not blown up past that size."""
        value = getattr(self, "meta", {}).get("max_upscale")
        return float(value) if value else None

    @property
    def arithmetic(self) -> str:
        """What the forward passes run as, for status lines: the precision (``"fp32"``,
        ``"bf16"``, ``"fp16"``), or for an int8 model ``"int8 kernels"`` or ``"int8,
        simulated"`` (where the CPU's int8 kernels are missing or inexact)."""
        quantization = getattr(self, "quantization", None)
        if not quantization:
            return self.precision
        return "int8 kernels" if quantization.get("int8_kernels") else "int8, simulated"

    def set_precision(self, precision: str) -> Sam:
        """Run the forward passes at ``precision`` (``"auto"``, ``"fp32"``, ``"bf16"``,
        ``"fp16"``); embeddings cached under the previous precision are not reused."""
        resolved = resolve_precision(precision, self.device)
        if resolved != "fp32" and getattr(self, "quantization", None):
            if precision != "auto":
                raise ValueError("an int8 model runs its own integer kernels; load it with precision='fp32' or 'auto'")
            resolved = "fp32"
        if resolved != self.precision:
            self.precision = resolved
            self.__dict__.pop("_cache_token", None)
        # a single click's float32 decoder still runs its large products in bfloat16
        self.mask_decoder.set_product_dtype(
            torch.bfloat16 if resolved == "bf16" and self.device.type == "cpu" else None
        )
        return self

    #: Prompts per decoder call from which the decoder, too, runs at the model's precision.
    #: A single prompt's decoder is made of small products, for which casting the weights
    #: costs more than bfloat16 saves (12 -> 16 ms per click on the bundled model), while
    #: batches of prompts (everything mode) gain (9.8 -> 7.6 ms per prompt at 16). Below
    #: it only the products over every image token run in bfloat16, from weight copies
    #: cast once (``MaskDecoder.set_product_dtype``).
    decode_autocast_batch: int = 4

    #: Decode a batch one prompt at a time where a single prompt takes another path than a
    #: batch (low-precision products, ``MaskDecoder.set_product_dtype``), so that a
    #: benchmark batching objects scores exactly what single clicks give (set by
    #: :meth:`interactive_decoding`).
    decode_singly: bool = False

    @contextlib.contextmanager
    def interactive_decoding(self):
        """Decode every batch as a single click is decoded (float32 decoder at any batch
        size, and one prompt at a time where single prompts take their own low-precision
        path): prompted benchmarks batch objects, and must score what a user clicking one
        object at a time gets."""
        before = self.decode_autocast_batch, self.decode_singly
        self.decode_autocast_batch, self.decode_singly = sys.maxsize, True
        try:
            yield self
        finally:
            self.decode_autocast_batch, self.decode_singly = before

    def autocast(self, batch: int | None = None):
        """The autocast context of this model's precision (a no-op for float32); with
        ``batch``, float32 for decoder calls of fewer prompts than ``decode_autocast_batch``."""
        if batch is not None and batch < self.decode_autocast_batch:
            return autocast(self.device, "fp32")
        return autocast(self.device, self.precision)

    @property
    def click_dtype(self) -> torch.dtype | None:
        """The dtype of a single click's large products and of its masks' upscaling
        (``MaskDecoder.set_product_dtype``); None: float32."""
        return self.mask_decoder.product_dtype

    @property
    def has_instance_head(self) -> bool:
        return self.instance_head is not None

    def instance_maps(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, 3, s/4, s/4) of the instance head: foreground, normalised
        centre distance and normalised boundary distance (see ``instance_head``)."""
        if self.instance_head is None:
            raise ValueError(
                "this model has no instance head (official checkpoints carry none); use "
                "mode='hierarchical' or 'grid', or a model trained with one (the bundled 'default')"
            )
        with self.autocast():
            logits = self.instance_head(image_embeddings.float())
        return torch.sigmoid(logits.float())

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) RGB in [0, 255], longest side <= img_size -> normalised and
        zero-padded (bottom/right) to (B, 3, img_size, img_size)."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        # contiguous: an image permuted from (H, W, 3) is channels-last in memory, and that
        # layout would carry through every convolution (2x slower in bfloat16, 1.3x in float32)
        return torch.nn.functional.pad(x, (0, self.img_size - w, 0, self.img_size - h)).contiguous()

    def set_compiled(self, enabled: bool = True) -> Sam:
        """Run the image encoder compiled by ``torch.compile`` (inductor, weights frozen into
        the graph, fixed input shape). The first embedding compiles it: tens of seconds on a
        laptop CPU, less in later processes thanks to inductor's on-disk cache; afterwards
        each embedding is faster (docs/benchmarks.md). For inference only: with autograd
        on, the eager encoder runs; if compilation fails (no C++ compiler, say), the eager
        encoder runs with a warning. Reload or ``set_compiled(False)`` after changing weights."""
        if not enabled:
            _COMPILED.pop(self, None)
            return self
        if getattr(self, "quantization", None):
            raise ValueError("an int8 model runs its own integer kernels; compile applies to float models")
        _COMPILED.setdefault(self, None)
        return self

    @property
    def compiled(self) -> bool:
        """Whether the image encoder runs compiled (see :meth:`set_compiled`)."""
        return self in _COMPILED

    def at_input_size(self, size: int) -> Sam:
        """This model run at another square input size (a multiple of 16), sharing every
        weight. TinyViT and the mask decoder work at any size; only the prompt encoder's
        grid and pixel frame change with it, as in a model built at that size. Everything
        mode embeds images that fill the input at the size tuned for it
        (``meta["auto"]["input_size"]``). The model of each size is made once; it follows
        this model's precision and compilation."""
        size = int(size)
        if size == self.img_size:
            return self
        if size % 16 or size < 64:
            raise ValueError(f"the input size must be a multiple of 16 and at least 64, got {size}")
        from .tiny_vit import TinyViT

        if not isinstance(self.image_encoder, TinyViT):
            raise ValueError(
                f"only TinyViT encoders run at another input size ({type(self.image_encoder).__name__} "
                "has position embeddings of its own size)"
            )
        sized = self.__dict__.setdefault("_sized", {})
        model = sized.get(size)
        if model is None:
            model = copy.copy(self)
            for key in ("_sized", "_cache_token"):  # its own embeddings in any cache
                model.__dict__.pop(key, None)
            model._modules = dict(self._modules)
            encoder = copy.copy(self.image_encoder)
            encoder.img_size = size
            prompt = copy.copy(self.prompt_encoder)
            prompt.__dict__.pop("_dense_pe", None)
            grid = size // 16
            prompt.image_embedding_size, prompt.input_image_size = (grid, grid), (size, size)
            prompt.mask_input_size = (4 * grid, 4 * grid)
            model._modules.update(image_encoder=encoder, prompt_encoder=prompt)
            model.config = {**self.config, "img_size": size}
            sized[size] = model
        if model.precision != self.precision:
            model.precision = self.precision
            model.__dict__.pop("_cache_token", None)
        if self.compiled != model.compiled:
            model.set_compiled(self.compiled)
        return model

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding of a resized RGB image (B, 3, h, w) in [0, 255]:
        (B, 256, img_size/16, img_size/16)."""
        with self.autocast():
            x = self.preprocess(x)
            if self not in _COMPILED or torch.is_grad_enabled():
                return self.image_encoder(x).float()
            import torch._inductor.config as inductor_config

            encoder = _COMPILED[self]
            if encoder is None:
                encoder = _COMPILED[self] = torch.compile(self.image_encoder, dynamic=False)
            try:
                # compilation happens inside the call (first call, recompiles); freezing
                # must be on there: torch.compile(options={"freezing": True}) leaves it off
                # (299 -> 322 ms against 137 ms with it, bfloat16 at 768)
                with inductor_config.patch(freezing=True):
                    return encoder(x).float()
            except Exception as exc:  # the compiler itself failed on this platform
                _COMPILED.pop(self, None)
                warnings.warn(
                    f"compiling the image encoder failed ({type(exc).__name__}: {exc}); running it eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return self.image_encoder(x).float()

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        tokens: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in model-input pixels -> low-resolution logits (B, 4, s/4, s/4) and
        IoU predictions (B, 4) for all four mask tokens, or for those of ``tokens`` only
        (``mask_tokens``; the others' masks are then not computed)."""
        batch = len(points[0]) if points is not None else len(boxes) if boxes is not None else len(mask_input)
        if batch > 1 and self.decode_singly and self.mask_decoder.product_dtype is not None:

            def one(t, i):
                return None if t is None else t[i : i + 1] if len(t) == batch else t

            outs = [
                self.decode(
                    one(image_embeddings, i),
                    None if points is None else (one(points[0], i), one(points[1], i)),
                    one(boxes, i),
                    one(mask_input, i),
                    tokens,
                )
                for i in range(batch)
            ]
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        with self.autocast(batch):
            sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input, factored=batch == 1)
            low, iou = self.mask_decoder(
                image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, tokens=tokens
            )
        return low.float(), iou.float()

    def decode_windows(
        self,
        image_embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor],
        boxes: torch.Tensor | None,
        origins: torch.Tensor,
        size: int,
        tokens: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-object decoding on a window of the image embedding: prompt i sees only
        the ``size`` x ``size`` image tokens whose top-left token is ``origins[i]`` (row,
        col), with their positional encodings, so the transformer and the upscaling work
        on size^2 tokens instead of the whole grid. Prompts are in model-input pixels of
        the whole image, as for :meth:`decode`.

        Returns low-resolution logits (B, 4, 4 size, 4 size) of the windows and IoU
        predictions (B, 4), or of ``tokens`` only (``mask_tokens``).
        """
        corners = origins.tolist()

        def windows(grid: torch.Tensor) -> torch.Tensor:  # (1, C, h, w) -> (B, C, size, size)
            # copied channels last: the transformer reads the window's tokens as
            # contiguous rows of C (a gather along the grid's axes was several times slower)
            cl = grid[0].permute(1, 2, 0)
            return torch.stack([cl[y : y + size, x : x + size] for y, x in corners]).permute(0, 3, 1, 2)

        with self.autocast(len(origins)):
            sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None, dense_size=(size, size))
            low, iou = self.mask_decoder(
                windows(image_embeddings), windows(self.prompt_encoder.get_dense_pe()), sparse, dense, tokens=tokens
            )
        return low.float(), iou.float()

    def decode_filtered(
        self, image_embeddings: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor], iou_thresh: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Multimask decoding that skips the mask upscaling of prompts none of whose three
        multimask outputs has a predicted IoU above ``iou_thresh`` (everything mode).

        Returns the indices (K,) of the kept prompts, their low-resolution logits
        (K, 3, s/4, s/4) and IoU predictions (K, 3) of tokens 1..3.
        """
        dec = self.mask_decoder
        with self.autocast(len(points[0])):
            sparse, dense = self.prompt_encoder(points=points, boxes=None, masks=None)
            hs, src = dec.run_transformer(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense)
            iou = dec.predict_iou(hs)[:, 1:].float()
            keep = torch.nonzero((iou > iou_thresh).any(1)).flatten()
            if len(keep) == 0:
                side = 4 * src.shape[2]  # src is (B, h, w, C)
                return keep, image_embeddings.new_zeros((0, 3, side, side)), iou[:0]
            low = dec.masks_from_tokens(hs[keep], src[keep], slice(1, None))
        return keep, low.float(), iou[keep]

    @staticmethod
    def mask_tokens(multimask_output: bool) -> slice:
        """Tokens 1..3 when ``multimask_output`` (TinySAM's outputs), token 0 otherwise."""
        return slice(1, None) if multimask_output else slice(0, 1)

    def binarize(self, logits: torch.Tensor) -> np.ndarray:
        """Masks where ``logits`` exceed ``mask_threshold``, as a numpy bool array.

        numpy's comparison is several times faster than torch's on a CPU (a click's three
        520x696 masks: about 0.06 against 0.4-0.9 ms). A bfloat16 logit is above 0 exactly
        when its bits read as an int16 are above 0 (sign bit clear, not +0; logits are
        never NaN), so those are compared without a cast."""
        if logits.dtype == torch.bfloat16 and self.mask_threshold == 0.0:
            return logits.view(torch.int16).cpu().numpy() > 0
        return logits.float().cpu().numpy() > self.mask_threshold

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Upscale low-resolution logits (B, T, s/4, s/4) to the original image (B, T, H, W).

        The reference's two bilinear resizes (to the padded input size, crop to the valid
        region, to the original size), composed into one matrix per axis
        (``_upscale_matrix``; the same map up to float rounding), applied to the
        low-resolution cells that reach the valid region: along x as a matrix product on
        the small low-resolution rows, then along y as a blend of the few low-resolution
        rows each output row draws on (``_upscale_taps``), which is several times faster
        than the two resizes (docs/benchmarks.md). Callers upscale only the masks they
        return; the matrices' rows upscale just a window of a mask (everything mode).

        ``dtype``: the arithmetic and the result's dtype, float32 when None. A click on a
        bfloat16 model upscales in bfloat16 (``MaskDecoder.product_dtype``): its logits
        come from bfloat16 products already, and the product and the row blend take half
        the time.
        """
        s = self.img_size
        rx = _upscale_used(masks.shape[-1], s, input_size[1], original_size[1]).to(masks.device)
        iy, wy = (t.to(masks.device) for t in _upscale_taps(masks.shape[-2], s, input_size[0], original_size[0]))
        dtype = dtype or torch.float32
        if dtype != torch.float32:  # mixed-dtype products and blends are slow: all at dtype
            rx, wy = cached_cast(rx, dtype), cached_cast(wy, dtype)
        rows = torch.matmul(masks[..., : int(iy.max()) + 1, : rx.shape[1]].to(dtype), rx.T)  # (..., used rows, W)
        out = rows.index_select(-2, iy[:, 0]) * wy[:, 0, None]
        for k in range(1, iy.shape[1]):
            out.addcmul_(rows.index_select(-2, iy[:, k]), wy[:, k, None])
        return out
