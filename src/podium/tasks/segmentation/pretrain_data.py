"""Unlabelled images for contrastive pretraining: every item is two augmented views of one image.

The views follow MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive
Learning", arXiv:2003.04297; the SimCLR augmentations, Chen et al. 2020, arXiv:2002.05709):
RandomResizedCrop (scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2,
Gaussian blur (sigma 0.1-2, kernel ~10% of the crop) with p 0.5, horizontal flip — with
torchvision.transforms.v2, drawn from the torch generator the engine's SeededDataset seeds with
(seed, epoch, index), so the two views differ from each other but a resumed run sees the same
views as an uninterrupted one, whatever the worker count.

Images are found with glob patterns under `data.root` (e.g. DRIVE: root
../shared/data/drive/training/images, patterns ["*.tif"]; "**/" recurses, "../" reaches a sibling
folder), sorted naturally, decoded once (scale, optional CLAHE) and kept in memory as uint8
unless `data.cache=false`. A permutation drawn from `split_seed` alone gives the first
`val_count` images to "val" (one pair of views per image, the same at every validation) and the
rest to "train" (`repeats` items per image and epoch). With `instance_size` set, an item is first
a random region of its image and both views are cut from that region: with a dozen large fundus
photos, whole-image instances make every batch and the queue full of views of the same images
(InfoNCE then pushes positives apart), while regions give thousands of distinct instances. With no root and `synthetic: N`, N
generated fundus images are used (podium.tasks.segmentation.synthetic), for demos and tests.

    podium pretrain data.root=../shared/data/drive/training/images 'data.patterns=[*.tif]'
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from podium.common.structured import as_config
from podium.engine.registry import register
from podium.errors import UserError

IMAGE_PATTERNS = ["*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.bmp", "*.gif", "*.webp"]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class UnlabelledImagesConfig:
    name: str = "unlabelled_images"
    root: str | None = None  # folder the patterns are relative to
    patterns: list[str] = field(default_factory=lambda: list(IMAGE_PATTERNS))  # globs; "**/" recurses
    synthetic: int = 0  # > 0 and no root: this many generated fundus images (demos, tests)
    synthetic_size: list[int] = field(default_factory=lambda: [128, 128])  # (H, W) of generated images
    channels: int = 3  # 3 = RGB, 1 = grey (green channel with clahe: green, else luma)
    clahe: str = "none"  # lab | green | none (segmentation.preprocess.clahe)
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    scale: float = 1.0  # resize factor of whole images, applied once when they are read
    cache: bool = True  # keep the decoded images in memory (False: decode per item)
    crop_size: list[int] = field(default_factory=lambda: [224, 224])  # view (H, W)
    # > 0: an instance is a random region of this size (H, W), both views are cut from it (few
    # large images: each region is a different instance, not another view of the same image)
    instance_size: list[int] = field(default_factory=lambda: [0, 0])
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area range
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # on [0, 1] values
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    val_count: int = 4  # images carved off for validation (>= 2: the val metric ranks views)
    split_seed: int = 0
    repeats: int = 1  # training items (view pairs) per image and epoch
    max_images: int = 0  # > 0: keep the first N images of every split


def natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def synthetic_root(count: int, size: list[int]) -> Path:
    """Where the synthetic_fundus dataset caches the same generation (shared with it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "podium" / "segmentation" / "synthetic_fundus" / f"n{count}-{size[0]}x{size[1]}-seed0"


def find_images(c: UnlabelledImagesConfig) -> list[Path]:
    """The image files the config names, sorted naturally; UserError when there are none."""
    if not c.root:
        if c.synthetic > 0:
            from podium.tasks.segmentation.synthetic import write_synthetic_fundus

            root = write_synthetic_fundus(synthetic_root(c.synthetic, c.synthetic_size), c.synthetic,
                                          c.synthetic_size, 0)
            return sorted((root / "images").glob("*.tif"), key=lambda p: natural_key(p.name))
        raise UserError("data.root is required: the folder of unlabelled images "
                        "(e.g. data.root=../shared/data/drive/training/images 'data.patterns=[*.tif]').")
    root = Path(c.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root={c.root}: folder does not exist.")
    if not c.patterns:
        raise UserError("data.patterns is empty; give glob patterns such as ['*.png', '*.tif'].")
    files = {Path(p).resolve() for pattern in c.patterns
             for p in glob.glob(str(root / pattern), recursive=True) if Path(p).is_file()}
    if not files:
        raise UserError(f"no images match data.patterns={list(c.patterns)} under data.root={c.root}.")
    return sorted(files, key=lambda p: natural_key(str(p)))


def check_config(c: UnlabelledImagesConfig) -> None:
    if c.channels not in (1, 3):
        raise UserError(f"data.channels={c.channels}: expected 1 or 3.")
    if len(c.mean) != c.channels or len(c.std) != c.channels or min(c.std) <= 0:
        raise UserError(f"data.mean / data.std need {c.channels} values (std > 0), got {list(c.mean)} / {list(c.std)}.")
    if len(c.crop_size) != 2 or min(c.crop_size) < 8:
        raise UserError(f"data.crop_size={list(c.crop_size)}: expected [H, W], each >= 8.")
    if len(c.instance_size) != 2 or min(c.instance_size) < 0 or (0 in c.instance_size and max(c.instance_size) > 0):
        raise UserError(f"data.instance_size={list(c.instance_size)}: expected [H, W], both > 0, or [0, 0] (whole images).")
    if len(c.crop_scale) != 2 or not 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1:
        raise UserError(f"data.crop_scale={list(c.crop_scale)}: expected [low, high] with 0 < low <= high <= 1.")
    if len(c.jitter) != 4 or min(c.jitter) < 0 or c.jitter[3] > 0.5:
        raise UserError(f"data.jitter={list(c.jitter)}: expected [brightness, contrast, saturation, hue], "
                        "all >= 0, hue <= 0.5.")
    if len(c.blur_sigma) != 2 or not 0 < c.blur_sigma[0] <= c.blur_sigma[1]:
        raise UserError(f"data.blur_sigma={list(c.blur_sigma)}: expected [low, high] with 0 < low <= high.")
    for key in ("jitter_p", "grayscale_p", "blur_p", "hflip_p", "vflip_p"):
        if not 0 <= getattr(c, key) <= 1:
            raise UserError(f"data.{key}={getattr(c, key)}: expected a probability in [0, 1].")
    if c.scale <= 0 or c.repeats < 1 or c.val_count < 2 or c.max_images < 0:
        raise UserError(f"data.scale={c.scale} (> 0), data.repeats={c.repeats} (>= 1), data.val_count="
                        f"{c.val_count} (>= 2) and data.max_images={c.max_images} (>= 0) are out of range.")
    from podium.tasks.segmentation.preprocess import check_clahe

    check_clahe(c.clahe, c.clahe_clip, c.clahe_tiles)


def read_unlabelled(path: Path, c: UnlabelledImagesConfig) -> np.ndarray:
    """Decode, scale, CLAHE, channels: (H, W, channels) uint8. A bad file -> UserError naming it."""
    import cv2

    from podium.tasks.segmentation.preprocess import clahe
    from podium.tasks.segmentation.readers import read_image

    image = read_image(path)
    if c.scale != 1.0:
        h, w = image.shape[:2]
        size = (max(1, round(w * c.scale)), max(1, round(h * c.scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if c.scale < 1 else cv2.INTER_LINEAR)
    image = clahe(image, c.clahe, c.clahe_clip, c.clahe_tiles)
    if c.channels == 1:
        grey = image[:, :, 1] if c.clahe == "green" else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        image = grey[:, :, None]
    return np.ascontiguousarray(image)


def build_views(c: UnlabelledImagesConfig) -> v2.Compose:
    """One view of MoCo v2: uint8 Image (C, H, W) -> normalised float32 (C, crop H, crop W)."""
    h, w = c.crop_size
    kernel = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)  # odd, ~10% of the crop as in SimCLR
    brightness, contrast, saturation, hue = c.jitter
    if c.channels == 1:  # saturation and hue do not exist for grey images
        saturation, hue = 0.0, 0.0
    steps = [
        v2.RandomResizedCrop((h, w), scale=tuple(c.crop_scale), antialias=True),
        v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=c.jitter_p),
    ]
    if c.channels == 3:
        steps.append(v2.RandomGrayscale(p=c.grayscale_p))
    steps += [
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=tuple(c.blur_sigma))], p=c.blur_p),
        v2.RandomHorizontalFlip(p=c.hflip_p),
        v2.RandomVerticalFlip(p=c.vflip_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(c.mean), list(c.std)),
    ]
    return v2.Compose(steps)


class TwoViewDataset(Dataset):
    """Item i -> {"view1", "view2": float32 (C, H, W), "index": int64 (position in `files`)};
    image i % len(files), `repeats` items per image."""

    views = 2  # the pretraining task checks this: it needs two-view items

    def __init__(self, files: list[Path], c: UnlabelledImagesConfig, repeats: int = 1):
        self.files, self.cfg, self.repeats = list(files), c, repeats
        self.in_chans = c.channels
        self.images = [read_unlabelled(p, c) for p in self.files] if c.cache else None
        self.transform = build_views(c)
        self.region = tuple(int(v) for v in c.instance_size) if max(c.instance_size) > 0 else None
        if self.region and self.images is not None:
            for path, image in zip(self.files, self.images):
                self._check_region(path, image)

    def _check_region(self, path: Path, image: np.ndarray) -> None:
        if image.shape[0] < self.region[0] or image.shape[1] < self.region[1]:
            raise UserError(f"{path}: image is {image.shape[0]} x {image.shape[1]} px (after data.scale), smaller "
                            f"than data.instance_size {list(self.region)}.")

    def __len__(self) -> int:
        return len(self.files) * self.repeats

    def image(self, index: int) -> np.ndarray:
        return self.images[index] if self.images is not None else read_unlabelled(self.files[index], self.cfg)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = i % len(self.files)
        array = self.image(index)
        if self.region:  # the instance: a region drawn from the same seeded generator as the views
            if self.images is None:
                self._check_region(self.files[index], array)
            top = int(torch.randint(0, array.shape[0] - self.region[0] + 1, ()))
            left = int(torch.randint(0, array.shape[1] - self.region[1] + 1, ()))
            array = array[top:top + self.region[0], left:left + self.region[1]]
        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))
        # two draws from the generator SeededDataset seeded for (seed, epoch, i): different
        # views, the same ones whenever this item is read again
        return {"view1": self.transform(image).as_subclass(torch.Tensor),
                "view2": self.transform(image).as_subclass(torch.Tensor),
                "index": torch.tensor(index, dtype=torch.int64)}


def split_files(files: list[Path], val_count: int, split_seed: int) -> tuple[list[Path], list[Path]]:
    """(train, val): a permutation from split_seed alone picks val; both keep the sorted order."""
    if len(files) <= val_count:
        raise UserError(f"{len(files)} images found, but data.val_count={val_count} are carved off for "
                        "validation; add images or lower data.val_count (>= 2).")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(split_seed)).tolist()
    val = set(order[:val_count])
    return [f for i, f in enumerate(files) if i not in val], [f for i, f in enumerate(files) if i in val]


@register("dataset", "unlabelled_images", schema=UnlabelledImagesConfig,
          help="Unlabelled images (folder + glob patterns) as two MoCo v2 views, for podium pretrain.")
def unlabelled_images(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    c = as_config(cfg, UnlabelledImagesConfig)
    check_config(c)
    train, val = split_files(find_images(c), c.val_count, c.split_seed)
    if c.max_images:
        train, val = train[: c.max_images], val[: c.max_images]
    return {"train": TwoViewDataset(train, c, c.repeats), "val": TwoViewDataset(val, c, 1)}
