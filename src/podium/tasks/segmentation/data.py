"""Segmentation datasets: DRIVE (Staal et al., IEEE TMI 2004), paired image / mask folders,
nnU-Net v2 raw datasets (Isensee et al., Nature Methods 2021) and synthetic fundus images.

Pipeline, per image, done ONCE when the datasets are built (the factory decodes and
preprocesses every record eagerly and keeps the result in memory, uint8; DRIVE's 20 images take
~50 MB), so DataLoader workers fork after it and never decode a file:

    read_image (RGB uint8) + read_label (stored values -> class ids, data.class_values)
    + FOV (data.fov: file | estimate | none) -> resize by data.scale (area for the image,
    nearest for label and FOV) -> CLAHE (data.clahe) -> channels; pixels outside the FOV get
    label ignore_index.

Training (`SegPatchDataset`, split "train"): item i is a patch of image i % len(records),
drawn from a generator seeded with (seed, epoch, i) (`set_epoch` is called by the engine's
SeededDataset), so a run and its resume see the same patches whatever the worker count. With
probability `foreground_oversample` the patch is centred on a foreground pixel: a class present
in the image is drawn uniformly, then one of (at most 10,000, as nnU-Net keeps) its pixels
(nnU-Net's oversampling, which thin vessels and tiny lesions need); otherwise its corner is
uniform inside the image. Then torchvision.transforms.v2 on Image + Mask together: flips,
rotations by multiples of 90 degrees (of square patches), a small random affine (probability
`augment_affine_p`) whose area rotated in from outside the patch gets label ignore_index and
FOV False (masks are always resampled with nearest neighbour), and colour jitter on the image
only. Evaluation (`SegImageDataset`, "val" / "test"): whole scaled images, batch size 1 unless
all images share a size.

Items (both): image float32 (C, H, W) normalised with data.mean / data.std on [0, 1] values;
mask int64 (H, W), ignore_index outside the FOV; fov bool (H, W); index int64 (the record's
position in `dataset.records`).

Splits: records sorted by id (natural order); a permutation drawn from `split_seed` alone gives
the first `test_count` records to "test", the next `val_count` to "val", the rest to "train"
(each kept in id order), so the test set does not move when val_count changes.
`max_images` > 0 then keeps the first N records of every split (quick runs).

    splits = registry.build("dataset", "drive", cfg, seed=0)   # {"train": ..., "val": ...}
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from podium.common.augment import plain
from podium.common.structured import as_config
from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.segmentation.preprocess import (
    check_clahe,
    clahe,
    estimate_fov,
    resize_image,
    resize_mask,
    scaled_size,
)
from podium.tasks.segmentation.readers import (
    SegRecord,
    drive_records,
    nnunet_records,
    pair_folders,
    read_fov,
    read_image,
    read_label,
)
from podium.tasks.segmentation.synthetic import write_synthetic_fundus

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FOV_MODES = ("file", "estimate", "none")
MAX_LOCATIONS = 10_000  # foreground pixels kept per class and image for oversampling (nnU-Net's cap)


# ---- schemas ------------------------------------------------------------------------------


@dataclass
class SegDataConfig:
    """Fields every segmentation dataset accepts."""

    name: str = ""
    root: str | None = None
    channels: int = 3  # 3 = RGB, 1 = grey (the green channel with clahe: green, else luma)
    clahe: str = "lab"  # lab | green | none
    clahe_clip: float = 2.0  # OpenCV clipLimit
    clahe_tiles: int = 8  # tiles per side
    fov: str = "file"  # file (mask files) | estimate (from the red channel) | none (whole image)
    fov_threshold: int = 20  # red-channel level of the aperture for fov: estimate
    scale: float = 1.0  # resize factor of whole images, applied before anything else
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # on [0, 1] values
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    patch_size: list[int] = field(default_factory=lambda: [64, 64])  # training patch (H, W)
    patches_per_image: int = 16  # training items per image and epoch
    foreground_oversample: float = 0.33  # probability that a patch is centred on foreground
    val_count: int = 4
    test_count: int = 0
    split_seed: int = 0  # the split depends on this only, never on the run seed
    max_images: int = 0  # > 0: keep the first N of every split
    ignore_index: int = 255
    class_values: dict[int, int] | None = None  # stored value -> class id; null: the dataset's default
    class_names: list[str] = field(default_factory=lambda: ["background", "vessel"])
    augment: bool = True  # training patches only
    augment_rotation: float = 15.0  # degrees of the random affine, uniform in [-r, r]
    augment_scale: list[float] = field(default_factory=lambda: [0.85, 1.15])
    augment_affine_p: float = 0.5
    augment_jitter: float = 0.2  # brightness / contrast / saturation factor; hue = jitter / 10


@dataclass
class DriveConfig(SegDataConfig):
    """DRIVE retinal vessels: images/, 1st_manual/ (255 = vessel), mask/ (FOV)."""

    name: str = "drive"


@dataclass
class SegFolderConfig(SegDataConfig):
    """Images and label maps in two folders, matched by id through file-name patterns."""

    name: str = "seg_folder"
    image_dir: str | None = None  # required; relative to root when root is set
    mask_dir: str | None = None  # required
    fov_dir: str | None = None
    image_pattern: str = "{stem}.*"
    mask_pattern: str = "{stem}.*"
    fov_pattern: str | None = None  # default "{stem}.*"
    clahe: str = "none"
    fov: str = "none"
    class_names: list[str] = field(default_factory=lambda: ["background", "foreground"])


@dataclass
class SegNnunetConfig(SegDataConfig):
    """An nnU-Net v2 raw dataset (dataset.json, imagesTr/, labelsTr/), 2-D files."""

    name: str = "seg_nnunet"
    clahe: str = "none"
    fov: str = "none"
    class_names: list[str] = field(default_factory=list)  # empty: from dataset.json


@dataclass
class SyntheticFundusConfig(SegDataConfig):
    """Generated fundus-like images with known vessel masks (DRIVE layout, written once)."""

    name: str = "synthetic_fundus"
    count: int = 24
    size: list[int] = field(default_factory=lambda: [128, 128])  # generated image (H, W)
    seed: int = 0  # generator seed (not the run seed)
    test_count: int = 4


def _norm_stats(values: Sequence[float] | float, channels: int, key: str) -> list[float]:
    values = [values] if isinstance(values, (int, float)) else list(values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise UserError(f"data.{key} has {len(values)} values; expected 1 or {channels} (data.channels).")
    return [float(v) for v in values]


def check_common(c: SegDataConfig) -> None:
    """UserError naming the key for every invalid common field."""
    if c.channels not in (1, 3):
        raise UserError(f"data.channels must be 1 (grey) or 3 (RGB), got {c.channels!r}.")
    check_clahe(c.clahe, c.clahe_clip, c.clahe_tiles)
    if c.fov not in FOV_MODES:
        raise UserError(f"data.fov must be one of {', '.join(FOV_MODES)}, got {c.fov!r}.")
    if not 0 < c.scale <= 8:
        raise UserError(f"data.scale must be in (0, 8] (a resize factor), got {c.scale!r}.")
    _norm_stats(c.mean, c.channels, "mean")
    if any(s <= 0 for s in _norm_stats(c.std, c.channels, "std")):
        raise UserError(f"data.std must be positive, got {list(c.std)}.")
    patch = list(c.patch_size)
    if len(patch) != 2 or any(not isinstance(s, int) or s < 1 for s in patch):
        raise UserError(f"data.patch_size must be [H, W] with positive integers, got {patch}.")
    checks = {
        "patches_per_image": (c.patches_per_image >= 1, ">= 1"),
        "foreground_oversample": (0 <= c.foreground_oversample <= 1, "in [0, 1]"),
        "val_count": (c.val_count >= 1, ">= 1"),
        "test_count": (c.test_count >= 0, ">= 0"),
        "max_images": (c.max_images >= 0, ">= 0 (0 = all)"),
        "augment_rotation": (0 <= c.augment_rotation <= 180, "in [0, 180]"),
        "augment_affine_p": (0 <= c.augment_affine_p <= 1, "in [0, 1]"),
        "augment_jitter": (0 <= c.augment_jitter < 1, "in [0, 1)"),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise UserError(f"data.{key} must be {expected}, got {getattr(c, key)!r}.")
    zoom = list(c.augment_scale)
    if len(zoom) != 2 or not 0 < zoom[0] <= zoom[1]:
        raise UserError(f"data.augment_scale must be [min, max] with 0 < min <= max, got {zoom}.")


def check_classes(c: SegDataConfig, class_names: Sequence[str], values: Mapping[int, int]) -> None:
    names = list(class_names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise UserError(f"data.class_names must list at least 2 distinct classes (binary = background + "
                        f"foreground), got {names}.")
    if 0 <= c.ignore_index < len(names):
        raise UserError(f"data.ignore_index {c.ignore_index} is a class id (0..{len(names) - 1}); use 255.")
    allowed = set(range(len(names))) | {c.ignore_index}
    bad = {k: v for k, v in values.items() if v not in allowed}
    if bad:
        raise UserError(f"data.class_values maps to {sorted(set(bad.values()))}, which are neither class ids "
                        f"0..{len(names) - 1} nor data.ignore_index {c.ignore_index}.")


def default_values(num_classes: int, ignore_index: int) -> dict[int, int]:
    """Stored values are the class ids (plus the ignore value itself)."""
    values = {k: k for k in range(num_classes)}
    values[ignore_index] = ignore_index
    return values


# ---- one preprocessing path ---------------------------------------------------------------


def _common_config(cfg: Any) -> SegDataConfig:
    """The common fields of any segmentation data config (mapping, DictConfig or dataclass)."""
    names = {f.name for f in fields(SegDataConfig)} - {"name"}
    if isinstance(cfg, SegDataConfig):
        values = {k: getattr(cfg, k) for k in names}
    elif isinstance(cfg, Mapping) or hasattr(cfg, "keys"):
        values = {k: plain(cfg[k]) for k in names if k in cfg}
    else:
        values = {k: plain(getattr(cfg, k)) for k in names if hasattr(cfg, k)}
    c = as_config(values, SegDataConfig)
    check_common(c)
    return c


def preprocess(image: np.ndarray, c: SegDataConfig, fov: np.ndarray | None = None
               ) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """(H0, W0, 3) uint8 RGB -> (display (H, W, 3) uint8 scaled RGB before CLAHE, network image
    (C, H, W) uint8 after CLAHE, FOV bool (H, W)). `fov` at the original size (a mask file);
    None: estimated unless data.fov is 'none' (then the whole image)."""
    h, w = image.shape[:2]
    size = scaled_size(h, w, c.scale)
    display = resize_image(image, size)
    if fov is not None:
        fov = resize_mask(np.asarray(fov, dtype=bool), size)
    elif c.fov == "none":
        fov = np.ones(size, dtype=bool)
    else:
        fov = estimate_fov(display, c.fov_threshold)
    enhanced = clahe(display, c.clahe, c.clahe_clip, c.clahe_tiles)
    if c.channels == 1:
        enhanced = enhanced[:, :, 1:2] if c.clahe == "green" else cv2.cvtColor(enhanced, cv2.COLOR_RGB2GRAY)[:, :, None]
    return display, torch.from_numpy(np.ascontiguousarray(enhanced.transpose(2, 0, 1))), fov


def normalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (C, H, W) -> float32 ((x / 255) - mean) / std."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (image.to(torch.float32) / 255.0 - m) / s


def prepare_image(image: np.ndarray | torch.Tensor, cfg: Any, fov: np.ndarray | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoded image through exactly the evaluation pipeline of datasets built from `cfg`:
    (float32 (C, H, W) normalised at the scaled size, FOV bool (H, W)). `image`: (H, W, 3) uint8
    RGB array, or a uint8 (C, H, W) tensor (`load_image` / `decode_image_bytes` output; grey is
    replicated). `fov`: bool (H0, W0) at the image's size; None: estimated when data.fov is
    'file' or 'estimate' (no mask file at prediction time), the whole image when 'none'.
    Outputs are at the scaled size (`scaled_size(H0, W0, cfg.scale)`): resize predictions back."""
    c = _common_config(cfg)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3) or image.dtype != torch.uint8:
            raise UserError(f"image has shape {tuple(image.shape)} ({image.dtype}); expected uint8 (C, H, W), C = 1 or 3.")
        image = image.as_subclass(torch.Tensor).expand(3, -1, -1).permute(1, 2, 0).numpy()
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UserError(f"image has shape {image.shape} ({image.dtype}); expected an (H, W, 3) uint8 RGB array.")
    if fov is not None and np.asarray(fov).shape != image.shape[:2]:
        raise UserError(f"FOV mask has shape {np.asarray(fov).shape}; its image is {image.shape[:2]} (H, W).")
    _, raw, fov_out = preprocess(image, c, fov)
    mean, std = _norm_stats(c.mean, c.channels, "mean"), _norm_stats(c.std, c.channels, "std")
    return normalise(raw, mean, std), torch.from_numpy(fov_out)


@dataclass
class PreparedImage:
    """One record after preprocessing (kept in memory)."""

    display: np.ndarray  # (H, W, 3) uint8, scaled, before CLAHE
    image: torch.Tensor  # (C, H, W) uint8, after CLAHE
    label: torch.Tensor  # (H, W) class ids, ignore_index outside the FOV (uint8 when it fits)
    fov: torch.Tensor  # (H, W) bool


def prepare_record(record: SegRecord, c: SegDataConfig, values: Mapping[int, int]) -> PreparedImage:
    """Decode and preprocess one record (UserError naming the file for any bad input)."""
    image = read_image(record.image_path)
    if record.mask_path is None:
        raise UserError(f"{record.image_path}: no label file (every training and evaluation image needs one).")
    hw = image.shape[:2]
    label = read_label(record.mask_path, values, expected_hw=hw, image_path=record.image_path)
    fov = None
    if c.fov == "file":
        if record.fov_path is None:
            raise UserError(f"{record.image_path}: data.fov is 'file' but the image has no FOV mask file "
                            f"(give one, or set data.fov: estimate | none).")
        fov = read_fov(record.fov_path, expected_hw=hw, image_path=record.image_path)
    display, raw, fov = preprocess(image, c, fov)
    label = resize_mask(label, fov.shape)
    label[~fov] = c.ignore_index
    small = label.min(initial=0) >= 0 and label.max(initial=0) <= 255
    label_t = torch.from_numpy(label.astype(np.uint8) if small else label)
    return PreparedImage(display, raw, label_t, torch.from_numpy(fov))


# ---- datasets -----------------------------------------------------------------------------


class _SegDataset(Dataset):
    """Shared state. Attributes: `records`, `num_classes`, `class_names`, `in_chans`,
    `ignore_index`, `cfg` (the SegDataConfig), `prepared` (PreparedImage per record)."""

    def __init__(self, records: Sequence[SegRecord], cfg: SegDataConfig, class_names: Sequence[str],
                 values: Mapping[int, int] | None = None, prepared: Sequence[PreparedImage] | None = None):
        check_common(cfg)
        self.cfg = cfg
        self.records = list(records)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.in_chans = int(cfg.channels)
        self.ignore_index = int(cfg.ignore_index)
        values = dict(values) if values is not None else default_values(self.num_classes, self.ignore_index)
        check_classes(cfg, self.class_names, values)
        self.values = values
        if prepared is None:  # decode once, here, before any worker forks
            prepared = [prepare_record(r, cfg, values) for r in self.records]
        self.prepared = list(prepared)
        if len(self.prepared) != len(self.records):
            raise ValueError("prepared images and records differ in length")
        self.mean = _norm_stats(cfg.mean, cfg.channels, "mean")
        self.std = _norm_stats(cfg.std, cfg.channels, "std")

    def sample_id(self, index: int) -> str:
        return self.records[index].id

    def as_image_dataset(self) -> SegImageDataset:
        """The same records as whole images (e.g. to evaluate or plot the training split),
        sharing the preprocessed arrays: nothing is decoded again."""
        return SegImageDataset(self.records, self.cfg, self.class_names, self.values, self.prepared)

    def display_image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB at the scaled size, before CLAHE (for overlays)."""
        return self.prepared[index].display.copy()

    def full_label(self, index: int) -> np.ndarray:
        """(H, W) int64 class ids at the scaled size, ignore_index outside the FOV (as items)."""
        return self.prepared[index].label.numpy().astype(np.int64)

    def full_fov(self, index: int) -> np.ndarray:
        """(H, W) bool field of view at the scaled size."""
        return self.prepared[index].fov.numpy().copy()

    def _item(self, image: torch.Tensor, label: torch.Tensor, fov: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        return {
            "image": normalise(image, self.mean, self.std).contiguous(),
            "mask": label.to(torch.int64).contiguous(),
            "fov": fov.to(torch.bool).contiguous(),
            "index": torch.tensor(index, dtype=torch.int64),
        }


class SegImageDataset(_SegDataset):
    """Whole scaled images for evaluation; one item per record."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        p = self.prepared[index]
        return self._item(p.image, p.label, p.fov, index)


class RandomRot90(v2.Transform):
    """Rotation by k * 90 degrees (k uniform in 0..3; 0 or 2 for non-square inputs, which keep
    their shape). Lossless, unlike an affine: no interpolation and nothing rotated in."""

    def __init__(self, square: bool):
        super().__init__()
        self.square = square

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        k = int(torch.randint(0, 4 if self.square else 2, ()).item())
        return {"k": k if self.square else 2 * k}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["k"] == 0:
            return inpt
        return tv_tensors.wrap(torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], dims=(-2, -1)), like=inpt)


def build_augment(c: SegDataConfig) -> v2.Compose:
    """Flips, rot90, random affine (image bilinear, masks nearest; fill: image 0, masks
    ignore_index) and colour jitter (image only). Draws from the global torch RNG."""
    ops: list[v2.Transform] = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90(c.patch_size[0] == c.patch_size[1])]
    zoom = tuple(float(z) for z in c.augment_scale)
    if c.augment_affine_p > 0 and (c.augment_rotation > 0 or zoom != (1.0, 1.0)):
        affine = v2.RandomAffine(
            degrees=float(c.augment_rotation), scale=zoom, interpolation=v2.InterpolationMode.BILINEAR,
            fill={tv_tensors.Image: 0, tv_tensors.Mask: c.ignore_index},
        )
        ops.append(v2.RandomApply([affine], p=float(c.augment_affine_p)))
    j = float(c.augment_jitter)
    if j > 0:
        colour = {"saturation": j, "hue": j / 10} if c.channels == 3 else {}
        ops.append(v2.ColorJitter(brightness=j, contrast=j, **colour))
    return v2.Compose(ops)


class SegPatchDataset(_SegDataset):
    """Training patches: len = len(records) * patches_per_image (see the module docstring)."""

    def __init__(self, records: Sequence[SegRecord], cfg: SegDataConfig, class_names: Sequence[str],
                 values: Mapping[int, int] | None = None, prepared: Sequence[PreparedImage] | None = None,
                 *, seed: int = 0):
        super().__init__(records, cfg, class_names, values, prepared)
        self.seed, self.epoch = int(seed), 0
        self.patch_size = (int(cfg.patch_size[0]), int(cfg.patch_size[1]))
        ph, pw = self.patch_size
        for r, p in zip(self.records, self.prepared):
            h, w = p.fov.shape
            if h < ph or w < pw:
                raise UserError(f"{r.image_path}: image is {h} x {w} px (H x W, after data.scale={cfg.scale}), "
                                f"smaller than data.patch_size {[ph, pw]}; lower the patch size.")
        self.locations = [self._locations(r, p) for r, p in zip(self.records, self.prepared)]
        self.augment = build_augment(cfg) if cfg.augment else None

    def _locations(self, record: SegRecord, p: PreparedImage) -> list[np.ndarray]:
        """Flat pixel indices per foreground class present (classes 1..K-1), at most
        MAX_LOCATIONS each, subsampled deterministically from the record id."""
        flat = p.label.numpy().ravel()
        out = []
        for k in range(1, self.num_classes):
            idx = np.flatnonzero(flat == k)
            if idx.size > MAX_LOCATIONS:
                rng = np.random.default_rng([zlib.crc32(record.id.encode()), k])
                idx = np.sort(rng.choice(idx, MAX_LOCATIONS, replace=False))
            if idx.size:
                out.append(idx)
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records) * int(self.cfg.patches_per_image)

    def patch_origin(self, index: int, rng: np.random.Generator) -> tuple[int, int, bool]:
        """(top, left, oversampled) of item `index`'s patch."""
        r = index % len(self.records)
        h, w = self.prepared[r].fov.shape
        ph, pw = self.patch_size
        locations = self.locations[r]
        if locations and rng.random() < self.cfg.foreground_oversample:
            cls = locations[int(rng.integers(len(locations)))]
            y, x = divmod(int(cls[int(rng.integers(cls.size))]), w)
            # Centred on the pixel, shifted to stay inside the image (the pixel stays inside).
            return min(max(y - ph // 2, 0), h - ph), min(max(x - pw // 2, 0), w - pw), True
        return int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1)), False

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        r = index % len(self.records)
        rng = np.random.default_rng([self.seed % 2**64, self.epoch, int(index)])
        top, left, _ = self.patch_origin(index, rng)
        ph, pw = self.patch_size
        p = self.prepared[r]
        image = p.image[:, top : top + ph, left : left + pw]
        label = p.label[top : top + ph, left : left + pw].to(torch.int64)
        fov = p.fov[top : top + ph, left : left + pw]
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(rng.integers(2**63)))
                image, label, fov = self.augment(tv_tensors.Image(image), tv_tensors.Mask(label),
                                                 tv_tensors.Mask(fov.to(torch.int64)))
            # The FOV rides as 1 / 0; the affine's fill (ignore_index, never 1) marks "outside".
            fov = fov.as_subclass(torch.Tensor) == 1
            label = label.as_subclass(torch.Tensor)
            label = torch.where(fov, label, torch.full_like(label, self.ignore_index))
            image = image.as_subclass(torch.Tensor)
        return self._item(image, label, fov, r)


# ---- splits and registered datasets -------------------------------------------------------


def carve_splits(records: Sequence[SegRecord], val_count: int, test_count: int, split_seed: int
                 ) -> dict[str, list[SegRecord]]:
    """train / val[/ test] from one permutation drawn from split_seed (see the module docstring)."""
    n = len(records)
    if val_count < 1 or test_count < 0 or val_count + test_count > n - 1:
        raise UserError(f"data.val_count ({val_count}) + data.test_count ({test_count}) must leave at least one "
                        f"of the {n} images for training, with val_count >= 1.")
    perm = np.random.default_rng(split_seed).permutation(n)
    test_idx = set(perm[:test_count].tolist())
    val_idx = set(perm[test_count : test_count + val_count].tolist())
    splits = {
        "train": [r for i, r in enumerate(records) if i not in test_idx and i not in val_idx],
        "val": [r for i, r in enumerate(records) if i in val_idx],
    }
    if test_count:
        splits["test"] = [r for i, r in enumerate(records) if i in test_idx]
    return splits


def make_splits(c: SegDataConfig, records: Sequence[SegRecord], class_names: Sequence[str],
                values: Mapping[int, int], *, seed: int) -> dict[str, Dataset]:
    """Carve, preprocess every kept record once, and build the split datasets."""
    check_classes(c, class_names, values)
    splits = carve_splits(list(records), c.val_count, c.test_count, c.split_seed)
    if c.max_images > 0:
        splits = {k: v[: c.max_images] for k, v in splits.items()}
    start = time.perf_counter()
    prepared = {k: [prepare_record(r, c, values) for r in v] for k, v in splits.items()}
    log.info("%s: preprocessed %d images in %.1f s (%s)", c.name, sum(len(v) for v in splits.values()),
             time.perf_counter() - start, ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    out: dict[str, Dataset] = {}
    for split, recs in splits.items():
        if split == "train":
            out[split] = SegPatchDataset(recs, c, class_names, values, prepared[split], seed=seed)
        else:
            out[split] = SegImageDataset(recs, c, class_names, values, prepared[split])
    return out


def _root(c: SegDataConfig, what: str) -> Path:
    if not c.root:
        raise UserError(f"data.root is required for dataset {c.name!r}: {what}.")
    root = Path(c.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root {root} does not exist or is not a folder.")
    return root


def _values(c: SegDataConfig, default: Mapping[int, int] | None) -> dict[int, int]:
    if c.class_values is not None:
        return {int(k): int(v) for k, v in c.class_values.items()}
    return dict(default) if default is not None else default_values(len(c.class_names), c.ignore_index)


DRIVE_VALUES = {0: 0, 255: 1}


@register("dataset", "drive", schema=DriveConfig)
def drive(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """DRIVE retinal vessels (Staal et al. 2004): train / val[/ test] carved from one DRIVE folder."""
    c = as_config(cfg, DriveConfig)
    check_common(c)
    records = drive_records(_root(c, "the DRIVE training/ folder with images/, 1st_manual/ and mask/"))
    return make_splits(c, records, c.class_names, _values(c, DRIVE_VALUES), seed=seed)


@register("dataset", "seg_folder", schema=SegFolderConfig)
def seg_folder(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """Images and label maps in two folders matched by id; train / val[/ test] carved from them."""
    c = as_config(cfg, SegFolderConfig)
    check_common(c)
    for key in ("image_dir", "mask_dir"):
        if not getattr(c, key):
            raise UserError(f"data.{key} is required for dataset 'seg_folder'.")
    base = Path(c.root).expanduser() if c.root else Path(".")

    def where(value: str | None) -> Path | None:
        return None if not value else base / Path(value).expanduser()

    records = pair_folders(where(c.image_dir), where(c.mask_dir), c.image_pattern, c.mask_pattern,
                           where(c.fov_dir), c.fov_pattern)
    return make_splits(c, records, c.class_names, _values(c, None), seed=seed)


@register("dataset", "seg_nnunet", schema=SegNnunetConfig)
def seg_nnunet(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """nnU-Net v2 raw dataset (imagesTr / labelsTr, 2-D); classes from dataset.json."""
    c = as_config(cfg, SegNnunetConfig)
    check_common(c)
    records, labels, _ = nnunet_records(_root(c, "the nnU-Net raw dataset folder with dataset.json"))
    ignore_value = labels.pop("ignore", None)  # nnU-Net v2's ignore label: pixels that never count
    names = [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    if c.class_names and len(c.class_names) != len(names):
        raise UserError(f"data.class_names has {len(c.class_names)} entries; dataset.json declares "
                        f"{len(names)} classes ({', '.join(names)}). Leave class_names empty to use those.")
    class_names = list(c.class_names) or names
    default = {v: v for v in labels.values()}
    if ignore_value is not None:
        default[ignore_value] = c.ignore_index
    return make_splits(c, records, class_names, _values(c, default), seed=seed)


def default_synthetic_root() -> Path:
    """`$XDG_CACHE_HOME/podium/segmentation/synthetic_fundus`, else under `~/.cache`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "podium" / "segmentation" / "synthetic_fundus"


@register("dataset", "synthetic_fundus", schema=SyntheticFundusConfig)
def synthetic_fundus(cfg: Any, *, seed: int) -> dict[str, Dataset]:
    """Synthetic fundus images with vessel masks (generated once, DRIVE layout)."""
    c = as_config(cfg, SyntheticFundusConfig)
    check_common(c)
    base = Path(c.root).expanduser() if c.root else default_synthetic_root()
    folder = base / f"n{c.count}-{c.size[0]}x{c.size[1]}-seed{c.seed}" if len(c.size) == 2 else base
    records = drive_records(write_synthetic_fundus(folder, c.count, c.size, c.seed))
    return make_splits(c, records, c.class_names, _values(c, DRIVE_VALUES), seed=seed)
