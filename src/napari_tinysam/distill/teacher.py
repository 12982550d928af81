"""Teacher image embeddings of fixed training views, computed once and stored.

As in the paper, the heavy teacher encoder runs once per view, never during training.
A view is a deterministic augmented crop (``augment_crop`` with a per-view seed), so the
student sees exactly the pixels the teacher embedded. The store is a folder:
``signature.json`` (teacher, data, crop settings, version), ``embeddings.npy`` (float16
memmap, one embedding per view) and ``done.npy`` (which views are computed). An
interrupted computation resumes; a store whose signature does not match is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..model import Sam, StoreMismatch, model_fingerprint
from .data import Augment, Sample, seeded_crop

STORE_VERSION = 1


def data_fingerprint(samples: list[Sample]) -> str:
    """Content hash of training images and labels."""
    h = hashlib.blake2b(digest_size=16)
    for s in samples:
        h.update(s.name.encode())
        h.update(np.ascontiguousarray(s.image).tobytes())
        if s.labels is not None:
            h.update(np.ascontiguousarray(s.labels).tobytes())
    return h.hexdigest()


def data_fingerprint_array(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=8).hexdigest()


class TeacherStore:
    """Stored teacher embeddings of ``n_views`` fixed views of ``samples``."""

    def __init__(
        self,
        folder: str | Path,
        teacher: Sam,
        samples: list[Sample],
        n_views: int,
        crop: int,
        augment: Augment,
        seed: int = 0,
        weights: np.ndarray | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.teacher = teacher
        self.samples = samples
        self.n_views = int(n_views)
        self.crop = int(crop)
        self.augment = augment
        self.seed = int(seed)
        self.weights = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
        self.grid = crop // 16
        self.signature = {
            "version": STORE_VERSION,
            "teacher": self._teacher_fingerprint(),
            "data": data_fingerprint(samples),
            "n_views": self.n_views,
            "crop": self.crop,
            "augment": vars(augment),
            "seed": self.seed,
        }
        if teacher.precision != "fp32":
            self.signature["precision"] = teacher.precision
        if self.weights is not None:
            self.signature["weights"] = data_fingerprint_array(self.weights)
        self.signature.update(self._extra_signature())
        self.folder.mkdir(parents=True, exist_ok=True)
        sig_path = self.folder / "signature.json"
        if sig_path.exists():
            stored = json.loads(sig_path.read_text())
            if stored != self.signature:
                diff = sorted(k for k in {*stored, *self.signature} if stored.get(k) != self.signature.get(k))
                raise StoreMismatch(
                    f"teacher embedding store {self.folder} was computed with a different "
                    f"{', '.join(diff)}; use another folder or delete this one"
                )
        else:
            sig_path.write_text(json.dumps(self.signature, indent=1))
        shape = (self.n_views, 256, self.grid, self.grid)
        emb_path = self.folder / "embeddings.npy"
        mode = "r+" if emb_path.exists() else "w+"
        self.embeddings = np.lib.format.open_memmap(emb_path, mode=mode, dtype=np.float16, shape=shape)
        done_path = self.folder / "done.npy"
        self.done = np.load(done_path) if done_path.exists() else np.zeros(self.n_views, bool)
        self.encoder_calls = 0

    def _teacher_fingerprint(self) -> str:
        """What of the teacher the stored views depend on (the whole model here)."""
        return model_fingerprint(self.teacher)

    def _extra_signature(self) -> dict:
        """What a subclass stores beyond the embeddings (part of the signature)."""
        return {}

    def view(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The deterministic crop of view ``i``: uint8 RGB (crop, crop, 3) and labels."""
        return seeded_crop(self.samples, [self.seed, i], self.crop, self.augment, weights=self.weights)

    def _mark_done(self, idx) -> None:
        """Record views as computed, after their data is on disk (atomic rewrite)."""
        self.done[idx] = True
        tmp = self.folder / "done.npy.partial"
        with open(tmp, "wb") as fh:
            np.save(fh, self.done)
        tmp.replace(self.folder / "done.npy")

    @torch.no_grad()
    def compute(self, batch: int = 4, progress: Callable[[int, int], None] | None = None) -> None:
        """Embed every view not yet stored; safe to interrupt and call again."""
        todo = np.flatnonzero(~self.done)
        model = self.teacher
        for start in range(0, len(todo), batch):
            idx = todo[start : start + batch]
            x = torch.from_numpy(np.stack([self.view(int(i))[0] for i in idx])).permute(0, 3, 1, 2).float().contiguous()
            with model.autocast():
                emb = model.image_encoder((x - model.pixel_mean) / model.pixel_std).float()
            self.encoder_calls += 1
            self.embeddings[idx] = emb.numpy().astype(np.float16)
            self.embeddings.flush()
            self._mark_done(idx)
            if progress:
                progress(int(self.done.sum()), self.n_views)

    def get(self, i: int) -> torch.Tensor:
        """Stored embedding of view ``i`` as float32 (1, 256, g, g)."""
        if not self.done[i]:
            raise RuntimeError(f"view {i} has no stored embedding yet; call compute() first")
        return torch.from_numpy(np.asarray(self.embeddings[i], dtype=np.float32))[None]
