"""Letterbox geometry: original image pixels <-> network input pixels, exactly.

Landmark errors are reported in millimetres of the *original* image (Wang et al., "A benchmark
for comparison of dental radiography analysis algorithms", ISBI 2015 Grand Challenge: MRE and
SDR at 2/2.5/3/4 mm on 1935 x 2400 cephalograms at 0.1 mm/px). A prediction made on the resized
input therefore has to be mapped back without any systematic offset; half a pixel of the input
(256 px tall) is ~0.5 mm in the original, already a third of a good method's MRE.

Conventions (shared with the rest of `podium.tasks.landmarks`):
- points are (x, y) float pixels, pixel centres at integer coordinates (x = 0 is the centre of
  the first column; the image covers [-0.5, W - 0.5]).
- one isotropic `scale` for both axes (the aspect ratio is kept):
      x_in = (x_orig + 0.5) * scale - 0.5 + pad_x        (forward)
      x_orig = (x_in - pad_x + 0.5) / scale - 0.5        (inverse)
  and the same for y with pad_y.
- padding goes to the right and bottom (pad_x = pad_y = 0 for images made by `letterbox`): the
  mapping is then a pure scale about the top-left corner, no half-pixel offset can come from
  rounding a centred pad, and the content always starts at the input's origin. `Letterbox` still
  carries pad_x / pad_y so that other producers (a centred letterbox) map back the same way.
- resampling: PIL's BILINEAR filter with `reducing_gap=None`. For downscaling PIL widens the
  triangle kernel by the reduction factor (support 2/scale source pixels), i.e. it antialiases
  like area averaging but with a smoother (less aliasing) response; the kernel is symmetric, so
  the intensity centroid of a small structure lands exactly where `forward` says. The resample
  region is given explicitly (`box`), so both axes use exactly `scale` even though the resized
  width/height are whole pixels: the last fraction of a source pixel on the long side of the
  non-limiting axis is dropped instead of stretching that axis by up to half a pixel.
  (`reducing_gap=None` keeps PIL from first reducing by an integer factor with a box filter,
  which would make the result depend on the factor's divisibility.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar, Union

import numpy as np
import torch
from PIL import Image

Points = TypeVar("Points", np.ndarray, torch.Tensor)
ArrayOrTensor = Union[np.ndarray, torch.Tensor]

__all__ = ["Letterbox", "letterbox", "points_to_input", "points_to_original"]


@dataclass(frozen=True)
class Letterbox:
    """How an original image (orig_w x orig_h) became the out_w x out_h network input.

    `forward` maps original pixels to input pixels and `inverse` back (see the module docstring
    for the formulas). Both accept (..., 2) numpy arrays or torch tensors of (x, y) and return
    the same type; floating inputs keep their dtype, integer inputs become float64.
    """

    scale: float
    pad_x: float
    pad_y: float
    orig_w: int
    orig_h: int
    out_w: int
    out_h: int

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def fit(cls, orig_w: int, orig_h: int, out_w: int, out_h: int) -> "Letterbox":
        """The letterbox `letterbox()` uses: the largest isotropic scale that fits the whole
        image into out_w x out_h, content at the top-left, zero padding right/bottom."""
        if min(orig_w, orig_h, out_w, out_h) <= 0:
            raise ValueError(
                f"letterbox sizes must be positive, got original {orig_w}x{orig_h} and "
                f"output {out_w}x{out_h}"
            )
        scale = min(out_w / orig_w, out_h / orig_h)
        return cls(float(scale), 0.0, 0.0, int(orig_w), int(orig_h), int(out_w), int(out_h))

    @property
    def content_size(self) -> tuple[int, int]:
        """(w, h) of the resized image inside the input; the rest is padding."""
        w = min(self.out_w, max(1, math.floor(self.orig_w * self.scale + 1e-6)))
        h = min(self.out_h, max(1, math.floor(self.orig_h * self.scale + 1e-6)))
        return w, h

    def as_tensor(self) -> torch.Tensor:
        """float64 tensor [scale, pad_x, pad_y, orig_w, orig_h] (the dataset item's `letterbox`)."""
        return torch.tensor(
            [self.scale, self.pad_x, self.pad_y, float(self.orig_w), float(self.orig_h)],
            dtype=torch.float64,
        )

    @classmethod
    def from_tensor(cls, t: ArrayOrTensor, out_w: int, out_h: int) -> "Letterbox":
        """Inverse of `as_tensor` (the output size is not stored in the tensor)."""
        v = [float(x) for x in (t.tolist() if hasattr(t, "tolist") else t)]
        if len(v) != 5:
            raise ValueError(f"a letterbox tensor has 5 values, got {len(v)}")
        return cls(v[0], v[1], v[2], int(round(v[3])), int(round(v[4])), int(out_w), int(out_h))

    # ---- point mapping ------------------------------------------------------------------

    def _offsets(self, like: ArrayOrTensor):
        pad = [self.pad_x, self.pad_y]
        if isinstance(like, torch.Tensor):
            return torch.tensor(pad, dtype=like.dtype, device=like.device)
        return np.asarray(pad, dtype=like.dtype)

    @staticmethod
    def _as_float(points: ArrayOrTensor) -> ArrayOrTensor:
        if isinstance(points, torch.Tensor):
            return points if points.is_floating_point() else points.to(torch.float64)
        points = np.asarray(points)
        return points if np.issubdtype(points.dtype, np.floating) else points.astype(np.float64)

    def forward(self, points: Points) -> Points:
        """Original pixels -> input pixels: (p + 0.5) * scale - 0.5 + pad."""
        p = self._as_float(points)
        _check_points(p)
        return (p + 0.5) * self.scale - 0.5 + self._offsets(p)

    def inverse(self, points: Points) -> Points:
        """Input pixels -> original pixels: (p - pad + 0.5) / scale - 0.5."""
        p = self._as_float(points)
        _check_points(p)
        return (p - self._offsets(p) + 0.5) / self.scale - 0.5

    def clip(self, points: Points) -> Points:
        """Original-pixel points clipped onto the original image, [-0.5, orig - 0.5] per axis
        (pixel centres at integers): a landmark lies in its image, so a prediction in the
        letterbox padding is moved to the nearest edge."""
        p = self._as_float(points)
        _check_points(p)
        low, high = -0.5, np.array([self.orig_w - 0.5, self.orig_h - 0.5])
        if isinstance(p, torch.Tensor):
            return torch.minimum(p.clamp(min=low), torch.as_tensor(high, dtype=p.dtype, device=p.device))
        return np.minimum(np.maximum(p, low), high)


def _check_points(p: ArrayOrTensor) -> None:
    if p.ndim < 1 or p.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2) with (x, y) last, got {tuple(p.shape)}")


# ---- batched torch helpers (the task's evaluation step) -----------------------------------


def _split_letterbox(points: torch.Tensor, letterbox: torch.Tensor):
    if letterbox.shape[-1] != 5:
        raise ValueError(f"letterbox must have shape (B, 5) or (5,), got {tuple(letterbox.shape)}")
    _check_points(points)
    dtype = torch.promote_types(points.dtype, letterbox.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    lb = letterbox.to(device=points.device, dtype=dtype)
    if lb.ndim == 1:
        lb = lb.unsqueeze(0)
    # (B, 5) -> broadcast against (B, K, 2)
    scale = lb[:, 0].reshape(-1, *([1] * (points.ndim - 1)))
    pad = lb[:, 1:3].reshape(-1, *([1] * (points.ndim - 2)), 2)
    return points.to(dtype), scale, pad


def points_to_original(points: torch.Tensor, letterbox: torch.Tensor) -> torch.Tensor:
    """Batched `Letterbox.inverse`: (B, K, 2) input px + (B, 5) letterboxes -> (B, K, 2) original px.

    Computed in the promoted dtype of the two (float64 with the dataset's float64 letterboxes),
    so that millimetre errors are not limited by float32 rounding.
    """
    p, scale, pad = _split_letterbox(points, letterbox)
    return (p - pad + 0.5) / scale - 0.5


def clip_to_original(points: torch.Tensor, letterbox: torch.Tensor) -> torch.Tensor:
    """Batched `Letterbox.clip`: (B, K, 2) original px + (B, 5) letterboxes -> points on the image."""
    lb = letterbox.to(device=points.device, dtype=points.dtype)
    if lb.ndim == 1:
        lb = lb.unsqueeze(0)
    high = (lb[:, 3:5] - 0.5).reshape(-1, *([1] * (points.ndim - 2)), 2)
    return torch.minimum(points.clamp(min=-0.5), high)


def points_to_input(points: torch.Tensor, letterbox: torch.Tensor) -> torch.Tensor:
    """Batched `Letterbox.forward`: (B, K, 2) original px -> (B, K, 2) input px."""
    p, scale, pad = _split_letterbox(points, letterbox)
    return (p + 0.5) * scale - 0.5 + pad


# ---- image ---------------------------------------------------------------------------------


def _resize_plane(plane: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(plane))
    out = img.resize(size, Image.BILINEAR, box=box, reducing_gap=None)
    return np.asarray(out)


def letterbox(image: np.ndarray, out_h: int, out_w: int) -> tuple[np.ndarray, Letterbox]:
    """Resize `image` (H, W) or (H, W, C) uint8 into out_h x out_w keeping the aspect ratio.

    The content is at the top-left, the right/bottom padding is zero. Returns the uint8 array
    ((out_h, out_w) or (out_h, out_w, C)) and the `Letterbox` that maps points between the two.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"letterbox expects a uint8 (H, W) or (H, W, C) array, got {image.dtype} {image.shape}")
    orig_h, orig_w = image.shape[:2]
    lb = Letterbox.fit(orig_w, orig_h, out_w, out_h)
    new_w, new_h = lb.content_size
    # The source region that maps onto exactly new_w x new_h output pixels at `scale`; it is at
    # most the image (floor above), clipped against float rounding on the limiting axis.
    box = (0.0, 0.0, min(float(orig_w), new_w / lb.scale), min(float(orig_h), new_h / lb.scale))
    size = (new_w, new_h)
    if image.ndim == 2 or image.shape[2] == 3:  # PIL modes L and RGB
        resized = _resize_plane(image, size, box)
    else:  # any other channel count: plane by plane (PIL has no generic n-channel uint8 mode,
        # and would premultiply a 4th channel as alpha)
        resized = np.stack([_resize_plane(image[..., c], size, box) for c in range(image.shape[2])], axis=-1)
    out = np.zeros((out_h, out_w) + image.shape[2:], dtype=np.uint8)
    out[:new_h, :new_w] = resized
    return out, lb
