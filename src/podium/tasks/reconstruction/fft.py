"""Centred orthonormal 2-D Fourier transforms and complex helpers for multi-coil MRI.

Two layouts, one convention (reference.md, "MRI reconstruction"):
- torch tensors carry complex data as real tensors with a trailing dimension of 2 (the fastMRI
  layout): k-space (B, coils, H, W, 2). `fft2c` / `ifft2c` transform the two dimensions before
  the last.
- numpy arrays are ordinary complex arrays (coils, H, W); `fft2c_np` / `ifft2c_np` transform
  the last two axes.

    fft2c(x) = fftshift(fft2(ifftshift(x), norm="ortho")) over (H, W)

"ortho" makes the transform unitary, so image and k-space energies are equal and the adjoint is
the inverse — the data-consistency terms of the variational networks rely on that.

    >>> import torch
    >>> from podium.tasks.reconstruction.fft import fft2c, ifft2c, rss_complex
    >>> kspace = torch.randn(1, 4, 32, 24, 2)          # (B, coils, H, W, re/im)
    >>> image = rss_complex(ifft2c(kspace), dim=1)     # (1, 32, 24) magnitude image
    >>> bool(torch.allclose(fft2c(ifft2c(kspace)), kspace, atol=1e-5))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from podium.errors import UserError

Array = np.ndarray | Tensor
_IMAGE_DIMS = (-2, -1)


# --------------------------------------------------------------------------------------------
# torch, (..., H, W, 2) real tensors
# --------------------------------------------------------------------------------------------


def _as_complex(x: Tensor) -> Tensor:
    if x.ndim < 3 or x.shape[-1] != 2:
        raise ValueError(f"expected a (..., H, W, 2) real tensor, got shape {tuple(x.shape)}")
    # Half precision cannot hold k-space's dynamic range (and cuFFT only takes power-of-two
    # sizes in half), so low-precision inputs are transformed and returned in float32.
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return torch.view_as_complex(x.contiguous())


def fft2c(x: Tensor) -> Tensor:
    """Centred orthonormal 2-D FFT of a (..., H, W, 2) tensor (image -> k-space)."""
    z = torch.fft.ifftshift(_as_complex(x), dim=_IMAGE_DIMS)
    z = torch.fft.fft2(z, dim=_IMAGE_DIMS, norm="ortho")
    return torch.view_as_real(torch.fft.fftshift(z, dim=_IMAGE_DIMS))


def ifft2c(x: Tensor) -> Tensor:
    """Centred orthonormal 2-D inverse FFT of a (..., H, W, 2) tensor (k-space -> image)."""
    z = torch.fft.ifftshift(_as_complex(x), dim=_IMAGE_DIMS)
    z = torch.fft.ifft2(z, dim=_IMAGE_DIMS, norm="ortho")
    return torch.view_as_real(torch.fft.fftshift(z, dim=_IMAGE_DIMS))


def flip_readout(kspace: Tensor, mask: Tensor) -> Tensor:
    """The k-space of the image mirrored along the readout (H) axis, re-masked with `mask`.

    Mirroring rows changes only the ky axis, so the sampled phase-encode columns stay the same:
    the flipped scan is a valid input for the same column mask (what readout-flip TTA needs)."""
    return fft2c(ifft2c(kspace).flip(-3)) * mask


def complex_mul(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise product of two (..., 2) tensors (broadcasting)."""
    real = a[..., 0] * b[..., 0] - a[..., 1] * b[..., 1]
    imag = a[..., 0] * b[..., 1] + a[..., 1] * b[..., 0]
    return torch.stack((real, imag), dim=-1)


def complex_conj(x: Tensor) -> Tensor:
    """Complex conjugate of a (..., 2) tensor."""
    return torch.stack((x[..., 0], -x[..., 1]), dim=-1)


def complex_abs_sq(x: Tensor) -> Tensor:
    """|x|^2 of a (..., 2) tensor; shape (...)."""
    return x[..., 0] ** 2 + x[..., 1] ** 2


def complex_abs(x: Tensor) -> Tensor:
    """|x| of a (..., 2) tensor; shape (...)."""
    return complex_abs_sq(x).sqrt()


def rss_complex(x: Tensor, dim: int = 1) -> Tensor:
    """Root-sum-of-squares of the magnitudes of a (..., 2) tensor over `dim` (default 1: the
    coil axis of (B, coils, H, W, 2))."""
    return complex_abs_sq(x).sum(dim).sqrt()


# --------------------------------------------------------------------------------------------
# numpy, complex arrays over the last two axes
# --------------------------------------------------------------------------------------------


def _complex_dtype(x: np.ndarray) -> np.dtype:
    # complex64 in, complex64 out (the family's k-space convention); real input gets the
    # smallest complex type that holds it.
    return np.result_type(x.dtype, np.complex64)


def fft2c_np(x: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2-D FFT of a complex array over its last two axes."""
    x = np.asarray(x)
    z = np.fft.fft2(np.fft.ifftshift(x, axes=_IMAGE_DIMS), axes=_IMAGE_DIMS, norm="ortho")
    return np.fft.fftshift(z, axes=_IMAGE_DIMS).astype(_complex_dtype(x), copy=False)


def ifft2c_np(x: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2-D inverse FFT of a complex array over its last two axes."""
    x = np.asarray(x)
    z = np.fft.ifft2(np.fft.ifftshift(x, axes=_IMAGE_DIMS), axes=_IMAGE_DIMS, norm="ortho")
    return np.fft.fftshift(z, axes=_IMAGE_DIMS).astype(_complex_dtype(x), copy=False)


# --------------------------------------------------------------------------------------------
# both
# --------------------------------------------------------------------------------------------


def rss(x: Array, dim: int | None = None) -> Array:
    """Root-sum-of-squares over `dim`: sqrt(sum |x|^2).

    For numpy the default `dim` is 0 (the coil axis of a (coils, H, W) slice); for torch it is 1
    (the coil axis of a (B, coils, H, W) batch). Complex dtypes use their magnitude; a torch
    tensor in the (..., 2) layout needs `rss_complex` instead (its last axis is not a coil axis).
    """
    if isinstance(x, Tensor):
        dim = 1 if dim is None else dim
        magnitude_sq = x.abs() ** 2 if x.is_complex() else x**2
        return magnitude_sq.sum(dim).sqrt()
    x = np.asarray(x)
    dim = 0 if dim is None else dim
    return np.sqrt((np.abs(x) ** 2).sum(axis=dim))


def _crop_window(full: Sequence[int], size: Sequence[int]) -> tuple[slice, slice]:
    (height, width), (crop_h, crop_w) = full, size
    if not (0 < crop_h <= height and 0 < crop_w <= width):
        raise UserError(
            f"center crop to {crop_h} x {crop_w} does not fit an image of {height} x {width}; "
            "ask for a crop (e.g. the data's recon_size / crop_size) no larger than the image"
        )
    # Same offsets as the fastMRI reference crop ((full - crop) // 2), so cropped
    # reconstructions line up pixel for pixel with `reconstruction_rss`.
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return slice(top, top + crop_h), slice(left, left + crop_w)


def center_crop(x: Array, size: Sequence[int]) -> Array:
    """Centre crop of the last two dimensions of a tensor or array to `size` = (h, w)."""
    rows, cols = _crop_window(x.shape[-2:], size)
    return x[..., rows, cols]


def complex_center_crop(x: Tensor, size: Sequence[int]) -> Tensor:
    """Centre crop of a (..., H, W, 2) tensor to `size` = (h, w)."""
    if x.shape[-1] != 2:
        raise ValueError(f"expected a (..., H, W, 2) tensor, got shape {tuple(x.shape)}")
    rows, cols = _crop_window(x.shape[-3:-1], size)
    return x[..., rows, cols, :]
