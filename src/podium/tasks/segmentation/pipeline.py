"""Segmentation data: the config schemas, their checks, and the one preprocessing path every
image takes — in training, evaluation, `podium predict` and serving (`prepare_image`,
`prepare_record`). See data.py for the datasets built on it.

    read_image (RGB uint8) + read_label (stored values -> class ids, data.class_values)
    + FOV (data.fov: file | estimate | none) -> resize by data.scale (area for the image,
    nearest for label and FOV) -> CLAHE (data.clahe) -> channels; pixels outside the FOV get
    label ignore_index.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import cv2
import numpy as np
import torch

from podium.common.augment import plain
from podium.common.images import channel_stats
from podium.common.structured import as_config
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
    read_fov,
    read_image,
    read_label,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FOV_MODES = ("file", "estimate", "none")


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
    val_count: int = 4  # 0 only where the task supplies its own validation split (task=uda)
    test_count: int = 0
    split_seed: int = 0  # the split depends on this only, never on the run seed
    max_images: int = 0  # > 0: keep the first N of every split
    fraction: float = 1.0  # < 1: train on a subset of the training images drawn with split_seed
    ignore_index: int = 255
    class_values: dict[int, int] | None = None  # stored value -> class id; null: the dataset's default
    class_names: list[str] = field(default_factory=lambda: ["background", "vessel"])
    augment: bool = True  # training patches only
    augment_rotation: float = 15.0  # degrees of the random affine, uniform in [-r, r]
    augment_scale: list[float] = field(default_factory=lambda: [0.85, 1.15])
    augment_affine_p: float = 0.5
    augment_jitter: float = 0.2  # brightness / contrast / saturation factor; hue = jitter / 10
    augment_vflip: bool = True  # vertical flips (off for scenes with an up, e.g. driving frames)
    augment_rot90: bool = True  # rotations by k * 90 degrees (off for the same reason)


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


def check_common(c: SegDataConfig) -> None:
    """UserError naming the key for every invalid common field."""
    if c.channels not in (1, 3):
        raise UserError(f"data.channels must be 1 (grey) or 3 (RGB), got {c.channels!r}.")
    check_clahe(c.clahe, c.clahe_clip, c.clahe_tiles)
    if c.fov not in FOV_MODES:
        raise UserError(f"data.fov must be one of {', '.join(FOV_MODES)}, got {c.fov!r}.")
    if not 0 < c.scale <= 8:
        raise UserError(f"data.scale must be in (0, 8] (a resize factor), got {c.scale!r}.")
    channel_stats(c.mean, c.channels, "mean")
    if any(s <= 0 for s in channel_stats(c.std, c.channels, "std")):
        raise UserError(f"data.std must be positive, got {list(c.std)}.")
    patch = list(c.patch_size)
    if len(patch) != 2 or any(not isinstance(s, int) or s < 1 for s in patch):
        raise UserError(f"data.patch_size must be [H, W] with positive integers, got {patch}.")
    checks = {
        "patches_per_image": (c.patches_per_image >= 1, ">= 1"),
        "foreground_oversample": (0 <= c.foreground_oversample <= 1, "in [0, 1]"),
        "val_count": (c.val_count >= 0, ">= 0"),
        "fraction": (0 < c.fraction <= 1, "in (0, 1]"),
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
    mean, std = channel_stats(c.mean, c.channels, "mean"), channel_stats(c.std, c.channels, "std")
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
