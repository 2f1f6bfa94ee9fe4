"""Centred orthonormal FFTs and complex helpers: unitarity, centring, numpy/torch agreement,
round trips, RSS and centre crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from podium.errors import UserError
from podium.tasks.reconstruction import fft as F

SHAPES = [(2, 3, 16, 12), (1, 2, 15, 9)]  # even and odd image sizes


def random_complex(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.view_as_real(torch.from_numpy(x)).contiguous()


@pytest.mark.parametrize("shape", SHAPES)
def test_transforms_preserve_energy(shape):
    x = random_complex(shape)
    energy = np.sum(np.abs(x) ** 2)
    assert np.sum(np.abs(F.fft2c_np(x)) ** 2) == pytest.approx(energy, rel=1e-5)
    assert np.sum(np.abs(F.ifft2c_np(x)) ** 2) == pytest.approx(energy, rel=1e-5)
    xt = to_torch(x)
    assert F.fft2c(xt).pow(2).sum().item() == pytest.approx(energy, rel=1e-5)
    assert F.ifft2c(xt).pow(2).sum().item() == pytest.approx(energy, rel=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_numpy_and_torch_agree(shape):
    x = random_complex(shape, seed=1)
    np.testing.assert_allclose(
        F.fft2c(to_torch(x)).numpy(), to_torch(F.fft2c_np(x)).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(
        F.ifft2c(to_torch(x)).numpy(), to_torch(F.ifft2c_np(x)).numpy(), atol=1e-5
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trips_are_identities(shape):
    x = random_complex(shape, seed=2)
    np.testing.assert_allclose(F.ifft2c_np(F.fft2c_np(x)), x, atol=1e-5)
    np.testing.assert_allclose(F.fft2c_np(F.ifft2c_np(x)), x, atol=1e-5)
    xt = to_torch(x)
    torch.testing.assert_close(F.ifft2c(F.fft2c(xt)), xt, atol=1e-5, rtol=0)
    torch.testing.assert_close(F.fft2c(F.ifft2c(xt)), xt, atol=1e-5, rtol=0)


@pytest.mark.parametrize("height,width", [(16, 12), (15, 9)])
def test_zero_frequency_sits_at_the_centre(height, width):
    # A constant image has all its energy at k = 0, which the centred transform puts at
    # (H // 2, W // 2); and an impulse there transforms back to a flat image.
    constant = np.ones((height, width), np.complex64)
    kspace = F.fft2c_np(constant)
    expected = np.zeros_like(kspace)
    expected[height // 2, width // 2] = np.sqrt(height * width)
    np.testing.assert_allclose(kspace, expected, atol=1e-4)
    np.testing.assert_allclose(F.ifft2c_np(expected), constant, atol=1e-5)
    torch.testing.assert_close(
        F.fft2c(to_torch(constant)), to_torch(expected), atol=1e-4, rtol=0
    )


def test_dtypes():
    assert F.fft2c_np(random_complex((4, 4))).dtype == np.complex64
    assert F.ifft2c_np(np.ones((4, 4), np.float64)).dtype == np.complex128
    # half precision cannot hold k-space; it is transformed and returned in float32
    assert F.fft2c(torch.randn(1, 8, 8, 2).half()).dtype == torch.float32
    with pytest.raises(ValueError, match="H, W, 2"):
        F.fft2c(torch.randn(4, 4, 3))


def test_complex_helpers_match_torch_complex():
    a, b = random_complex((3, 5), 3), random_complex((3, 5), 4)
    at, bt = to_torch(a), to_torch(b)
    ca, cb = torch.from_numpy(a), torch.from_numpy(b)
    torch.testing.assert_close(F.complex_mul(at, bt), torch.view_as_real(ca * cb))
    torch.testing.assert_close(F.complex_conj(at), torch.view_as_real(ca.conj().resolve_conj()))
    torch.testing.assert_close(F.complex_abs(at), ca.abs())
    torch.testing.assert_close(F.complex_abs_sq(at), ca.abs() ** 2)


def test_rss_defaults_and_agreement():
    coils = random_complex((4, 6, 5), 5)  # numpy: (coils, H, W), coil axis 0 by default
    expected = np.sqrt((np.abs(coils) ** 2).sum(0))
    np.testing.assert_allclose(F.rss(coils), expected, rtol=1e-5)
    np.testing.assert_allclose(F.rss(np.abs(coils)), expected, rtol=1e-5)
    batch = torch.from_numpy(coils)[None]  # torch: (B, coils, H, W), coil axis 1 by default
    torch.testing.assert_close(F.rss(batch), torch.from_numpy(expected)[None])
    torch.testing.assert_close(F.rss(batch.abs()), torch.from_numpy(expected)[None])
    torch.testing.assert_close(
        F.rss_complex(torch.view_as_real(batch)), torch.from_numpy(expected)[None]
    )
    torch.testing.assert_close(F.rss(batch.abs(), dim=0), batch.abs()[0])


def test_center_crop_offsets_match_the_reference_crop():
    image = np.arange(7 * 10).reshape(7, 10)
    cropped = F.center_crop(image, (4, 5))
    # offsets (7 - 4) // 2 = 1 and (10 - 5) // 2 = 2
    np.testing.assert_array_equal(cropped, image[1:5, 2:7])
    tensor = torch.from_numpy(image)[None, None]
    expected = torch.from_numpy(image[1:5, 2:7])
    torch.testing.assert_close(F.center_crop(tensor, (4, 5))[0, 0], expected)
    as_complex = torch.stack([tensor, -tensor], dim=-1)
    cropped_complex = F.complex_center_crop(as_complex, (4, 5))
    assert cropped_complex.shape == (1, 1, 4, 5, 2)
    torch.testing.assert_close(cropped_complex[0, 0, ..., 1], -torch.from_numpy(image[1:5, 2:7]))


def test_center_crop_larger_than_the_image_is_a_user_error():
    with pytest.raises(UserError, match="does not fit"):
        F.center_crop(np.zeros((8, 8)), (9, 4))
    with pytest.raises(UserError, match="does not fit"):
        F.complex_center_crop(torch.zeros(8, 8, 2), (4, 9))


@pytest.mark.parametrize("shape", SHAPES)
def test_flip_readout_mirrors_the_image_rows_and_keeps_the_sampled_columns(shape):
    images = random_complex(shape, seed=3)
    kspace = to_torch(F.fft2c_np(images))
    mask = torch.zeros(shape[-1])
    mask[::3] = 1
    mask = mask[None, None, None, :, None]
    flipped = F.flip_readout(kspace * mask, mask)
    assert torch.all(flipped[..., mask[0, 0, 0, :, 0] == 0, :] == 0)  # unsampled columns stay empty
    zero_filled = F.ifft2c(kspace * mask)
    assert torch.allclose(F.ifft2c(flipped), zero_filled.flip(-3), atol=1e-5)
