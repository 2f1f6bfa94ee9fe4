"""Image decoding shared by the task families: any PIL-readable file to a uint8 tv_tensors.Image,
with 16-bit scans scaled (not clipped), EXIF orientation applied and transparency on white.
A file that cannot be read raises `UserError` naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from podium.errors import UserError


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float images (scans, TIFFs) to 8-bit grey; PIL's convert('L') would clip them."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
    elif arr.max(initial=0.0) > 255:  # 16-bit data (PIL opens 16-bit PNGs as mode I or I;16)
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")


def _decode(path, channels: int, draft: int | None = None) -> Image.Image:
    """`path`: a file path or a binary file object (an uploaded image). `draft`: let a JPEG decode
    at 1/2, 1/4 or 1/8 scale (in the DCT, without ever holding the full image) as long as both
    sides stay >= `draft` pixels."""
    with Image.open(path) as img:
        if draft and img.format == "JPEG":
            img.draft("L" if channels == 1 else "RGB", (draft, draft))
        img = ImageOps.exif_transpose(img)  # phone photos: honour the orientation tag
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            img = _to_8bit(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Transparent areas become white (a page), not whatever colour hides under alpha 0.
            rgba = img.convert("RGBA")
            img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img.alpha_composite(rgba)
        img = img.convert("L" if channels == 1 else "RGB")
        img.load()  # decode fully now, inside the error handling
        return img


def load_image(path: str | os.PathLike, channels: int) -> tv_tensors.Image:
    """Decode an image file into a uint8 `channels` x H x W `tv_tensors.Image`.

    Raises UserError("<path>: cannot read image: <reason>. <what is read>") for a missing,
    corrupt or non-image file.
    """
    path = Path(path)
    try:
        img = _decode(path, channels)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise unreadable_image(path, str(e) or type(e).__name__) from None
    return tv_tensors.Image(TF.pil_to_tensor(img))


# What the image families (classification, segmentation, landmarks) read, named in every
# "cannot read" message: a user who passed an array file learns what to give instead.
IMAGE_FORMATS = "an image file Pillow decodes (PNG, JPEG, TIFF, BMP, GIF, WebP)"
ARRAY_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5", ".mat", ".pt", ".pkl")


def unreadable_image(path: Path, reason: str) -> UserError:
    """The UserError for a file that is not a readable image, naming it and the formats read."""
    path = Path(path)
    if path.suffix.lower() in ARRAY_SUFFIXES and path.is_file():
        return UserError(f"{path}: cannot read image: {path.suffix} array files are not read by this task; "
                         f"it reads {IMAGE_FORMATS} (save the array as a PNG or TIFF image).")
    return UserError(f"{path}: cannot read image: {reason}. Expected {IMAGE_FORMATS}.")




def decode_image_bytes(data: bytes, channels: int, name: str = "request", max_pixels: int = 50_000_000,
                       draft: int | None = None) -> torch.Tensor:
    """Decode encoded image bytes (an upload) exactly as `load_image` decodes a file: a uint8
    `channels` x H x W tensor. Non-image bytes, a truncated file or an image larger than
    `max_pixels` (a decompression bomb; checked on the header, before decoding) raise UserError
    naming `name`. `draft`: see `_decode` (a reduced JPEG decode; the result is smaller)."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
        if width * height > max_pixels:
            raise UserError(f"{name}: image of {width} x {height} pixels exceeds the limit of {max_pixels}.")
        img = _decode(io.BytesIO(data), channels, draft)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise UserError(f"{name}: cannot read image: {str(e) or type(e).__name__}") from None
    return TF.pil_to_tensor(img)


def channel_stats(values, channels: int, key: str) -> list[float]:
    """data.mean / data.std as one float per channel: a single value is repeated; any other
    count than 1 or `channels` is a UserError naming data.<key>."""
    values = [values] if isinstance(values, (int, float)) else list(values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise UserError(f"data.{key} has {len(values)} values; expected 1 or {channels} (data.channels).")
    return [float(v) for v in values]
