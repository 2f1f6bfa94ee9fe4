"""CLAHE, field-of-view estimation and nearest-neighbour resizing (segmentation preprocess.py)."""

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podium.errors import UserError
from podium.tasks.segmentation.preprocess import (
    CLAHE_MODES,
    clahe,
    estimate_fov,
    resize_image,
    resize_mask,
    scaled_size,
)


def low_contrast_rgb(h=64, w=80, seed=0):
    rng = np.random.default_rng(seed)
    base = np.array([150, 80, 40], dtype=np.float64)
    ramp = np.linspace(-10, 10, w)[None, :, None] + rng.normal(0, 3, (h, w, 1))
    return np.clip(base + ramp, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", CLAHE_MODES)
def test_clahe_keeps_shape_and_dtype(mode):
    img = low_contrast_rgb()
    out = clahe(img, mode)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert out is not img


def test_clahe_none_is_a_copy():
    img = low_contrast_rgb()
    out = clahe(img, "none")
    np.testing.assert_array_equal(out, img)
    out[0, 0, 0] = 1 + img[0, 0, 0] % 200
    assert out[0, 0, 0] != img[0, 0, 0]


def test_clahe_green_equalises_the_green_channel_into_all_channels():
    img = low_contrast_rgb()
    out = clahe(img, "green", clip_limit=3.0, tile_grid=4)
    expected = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(np.ascontiguousarray(img[:, :, 1]))
    for ch in range(3):
        np.testing.assert_array_equal(out[:, :, ch], expected)


def test_clahe_lab_raises_lightness_contrast_and_keeps_colour_order():
    img = low_contrast_rgb()
    out = clahe(img, "lab", clip_limit=4.0)
    lab_in = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)[:, :, 0].astype(float)
    lab_out = cv2.cvtColor(out, cv2.COLOR_RGB2LAB)[:, :, 0].astype(float)
    assert lab_out.std() > 1.5 * lab_in.std()
    # Colour kept: still red > green > blue on average (green mode would make them equal).
    means = out.reshape(-1, 3).mean(0)
    assert means[0] > means[1] > means[2]


@pytest.mark.parametrize("mode", ["LAB", "clahe", "", "grey"])
def test_clahe_unknown_mode_names_the_key(mode):
    with pytest.raises(UserError, match=r"data\.clahe .*lab, green, none"):
        clahe(low_contrast_rgb(), mode)


@pytest.mark.parametrize("kwargs,key", [({"clip_limit": 0.0}, "clahe_clip"), ({"tile_grid": 0}, "clahe_tiles")])
def test_clahe_bad_parameters(kwargs, key):
    with pytest.raises(UserError, match=key):
        clahe(low_contrast_rgb(), "lab", **kwargs)


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8)])
def test_clahe_rejects_non_rgb_uint8(bad):
    with pytest.raises(UserError, match=r"\(H, W, 3\) uint8"):
        clahe(bad, "lab")


def fundus_disc(h=60, w=70, radius=25):
    """A bright disc with dark vessel-like lines and a dark blob inside, a bright speck outside."""
    ys, xs = np.mgrid[0:h, 0:w]
    disc = (ys - h / 2) ** 2 + (xs - w / 2) ** 2 <= radius**2
    img = np.zeros((h, w, 3), np.uint8)
    img[disc] = (180, 90, 30)
    img[h // 2, 15:55] = (5, 5, 5)  # a vessel darker than the threshold, inside the disc
    img[25:29, 30:34] = (0, 0, 0)  # a hole
    img[1, 1] = (200, 200, 200)  # noise outside the aperture
    return img, disc


def test_estimate_fov_keeps_largest_component_and_fills_holes():
    img, disc = fundus_disc()
    fov = estimate_fov(img, threshold=20)
    assert fov.dtype == bool and fov.shape == disc.shape
    assert not fov[1, 1]  # the speck is not the aperture
    assert fov[27, 31] and fov[30, 35]  # the blob and the vessel inside are filled
    np.testing.assert_array_equal(fov, disc)


def test_estimate_fov_dark_image_is_whole_image():
    fov = estimate_fov(np.zeros((10, 12, 3), np.uint8))
    assert fov.all() and fov.shape == (10, 12)


def test_estimate_fov_bad_threshold():
    with pytest.raises(UserError, match="fov_threshold"):
        estimate_fov(np.zeros((10, 12, 3), np.uint8), threshold=300)


def test_resize_mask_is_nearest_and_keeps_dtype():
    mask = np.array([[0, 1], [255, 2]], dtype=np.int64)
    up = resize_mask(mask, (4, 4))
    np.testing.assert_array_equal(up, np.repeat(np.repeat(mask, 2, 0), 2, 1))
    assert up.dtype == np.int64
    big = np.arange(36, dtype=np.int64).reshape(6, 6)
    np.testing.assert_array_equal(resize_mask(big, (3, 3)), big[1::2, 1::2])  # centres of 2x2 cells
    b = resize_mask(np.eye(4, dtype=bool), (8, 8))
    assert b.dtype == bool and b.sum() == 16


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 30), w=st.integers(1, 30), oh=st.integers(1, 40), ow=st.integers(1, 40), seed=st.integers(0, 99))
def test_resize_mask_never_invents_values(h, w, oh, ow, seed):
    mask = np.random.default_rng(seed).choice(np.array([0, 3, 255]), size=(h, w))
    out = resize_mask(mask, (oh, ow))
    assert out.shape == (oh, ow)
    assert set(np.unique(out)) <= set(np.unique(mask))


def test_resize_mask_rejects_bad_input():
    with pytest.raises(ValueError):
        resize_mask(np.zeros((2, 2, 3)), (4, 4))
    with pytest.raises(ValueError):
        resize_mask(np.zeros((2, 2)), (0, 4))


def test_scaled_size_and_resize_image():
    assert scaled_size(584, 565, 0.5) == (292, 282)
    assert scaled_size(3, 3, 0.01) == (1, 1)
    flat = np.full((20, 30, 3), 77, np.uint8)
    small = resize_image(flat, (10, 15))
    assert small.shape == (10, 15, 3) and (small == 77).all()  # area averaging of a constant
    assert resize_image(flat, (40, 60)).shape == (40, 60, 3)
    # Area averaging keeps the mean of a thin line (bilinear sampling would drop or double it).
    line = np.zeros((16, 16, 3), np.uint8)
    line[:, 5] = 200
    assert abs(resize_image(line, (8, 8)).mean() - line.mean()) < 1.0
