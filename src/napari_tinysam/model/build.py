"""Building ``Sam`` models from plain-data configs and from checkpoints.

A config is a dict (saved inside project checkpoints)::

    {"image_encoder": {"type": "tiny_vit" | "vit", ...constructor arguments...},
     "img_size": 1024, "prompt_embed_dim": 256,
     "mask_decoder": {"depth": 2, "num_heads": 8, "mlp_dim": 2048,
                      "num_multimask_outputs": 3, "iou_head_depth": 3,
                      "iou_head_hidden_dim": 256}}

Official checkpoints are raw state dicts; their config is inferred from key names and
tensor shapes (:func:`infer_config`).
"""

from __future__ import annotations

import copy
import math
import os
import pickletools
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .image_encoder import ImageEncoderViT
from .instance_head import build_instance_head
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer

CHECKPOINT_FORMAT = "napari-tinysam"
CHECKPOINT_VERSION = 1

DEFAULT_DECODER = {
    "depth": 2,
    "num_heads": 8,
    "mlp_dim": 2048,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
}

# Named architectures (configuration is data, not subclasses).
TINY_VIT_5M = {
    "type": "tiny_vit",
    "embed_dims": [64, 128, 160, 320],
    "depths": [2, 2, 6, 2],
    "num_heads": [2, 4, 5, 10],
    "window_sizes": [7, 7, 14, 7],
    "mlp_ratio": 4.0,
    "mbconv_expand_ratio": 4.0,
    "local_conv_size": 3,
    "downsample_strides": [2, 2, 1],
    "num_classes": 1000,
}
VIT_CONFIGS = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": [2, 5, 8, 11]},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": [5, 11, 17, 23]},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": [7, 15, 23, 31]},
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the architecture."""


class StoreMismatch(ValueError):
    """A stored computation (embedding store, teacher store) was made for other data,
    another model or other settings than the ones at hand."""


def model_fingerprint(model: Sam) -> str:
    """Content hash of a model's weights and config (cached on the model object)."""
    cached = getattr(model, "_fingerprint", None)
    if cached is not None:
        return cached
    import hashlib
    import json

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.config, sort_keys=True).encode())
    model._fingerprint = _weights_digest(h, model)
    return model._fingerprint


def encoder_fingerprint(model: Sam) -> str:
    """Content hash of a model's image encoder weights and input size (what its image
    embeddings depend on; the instance head, say, does not count)."""
    import hashlib

    return _weights_digest(hashlib.blake2b(str(model.img_size).encode(), digest_size=16), model.image_encoder)


def _weights_digest(h, module: torch.nn.Module) -> str:
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def architecture_config(name: str, img_size: int = 1024) -> dict[str, Any]:
    """Config of a named architecture: ``vit_t`` (TinySAM/MobileSAM) or ``vit_b/l/h``."""
    if name == "vit_t":
        enc = dict(TINY_VIT_5M)
    elif name in VIT_CONFIGS:
        enc = {
            "type": "vit",
            "patch_size": 16,
            "mlp_ratio": 4.0,
            "window_size": 14,
            "qkv_bias": True,
            "use_rel_pos": True,
            **VIT_CONFIGS[name],
        }
    else:
        raise ValueError(f"unknown architecture {name!r}; use vit_t, vit_b, vit_l or vit_h")
    return {
        "image_encoder": enc,
        "img_size": img_size,
        "prompt_embed_dim": 256,
        "mask_decoder": dict(DEFAULT_DECODER),
    }


def build_sam(config: dict[str, Any]) -> Sam:
    """Construct an (uninitialised) ``Sam`` from a config dict."""
    config = copy.deepcopy(config)
    img_size = int(config["img_size"])
    if img_size % 16:
        raise ValueError(f"img_size must be a multiple of 16, got {img_size}")
    embed_dim = int(config.get("prompt_embed_dim", 256))
    enc = dict(config["image_encoder"])
    kind = enc.pop("type")
    if kind == "tiny_vit":
        image_encoder = TinyViT(img_size=img_size, out_chans=embed_dim, **enc)
        grid = img_size // 16
    elif kind == "vit":
        image_encoder = ImageEncoderViT(img_size=img_size, out_chans=embed_dim, **enc)
        grid = img_size // enc.get("patch_size", 16)
    else:
        raise ValueError(f"unknown image encoder type {kind!r}")
    dec = {**DEFAULT_DECODER, **config.get("mask_decoder", {})}
    mask_decoder = MaskDecoder(
        transformer_dim=embed_dim,
        transformer=TwoWayTransformer(
            depth=dec["depth"],
            embedding_dim=embed_dim,
            num_heads=dec["num_heads"],
            mlp_dim=dec["mlp_dim"],
        ),
        num_multimask_outputs=dec["num_multimask_outputs"],
        iou_head_depth=dec["iou_head_depth"],
        iou_head_hidden_dim=dec["iou_head_hidden_dim"],
    )
    prompt_encoder = PromptEncoder(embed_dim, (grid, grid), (img_size, img_size), 16)
    head = build_instance_head(config["instance_head"]) if config.get("instance_head") else None
    return Sam(image_encoder, prompt_encoder, mask_decoder, config, instance_head=head)


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_config(sd: dict[str, torch.Tensor], img_size: int | None = None) -> dict[str, Any]:
    """Infer the architecture of a raw SAM/TinySAM/MobileSAM state dict from its keys and
    shapes. ``img_size`` defaults to 1024 for TinyViT (not recorded in the weights) and
    to the positional-embedding size for ViT encoders."""
    if "image_encoder.patch_embed.seq.0.c.weight" in sd:
        n_layers = _count(sd, r"image_encoder\.layers\.(\d+)\.")
        dims, depths, heads, windows = [], [], [], []
        mlp_ratio, local_conv = 4.0, 3
        for i in range(n_layers):
            p = f"image_encoder.layers.{i}"
            depths.append(_count(sd, rf"{re.escape(p)}\.blocks\.(\d+)\."))
            if i == 0:
                w = sd[f"{p}.blocks.0.conv1.c.weight"]
                dims.append(int(w.shape[1]))
                expand = w.shape[0] / w.shape[1]
                heads.append(max(1, dims[0] // 32))
                windows.append(7)
            else:
                ab = sd[f"{p}.blocks.0.attn.attention_biases"]
                dims.append(int(sd[f"{p}.blocks.0.attn.norm.weight"].shape[0]))
                heads.append(int(ab.shape[0]))
                windows.append(math.isqrt(int(ab.shape[1])))
                mlp_ratio = sd[f"{p}.blocks.0.mlp.fc1.weight"].shape[0] / dims[-1]
                local_conv = int(sd[f"{p}.blocks.0.local_conv.c.weight"].shape[-1])
        head = sd.get("image_encoder.head.weight")
        enc = {
            "type": "tiny_vit",
            "embed_dims": dims,
            "depths": depths,
            "num_heads": heads,
            "window_sizes": windows,
            "mlp_ratio": float(mlp_ratio),
            "mbconv_expand_ratio": float(expand),
            "local_conv_size": local_conv,
            "downsample_strides": [2] * (n_layers - 2) + [1],
            "num_classes": int(head.shape[0]) if head is not None else 0,
        }
        size = img_size or 1024
    elif "image_encoder.patch_embed.proj.weight" in sd:
        pw = sd["image_encoder.patch_embed.proj.weight"]
        dim, patch = int(pw.shape[0]), int(pw.shape[-1])
        depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.")
        pos = sd.get("image_encoder.pos_embed")
        grid = int(pos.shape[1]) if pos is not None else (img_size or 1024) // patch
        use_rel = "image_encoder.blocks.0.attn.rel_pos_h" in sd
        if use_rel:
            sizes = [int(sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0]) for i in range(depth)]
            head_dim = int(sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
            glob = [i for i, s in enumerate(sizes) if s == 2 * grid - 1]
            local = [s for s in sizes if s != 2 * grid - 1]
            window = (min(local) + 1) // 2 if local else 14
        else:
            head_dim, glob, window = 64, [], 14
        enc = {
            "type": "vit",
            "patch_size": patch,
            "embed_dim": dim,
            "depth": depth,
            "num_heads": dim // head_dim,
            "mlp_ratio": sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / dim,
            "qkv_bias": "image_encoder.blocks.0.attn.qkv.bias" in sd,
            "use_rel_pos": use_rel,
            "use_abs_pos": pos is not None,
            "window_size": window,
            "global_attn_indexes": glob,
        }
        size = img_size or grid * patch
    else:
        raise CheckpointError(
            "not a SAM-family state dict: no image_encoder.patch_embed weights found "
            f"(first keys: {', '.join(list(sd)[:3]) or 'none'})"
        )
    embed_dim = int(sd["mask_decoder.iou_token.weight"].shape[1]) if "mask_decoder.iou_token.weight" in sd else 256
    n_tokens = int(sd["mask_decoder.mask_tokens.weight"].shape[0]) if "mask_decoder.mask_tokens.weight" in sd else 4
    dec = {
        "depth": _count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\."),
        "num_heads": 8,
        "mlp_dim": int(sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0])
        if "mask_decoder.transformer.layers.0.mlp.lin1.weight" in sd
        else 2048,
        "num_multimask_outputs": n_tokens - 1,
        "iou_head_depth": _count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.") or 3,
        "iou_head_hidden_dim": int(sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0])
        if "mask_decoder.iou_prediction_head.layers.0.weight" in sd
        else 256,
    }
    return {"image_encoder": enc, "img_size": size, "prompt_embed_dim": embed_dim, "mask_decoder": dec}


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(model: Sam, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load weights, converting them to float32; raise ``CheckpointError`` naming a few
    missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_describe(shapes, 3)}")
        raise CheckpointError(f"{source} does not match the model architecture; " + "; ".join(parts))
    converted = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(converted, strict=True)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``) and return
    ``{"config", "state_dict", "meta"}``. Raw official state dicts get an inferred config."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read {path}: it is truncated, corrupted or not a PyTorch checkpoint ({exc})"
        ) from exc
    except Exception as exc:  # pickle.UnpicklingError for pickled modules and the like
        if is_pickled_module(path):
            raise CheckpointError(
                f"refusing to load {path}: it is a pickled nn.Module (as the official Q-TinySAM "
                "release), and unpickling it would run arbitrary code. Produce the equivalent "
                "int8 model from the official float weights instead: `napari-tinysam models "
                "download tinysam`, then `napari-tinysam quantize tinysam IMAGES -o "
                "tinysam-int8.pt` with a few of your own images, and load that file"
            ) from exc
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects, not plain weights "
            f"(only tensors and plain data are loaded, never arbitrary code): {exc}"
        ) from exc
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if int(obj.get("version", 0)) > CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{path} was written by a newer napari-tinysam (format version "
                f"{obj.get('version')}); upgrade the package"
            )
        return {"config": obj["config"], "state_dict": obj["state_dict"], "meta": obj.get("meta", {})}
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # training checkpoints of some SAM forks
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return {"config": infer_config(obj), "state_dict": obj, "meta": {}}


def is_pickled_module(path: str | Path) -> bool:
    """Whether a file holds a pickled ``nn.Module`` (as the official Q-TinySAM release),
    judged from the pickle's class references without unpickling anything."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                return False
            data = zf.read(name)
    except (zipfile.BadZipFile, OSError):
        try:
            data = path.read_bytes()[: 1 << 20]
        except OSError:
            return False
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL" or (op.name.endswith("UNICODE") and isinstance(arg, str)):
                text = str(arg)
                if "torch.nn.modules" in text or text.startswith(("tinysam", "segment_anything", "mobile_sam")):
                    return True
    except Exception:  # a truncated or non-pickle stream: not a module we can name
        return False
    return False


def write_checkpoint(
    path: str | os.PathLike,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a project-format checkpoint atomically (temporary file + rename), so that an
    interrupted write never leaves a file that looks complete."""
    obj = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config,
        "state_dict": state_dict,
        "meta": meta or {},
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(
    model: Sam, path: str | os.PathLike, meta: dict[str, Any] | None = None, half: bool = False
) -> None:
    """Write ``model`` in the project's format, atomically."""
    sd = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
        for k, v in model.state_dict().items()
    }
    write_checkpoint(path, model.config, sd, meta)


def update_checkpoint_meta(path: str | os.PathLike, updates: dict[str, Any]) -> None:
    """Merge ``updates`` into the ``meta`` of a project-format checkpoint (float or
    quantized), rewriting the file atomically; weights are copied unchanged."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path} is not a napari-tinysam checkpoint; only those carry meta")
    write_checkpoint(path, obj["config"], obj["state_dict"], {**obj.get("meta", {}), **updates})


#: Loaders of checkpoints that are not plain float models, by the config key that marks
#: them: ``(config, state_dict, device, source) -> Sam``. The packages that make such
#: checkpoints register here (``napari_tinysam.quantize``: ``quantization``), so this
#: module needs none of them.
CHECKPOINT_KINDS: dict[str, Callable[[dict, dict, Any, str], Sam]] = {}


def register_checkpoint_kind(key: str, loader: Callable[[dict, dict, Any, str], Sam]) -> None:
    """Load checkpoints whose config carries ``key`` with ``loader``."""
    CHECKPOINT_KINDS[key] = loader


def sam_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Sam:
    """Build and load a model from any supported checkpoint file; returns it in eval mode."""
    ckpt = read_checkpoint(path)
    kind = next((k for k in CHECKPOINT_KINDS if k in ckpt["config"]), None)
    if kind is not None:
        model = CHECKPOINT_KINDS[kind](ckpt["config"], ckpt["state_dict"], device, str(path))
    else:
        model = build_sam(ckpt["config"])
        load_state_dict_strict(model, ckpt["state_dict"], source=str(path))
    model.meta = ckpt["meta"]
    model.requires_grad_(False)  # an inference model; training builds its own
    return model.to(device).eval()
