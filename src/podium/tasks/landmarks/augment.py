"""Training augmentation for landmark images: a random affine that moves the points with the
image (tv_tensors.KeyPoints, with the half-pixel correction described in `apply_affine`),
brightness/contrast jitter and Gaussian noise."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from podium.errors import UserError


# ---- augmentation -------------------------------------------------------------------------


@dataclass
class LandmarkAugmentConfig:
    """Train-only augmentation; the points move with the image."""

    enabled: bool = True
    rotation_deg: float = 10.0  # uniform in [-rotation_deg, rotation_deg]
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])  # [min, max] zoom
    translate: float = 0.05  # max shift, as a fraction of the input width / height
    brightness: float = 0.2  # ColorJitter factors
    contrast: float = 0.2
    noise_std: float = 0.02  # Gaussian noise on the [0, 1] image


def check_augment(a: LandmarkAugmentConfig, where: str = "data.augment") -> None:
    scale = list(a.scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise UserError(f"{where}.scale must be [min, max] with 0 < min <= max, got {scale}.")
    checks = {
        "rotation_deg": 0 <= a.rotation_deg <= 180,
        "translate": 0 <= a.translate <= 1,
        "brightness": a.brightness >= 0,
        "contrast": a.contrast >= 0,
        "noise_std": a.noise_std >= 0,
    }
    for key, ok in checks.items():
        if not ok:
            limit = {"rotation_deg": "in [0, 180]", "translate": "in [0, 1]"}.get(key, ">= 0")
            raise UserError(f"{where}.{key} must be {limit}, got {getattr(a, key)!r}.")


def affine_matrix(
    angle: float, translate: Sequence[float], scale: float, shear: Sequence[float], canvas_size: Sequence[int]
) -> np.ndarray:
    """The 3 x 3 matrix `apply_affine` applies to (x, y, 1) points, pixel-centre convention.

    torchvision's convention (`v2.functional.affine`): rotate by `angle` degrees, shear and
    scale about the image centre, then translate by `translate` pixels; in pixel-centre
    coordinates the centre is ((W - 1) / 2, (H - 1) / 2).
    """
    h, w = int(canvas_size[0]), int(canvas_size[1])
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    rss = np.array([[a, b], [c, d]], dtype=np.float64) * float(scale)
    m = np.eye(3)
    m[:2, :2] = rss
    m[:2, 2] = np.array([cx + translate[0], cy + translate[1]]) - rss @ np.array([cx, cy])
    return m


def apply_affine(
    image: torch.Tensor,
    points: torch.Tensor,
    angle: float,
    translate: Sequence[float],
    scale: float,
    shear: Sequence[float] = (0.0, 0.0),
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
    fill: float = 0,
) -> tuple[tv_tensors.Image, torch.Tensor]:
    """Apply one affine to a (C, H, W) image and its (K, 2) points (float64 out) with
    `v2.functional.affine`, the points as `tv_tensors.KeyPoints`.

    torchvision's KeyPoints kernel rotates and scales about (W/2, H/2) in the corner-based
    convention its image kernels use (pixel i spans [i, i+1]); our points have pixel centres at
    integers, so they are shifted by +0.5 into that convention and back afterwards. Without the
    shift a 10 degree / 1.1x affine would move points ~0.15 px off the image content.
    """
    h, w = image.shape[-2:]
    image = image if isinstance(image, tv_tensors.Image) else tv_tensors.Image(image)
    kp = tv_tensors.KeyPoints(points.to(torch.float64) + 0.5, canvas_size=(h, w))
    kwargs = dict(angle=float(angle), translate=[float(t) for t in translate], scale=float(scale), shear=[float(v) for v in shear])
    image = TF.affine(image, **kwargs, interpolation=interpolation, fill=fill)
    kp = TF.affine(kp, **kwargs)
    return image, kp.as_subclass(torch.Tensor) - 0.5


class LandmarkAugment:
    """(uint8 image, (K, 2) points) -> (float32 image in [0, 1], moved points).

    Random affine (parameters drawn by `v2.RandomAffine.make_params`, applied by
    `apply_affine`), brightness/contrast jitter, then Gaussian noise on the float image. Uses the
    global torch RNG (seeded per DataLoader worker by the engine).
    """

    def __init__(self, cfg: LandmarkAugmentConfig):
        check_augment(cfg)
        self.cfg = cfg
        lo, hi = (float(s) for s in cfg.scale)
        self.affine = None
        if cfg.rotation_deg > 0 or cfg.translate > 0 or (lo, hi) != (1.0, 1.0):
            self.affine = v2.RandomAffine(
                degrees=float(cfg.rotation_deg),
                translate=(float(cfg.translate), float(cfg.translate)) if cfg.translate > 0 else None,
                scale=(lo, hi),
            )
        self.jitter = (
            v2.ColorJitter(brightness=float(cfg.brightness), contrast=float(cfg.contrast))
            if cfg.brightness > 0 or cfg.contrast > 0
            else None
        )
        self.noise = v2.GaussianNoise(mean=0.0, sigma=float(cfg.noise_std), clip=True) if cfg.noise_std > 0 else None
        self.to_float = v2.ToDtype(torch.float32, scale=True)

    def move(self, image: tv_tensors.Image, points: torch.Tensor) -> tuple[tv_tensors.Image, torch.Tensor]:
        """The geometric part only."""
        if self.affine is None:
            return image, points
        params = self.affine.make_params([image])
        return apply_affine(image, points, params["angle"], params["translate"], params["scale"], params["shear"])

    def __call__(self, image: tv_tensors.Image, points: torch.Tensor) -> tuple[tv_tensors.Image, torch.Tensor]:
        image, points = self.move(image, points)
        if self.jitter is not None:
            image = self.jitter(image)
        image = self.to_float(image)
        if self.noise is not None:
            image = self.noise(image)
        return image, points


