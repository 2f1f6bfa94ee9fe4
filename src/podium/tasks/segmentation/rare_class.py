"""Rare-class sampling (RCS) of training patches, from DAFormer (Hoyer et al., "DAFormer: Improving
Network Architectures and Training Strategies for Domain-Adaptive Semantic Segmentation", CVPR
2022, lhoyer/DAFormer `mmseg/datasets/uda_dataset.py`): a class c is drawn with probability

    p(c) = exp((1 - f_c) / T) / sum_c' exp((1 - f_c') / T)

(f_c its pixel frequency over the training set, T = 0.01 by default), then an image containing c
uniformly, so classes seen in few images are learnt early and often. Here the patch is then
centred on a random pixel of class c (clamped inside the image) rather than DAFormer's
retried random crops, so every patch holds its class before augmentation.

    from podium.engine import registry
    train = registry.build("dataset", "synthetic_fundus", {"root": "/tmp/fundus", "count": 6,
                           "size": [64, 64], "val_count": 1, "patch_size": [32, 32]}, seed=0)["train"]
    ds = RareClassPatches(train.records, train.cfg, train.class_names, train.values, train.prepared,
                          temperature=0.01, seed=0)
    ds.class_probabilities   # (K,) — 0 for a class in no image
    ds[3]                    # the same item dict as SegPatchDataset
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from podium.errors import UserError
from podium.tasks.segmentation.data import MAX_LOCATIONS, SegPatchDataset
from podium.tasks.segmentation.pipeline import PreparedImage, SegDataConfig
from podium.tasks.segmentation.readers import SegRecord


def _counts(label: np.ndarray | torch.Tensor, num_classes: int, ignore_index: int) -> np.ndarray:
    flat = (label.numpy() if isinstance(label, torch.Tensor) else np.asarray(label)).ravel().astype(np.int64)
    flat = flat[flat != ignore_index]
    if flat.size and (flat.min() < 0 or flat.max() >= num_classes):
        raise ValueError(f"label values must be in [0, {num_classes}) or {ignore_index}; "
                         f"found {flat.min()}..{flat.max()}")
    return np.bincount(flat, minlength=num_classes)


def class_frequencies(labels: Iterable[np.ndarray | torch.Tensor], num_classes: int, ignore_index: int = 255,
                      min_pixels: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    """(pixel frequency per class over the whole set (K,), summing to 1 — all zeros when no
    pixel is labelled —, per class the sorted image indices holding at least `min_pixels` of its
    pixels (DAFormer's rcs_min_pixels, 3000 at 1024 x 512; 1 = any))."""
    total = np.zeros(num_classes, dtype=np.int64)
    images: list[list[int]] = [[] for _ in range(num_classes)]
    for i, label in enumerate(labels):
        counts = _counts(label, num_classes, ignore_index)
        total += counts
        for c in np.flatnonzero(counts >= max(1, int(min_pixels))):
            images[int(c)].append(i)
    freq = total / total.sum() if total.sum() else np.zeros(num_classes)
    return freq, [np.asarray(v, dtype=np.int64) for v in images]


def rare_class_probabilities(freq: np.ndarray, temperature: float = 0.01,
                             available: np.ndarray | None = None) -> np.ndarray:
    """DAFormer's p(c) = softmax((1 - f) / T) over the classes that can be drawn: those with
    f > 0, or `available` (K,) bool when given (e.g. classes with an image). Others get 0.
    The max is subtracted before exp, so T = 0.01 (exp(100)) or smaller never overflows."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    freq = np.asarray(freq, dtype=np.float64)
    mask = freq > 0 if available is None else np.asarray(available, dtype=bool)
    if not mask.any():
        raise ValueError("no class can be drawn: every class has zero frequency / no image")
    logits = np.where(mask, (1.0 - freq) / temperature, -np.inf)
    e = np.exp(logits - logits[mask].max())
    return e / e.sum()


class RareClassPatches(SegPatchDataset):
    """Training patches drawn by rare-class sampling (see the module docstring); the same items,
    augmentation, length and (seed, epoch, index) determinism as SegPatchDataset. Attributes:
    `frequencies` (K,), `class_probabilities` (K,), `class_images` (per class, the record
    indices holding it)."""

    def __init__(self, records: Sequence[SegRecord], cfg: SegDataConfig, class_names: Sequence[str],
                 values: Mapping[int, int] | None = None, prepared: Sequence[PreparedImage] | None = None,
                 *, seed: int = 0, temperature: float = 0.01, min_pixels: int = 1):
        super().__init__(records, cfg, class_names, values, prepared, seed=seed)
        if temperature <= 0:
            raise UserError(f"rare-class sampling temperature must be > 0 (DAFormer uses 0.01); got {temperature}.")
        self.temperature = float(temperature)
        labels = [p.label for p in self.prepared]
        self.frequencies, self.class_images = class_frequencies(labels, self.num_classes, self.ignore_index,
                                                                min_pixels)
        if not any(v.size for v in self.class_images):
            raise UserError("rare-class sampling: no training image has a labelled pixel "
                            f"(every label is ignore_index {self.ignore_index}).")
        available = np.array([v.size > 0 for v in self.class_images])
        self.class_probabilities = rare_class_probabilities(self.frequencies, self.temperature, available)
        # Per record and class, flat pixel indices (at most MAX_LOCATIONS, subsampled
        # deterministically from the record id as SegPatchDataset does).
        self.class_pixels: list[dict[int, np.ndarray]] = []
        for r, p in zip(self.records, self.prepared):
            flat = p.label.numpy().ravel()
            per: dict[int, np.ndarray] = {}
            for c in range(self.num_classes):
                idx = np.flatnonzero(flat == c)
                if idx.size > MAX_LOCATIONS:
                    rng = np.random.default_rng([zlib.crc32(r.id.encode()), c])
                    idx = np.sort(rng.choice(idx, MAX_LOCATIONS, replace=False))
                if idx.size:
                    per[c] = idx
            self.class_pixels.append(per)

    def draw(self, index: int, rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
        """(class, record, top, left) of item `index`: the class by RCS, a record holding it
        uniformly, the patch centred on one of its pixels and shifted to stay inside the image."""
        if rng is None:
            rng = np.random.default_rng([self.seed % 2**64, self.epoch, int(index)])
        c = int(rng.choice(self.num_classes, p=self.class_probabilities))
        images = self.class_images[c]
        r = int(images[int(rng.integers(images.size))])
        pixels = self.class_pixels[r][c]
        h, w = self.prepared[r].fov.shape
        ph, pw = self.patch_size
        y, x = divmod(int(pixels[int(rng.integers(pixels.size))]), w)
        return c, r, min(max(y - ph // 2, 0), h - ph), min(max(x - pw // 2, 0), w - pw)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed % 2**64, self.epoch, int(index)])
        _, r, top, left = self.draw(index, rng)
        return self.patch_item(r, top, left, rng)
