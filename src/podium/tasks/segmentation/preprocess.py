"""Image-level preprocessing for segmentation: CLAHE, field-of-view estimation and resizing.

CLAHE (contrast limited adaptive histogram equalisation; Zuiderveld, Graphics Gems IV, 1994) is
the usual first step for fundus photographs: "lab" equalises the lightness channel of CIE LAB
and keeps the colours, as lesion pipelines do; "green" equalises the green channel, where
vessels have the most contrast, and writes it to all three channels (the classic DRIVE vessel
preprocessing, e.g. Staal et al., IEEE TMI 2004 and the retina-unet code). OpenCV implements it.

The field of view (FOV) is the camera's circular aperture: DRIVE ships it as a mask file; when a
dataset has none, `estimate_fov` thresholds the red channel (the brightest channel of a fundus
image, so the aperture border is sharpest there), keeps the largest connected component and
fills its holes (dark vessels and lesions inside the disc).

Label maps and FOV masks are resized with nearest neighbour only (`resize_mask`): class ids are
never interpolated as numbers.

    enhanced = clahe(rgb_uint8, mode="lab", clip_limit=2.0, tile_grid=8)
    fov = estimate_fov(rgb_uint8)                # bool (H, W)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage

from podium.errors import UserError

log = logging.getLogger(__name__)

CLAHE_MODES = ("lab", "green", "none")


def _check_rgb(image: np.ndarray, what: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise UserError(f"{what} must be an (H, W, 3) uint8 RGB array, got shape {shape} ({dtype}).")


def check_clahe(mode: str, clip_limit: float = 2.0, tile_grid: int = 8, key: str = "data.clahe") -> None:
    """UserError naming the config key for an unknown mode or a non-positive limit / grid."""
    if mode not in CLAHE_MODES:
        raise UserError(f"{key} must be one of {', '.join(CLAHE_MODES)}, got {mode!r}.")
    if not clip_limit > 0:
        raise UserError(f"{key}_clip must be positive (OpenCV's clipLimit), got {clip_limit!r}.")
    if int(tile_grid) != tile_grid or tile_grid < 1:
        raise UserError(f"{key}_tiles must be an integer >= 1 (tiles per side), got {tile_grid!r}.")


def clahe(image: np.ndarray, mode: str = "lab", clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 RGB with CLAHE applied (see the module docstring).

    mode "lab": the L channel of LAB; "green": the green channel, copied to all three channels;
    "none": an unchanged copy. `tile_grid` tiles per side, `clip_limit` as OpenCV's clipLimit.
    """
    check_clahe(mode, clip_limit, tile_grid)
    _check_rgb(image)
    if mode == "none":
        return image.copy()
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))
    image = np.ascontiguousarray(image)
    if mode == "green":
        green = op.apply(np.ascontiguousarray(image[:, :, 1]))
        return np.repeat(green[:, :, None], 3, axis=2)
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[:, :, 0] = op.apply(np.ascontiguousarray(lab[:, :, 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def estimate_fov(image: np.ndarray, threshold: int = 20) -> np.ndarray:
    """The camera aperture of a fundus image as a bool (H, W) map: red channel > `threshold`,
    largest connected component, holes filled. An image with no pixel above the threshold has
    no visible aperture: the whole image is returned as FOV (with a warning), so nothing is
    silently excluded."""
    _check_rgb(image)
    if not 0 <= threshold < 255:
        raise UserError(f"data.fov_threshold must be in [0, 254], got {threshold!r}.")
    bright = image[:, :, 0] > threshold
    labels, count = ndimage.label(bright)
    if count == 0:
        log.warning("estimate_fov: no pixel has red > %d; using the whole image as field of view.", threshold)
        return np.ones(bright.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # the background label
    largest = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(largest)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(H, W) after resizing by `scale` (rounded, at least 1 px)."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """Resize an (H, W[, C]) uint8 image: area averaging when shrinking (no aliasing of thin
    vessels into dotted lines), bilinear when enlarging."""
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    h, w = image.shape[:2]
    if (out_h, out_w) == (h, w):
        return image.copy()
    method = cv2.INTER_AREA if out_h * out_w < h * w else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (out_w, out_h), interpolation=method)


def resize_mask(mask: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) label map or bool mask, any dtype (int64 included).

    Output pixel i takes input pixel floor((i + 0.5) * H / out_H), the pixel whose area holds the
    output pixel's centre (PIL's NEAREST convention); values are copied, never interpolated.
    """
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    if mask.ndim != 2:
        raise ValueError(f"resize_mask expects an (H, W) array, got shape {mask.shape}")
    if out_h < 1 or out_w < 1:
        raise ValueError(f"resize_mask: size must be positive, got {[out_h, out_w]}")
    h, w = mask.shape
    rows = np.minimum(((np.arange(out_h) + 0.5) * (h / out_h)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * (w / out_w)).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]
