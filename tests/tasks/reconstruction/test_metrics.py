"""Reconstruction metrics pinned to the reference implementations.

scikit-image's `structural_similarity` / `peak_signal_noise_ratio` are what fastMRI's
`evaluate.py` calls and what the SNU scorer's SSIM equals; every SSIM here (numpy and torch) must
match them to 1e-6 on random and structured images of several shapes, odd sizes included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from podium.errors import UserError
from podium.tasks.reconstruction import metrics
from podium.tasks.reconstruction.metrics import (
    SNU_THRESHOLDS,
    nmse,
    psnr,
    snu_foreground_mask,
    snu_leaderboard_score,
    ssim_fastmri,
    ssim_map,
    ssim_snu_slice,
    ssim_snu_volume,
    ssim_torch,
    volume_metrics,
)

SHAPES = [(7, 7), (20, 33), (31, 17), (48, 48)]


def structured_pair(shape, seed=0):
    """A phantom-like target (ellipse, stripes, smooth ramp, zero background) and a blurred,
    noisy reconstruction of it."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ellipse = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.35 * w)) ** 2 < 1
    target = ellipse * (1.0 + 0.5 * np.sin(xx / 2.0) + 0.01 * yy)
    recon = 0.5 * target + 0.25 * (np.roll(target, 1, 0) + np.roll(target, 1, 1))
    recon = recon + 0.05 * rng.standard_normal(shape)
    return target * 3e-4, recon * 3e-4  # realistic MRI intensities (~1e-4)


def random_pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.random(shape)
    return target, target + 0.2 * rng.standard_normal(shape)


PAIRS = [("random", random_pair), ("structured", structured_pair)]


def skimage_ssim(gt, pred, data_range, full=False):
    return structural_similarity(gt, pred, win_size=7, data_range=data_range, full=full)


# --------------------------------------------------------------------------------------------
# fastMRI SSIM / PSNR / NMSE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,make", PAIRS)
def test_ssim_map_and_slice_match_skimage(shape, kind, make):
    gt, pred = make(shape, seed=sum(shape))
    data_range = gt.max() * 1.1
    expected_mean, expected_map = skimage_ssim(gt, pred, data_range, full=True)
    np.testing.assert_allclose(ssim_map(gt, pred, data_range), expected_map, atol=1e-9)
    assert metrics.ssim_slice(gt, pred, data_range) == pytest.approx(expected_mean, abs=1e-9)


@pytest.mark.parametrize("kind,make", PAIRS)
def test_ssim_fastmri_matches_skimage_with_volume_max(kind, make):
    slices = [make((23, 30), seed=s) for s in range(3)]
    gt = np.stack([g * (s + 1) for s, (g, _) in enumerate(slices)])  # slice maxima differ
    pred = np.stack([p * (s + 1) for s, (_, p) in enumerate(slices)])
    volume_max = gt.max()
    expected = np.mean([skimage_ssim(g, p, volume_max) for g, p in zip(gt, pred)])
    assert ssim_fastmri(gt, pred) == pytest.approx(expected, abs=1e-9)
    # The per-slice maximum is a different (wrong) metric: make sure the test can tell.
    per_slice = np.mean([skimage_ssim(g, p, g.max()) for g, p in zip(gt, pred)])
    assert abs(per_slice - expected) > 1e-4


def test_ssim_fastmri_uses_given_maxval():
    gt, pred = random_pair((2, 16, 16))
    expected = np.mean([skimage_ssim(g, p, 5.0) for g, p in zip(gt, pred)])
    assert ssim_fastmri(gt, pred, maxval=5.0) == pytest.approx(expected, abs=1e-9)
    assert ssim_fastmri(gt, gt) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kind,make", PAIRS)
def test_psnr_matches_skimage_and_nmse_by_hand(kind, make):
    pairs = [make((17, 21), seed=4 + s) for s in range(3)]
    gt, pred = np.stack([g for g, _ in pairs]), np.stack([p for _, p in pairs])
    expected = peak_signal_noise_ratio(gt, pred, data_range=gt.max())
    assert psnr(gt, pred) == pytest.approx(expected, abs=1e-9)
    assert psnr(gt, pred, maxval=2.0) == pytest.approx(
        peak_signal_noise_ratio(gt, pred, data_range=2.0), abs=1e-9
    )
    by_hand = sum((a - b) ** 2 for a, b in zip(gt.ravel(), pred.ravel())) / sum(
        a * a for a in gt.ravel()
    )
    assert nmse(gt, pred) == pytest.approx(by_hand, rel=1e-12)
    assert psnr(gt, gt) == float("inf")
    assert nmse(gt, gt) == 0.0


def test_volume_metrics_bundles_the_three():
    gt, pred = structured_pair((40, 40))
    gt_vol, pred_vol = np.stack([gt, gt * 0.5]), np.stack([pred, pred * 0.5])
    result = volume_metrics(gt_vol, pred_vol)
    assert set(result) == {"ssim", "psnr", "nmse"}
    assert result["ssim"] == ssim_fastmri(gt_vol, pred_vol)
    assert result["psnr"] == psnr(gt_vol, pred_vol)
    assert result["nmse"] == nmse(gt_vol, pred_vol)


def test_float32_inputs_are_scored_in_float64():
    gt, pred = random_pair((2, 20, 20))
    gt32, pred32 = gt.astype(np.float32), pred.astype(np.float32)
    gt64, pred64 = gt32.astype(np.float64), pred32.astype(np.float64)
    as64 = np.mean([skimage_ssim(g, p, float(gt32.max())) for g, p in zip(gt64, pred64)])
    assert ssim_fastmri(gt32, pred32) == pytest.approx(as64, abs=1e-12)
    # skimage itself would work in float32; that differs only by round-off.
    as32 = np.mean([skimage_ssim(g, p, gt32.max()) for g, p in zip(gt32, pred32)])
    assert ssim_fastmri(gt32, pred32) == pytest.approx(as32, abs=1e-5)


def test_invalid_inputs_are_user_errors():
    gt, pred = random_pair((2, 16, 16))
    with pytest.raises(UserError, match="differs from target shape"):
        ssim_fastmri(gt, pred[:, :, :15])
    with pytest.raises(UserError, match="3 dimensions"):
        ssim_fastmri(gt[0], pred[0])
    with pytest.raises(UserError, match="complex"):
        psnr(gt.astype(np.complex64), pred)
    with pytest.raises(UserError, match="smaller than"):
        ssim_fastmri(gt[:, :6], pred[:, :6])
    with pytest.raises(UserError, match="data range"):
        ssim_fastmri(np.zeros_like(gt), pred)


# --------------------------------------------------------------------------------------------
# SNU leaderboard SSIM
# --------------------------------------------------------------------------------------------


def disc_image(size=128, radius=20):
    yy, xx = np.mgrid[0:size, 0:size]
    return (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < radius**2).astype(np.float64)


def test_snu_mask_closes_holes_and_removes_specks():
    disc = disc_image()
    target = disc * 1e-3
    target[60:63, 58:62] = 0.0  # a small hole inside the anatomy
    target[62, 66] = 0.0  # and a one-pixel one
    target[10, 10] = 1e-3  # an isolated speck of noise in the background
    target[110:112, 20:22] = 1e-3  # a 2 x 2 speck
    mask = snu_foreground_mask(target, SNU_THRESHOLDS["brain"])
    assert mask.dtype == np.float64 and mask.shape == target.shape
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert mask[60:63, 58:62].all() and mask[62, 66] == 1  # holes filled
    assert mask[10, 10] == 0 and not mask[110:112, 20:22].any()  # specks gone
    # Away from the border, one erosion then a closing (dilate 15, erode 14) gives the disc
    # back exactly.
    np.testing.assert_array_equal(mask, disc)


def test_snu_mask_uses_opencv_border_semantics():
    # Beyond the border is neutral: an all-foreground slice keeps every pixel (a zero-padded
    # erosion, scipy's default, would strip the edges).
    everything = np.ones((32, 40))
    np.testing.assert_array_equal(snu_foreground_mask(everything, 0.5), everything)
    # Threshold is strict (>): a slice equal to it is all background.
    assert not snu_foreground_mask(np.full((16, 16), 5e-5), 5e-5).any()
    # A gap between the anatomy and the image edge narrower than the closing is filled, and
    # erosion does not reopen it from the edge.
    block = np.zeros((64, 64))
    block[20:44, 6:30] = 1.0
    mask = snu_foreground_mask(block, 0.5)
    assert mask[20:44, :6].all()
    assert not mask[:20].any() and not mask[44:].any() and not mask[:, 30:].any()


@pytest.mark.parametrize("shape", [(24, 24), (33, 29)])
@pytest.mark.parametrize("kind,make", PAIRS)
def test_ssim_snu_slice_matches_skimage_on_premasked_images(shape, kind, make):
    target, recon = make(shape, seed=7)
    # A zero margin wider than the closing, so that the mask does not reach the image edge,
    # and a noisy background in the reconstruction for the mask to remove.
    target = np.pad(target, 20)
    recon = np.pad(recon, 20) + 0.05 * target.max() * np.random.default_rng(3).random(target.shape)
    threshold = 0.3 * target.max()
    maxval = target.max() * 1.05
    mask = snu_foreground_mask(target, threshold)
    assert 0 < mask.mean() < 1  # the mask must matter for this test to mean anything
    expected = skimage_ssim(target * mask, recon * mask, maxval)
    assert ssim_snu_slice(recon, target, maxval, threshold) == pytest.approx(expected, abs=1e-9)
    unmasked = skimage_ssim(target, recon, maxval)
    assert abs(unmasked - expected) > 1e-4


def test_windows_zero_in_both_images_score_exactly_one():
    target = np.zeros((64, 64))
    target[24:40, 24:40] = 1e-3
    recon = target + 1e-4 * np.random.default_rng(0).standard_normal(target.shape)
    full = ssim_map(target, np.where(target > 0, recon, 0.0), data_range=1e-3)
    assert np.all(full[:10, :] == 1.0) and np.all(full[:, -10:] == 1.0)
    assert full[32, 32] < 1.0

    # The SNU score averages the whole valid map, background windows included: with a small
    # object and a noisy background, the masked score is dominated by those exact ones.
    score = ssim_snu_slice(recon, target, 1e-3, SNU_THRESHOLDS["brain"])
    mask = snu_foreground_mask(target, SNU_THRESHOLDS["brain"])
    interior = ssim_map(target * mask, recon * mask, 1e-3)[3:-3, 3:-3]
    ones = interior == 1.0
    assert ones.mean() > 0.5
    assert score == pytest.approx((ones.sum() + interior[~ones].sum()) / interior.size, abs=1e-12)

    # The torch SSIM (used by the masked losses) has the same property, in float32 too.
    for dtype in (torch.float64, torch.float32):
        torch_map = ssim_torch(
            torch.from_numpy(recon).to(dtype)[None],
            torch.from_numpy(target).to(dtype)[None],
            1e-3,
            reduction="map",
            mask=torch.from_numpy(mask)[None],
        )[0].numpy()
        np.testing.assert_array_equal(torch_map == 1.0, ones)


def test_ssim_snu_volume_picks_threshold_by_anatomy():
    target = np.zeros((2, 96, 96))
    target[:, 16:36, 16:36] = 1e-3
    target[:, 60:72, 60:72] = 3e-5  # between the knee (2e-5) and brain (5e-5) thresholds
    recon = target + 1e-5 * np.random.default_rng(1).standard_normal(target.shape)
    knee = ssim_snu_volume(recon, target, 1e-3, "knee")
    brain = ssim_snu_volume(recon, target, 1e-3, "brain")
    assert len(knee) == 2 and all(isinstance(s, float) for s in knee)
    assert knee[0] == ssim_snu_slice(recon[0], target[0], 1e-3, 2e-5)
    assert brain[1] == ssim_snu_slice(recon[1], target[1], 1e-3, 5e-5)
    assert knee[0] != brain[0]
    assert snu_foreground_mask(target[0], 2e-5)[66, 66] == 1
    assert snu_foreground_mask(target[0], 5e-5)[66, 66] == 0
    with pytest.raises(UserError, match="unknown anatomy"):
        ssim_snu_volume(recon, target, 1e-3, "prostate")


def test_snu_leaderboard_score_is_mean_of_the_two_means():
    # Not the pooled mean over all slices (0.8 here).
    assert snu_leaderboard_score([1.0, 0.5], [0.9]) == pytest.approx(0.825)
    with pytest.raises(UserError):
        snu_leaderboard_score([], [0.9])


# --------------------------------------------------------------------------------------------
# Torch SSIM
# --------------------------------------------------------------------------------------------


def torch_batch(make, shape, batch=3):
    pairs = [make(shape, seed=10 + b) for b in range(batch)]
    gt = np.stack([g * (b + 1) for b, (g, _) in enumerate(pairs)])
    pred = np.stack([p * (b + 1) for b, (_, p) in enumerate(pairs)])
    data_range = gt.reshape(batch, -1).max(axis=1)
    return gt, pred, data_range


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,make", PAIRS)
def test_ssim_torch_matches_skimage_in_float64(shape, kind, make):
    gt, pred, data_range = torch_batch(make, shape)
    expected = [skimage_ssim(g, p, r) for g, p, r in zip(gt, pred, data_range)]
    t_pred, t_gt, t_range = (torch.from_numpy(a) for a in (pred, gt, data_range))

    per_image = ssim_torch(t_pred, t_gt, t_range, reduction="none")
    assert per_image.dtype == torch.float64 and per_image.shape == (3,)
    np.testing.assert_allclose(per_image.numpy(), expected, atol=1e-9)
    assert ssim_torch(t_pred, t_gt, t_range).item() == pytest.approx(np.mean(expected), abs=1e-9)
    # (B, 1, H, W) gives the same values.
    with_channel = ssim_torch(t_pred[:, None], t_gt[:, None], t_range, reduction="none")
    np.testing.assert_allclose(with_channel.numpy(), expected, atol=1e-12)

    ssim_maps = ssim_torch(t_pred, t_gt, t_range, reduction="map")
    pad = 3
    for b in range(3):
        _, full = skimage_ssim(gt[b], pred[b], data_range[b], full=True)
        cropped = full[pad : full.shape[0] - pad, pad : full.shape[1] - pad]
        np.testing.assert_allclose(ssim_maps[b].numpy(), cropped, atol=1e-9)
    assert ssim_torch(t_pred[:, None], t_gt[:, None], t_range, reduction="map").ndim == 4


def test_ssim_torch_mask_matches_premasked_skimage():
    gt, pred, data_range = torch_batch(structured_pair, (30, 26), batch=2)
    masks = np.stack([snu_foreground_mask(g, 0.3 * g.max()) for g in gt])
    expected = [skimage_ssim(g * m, p * m, r) for g, p, m, r in zip(gt, pred, masks, data_range)]
    got = ssim_torch(
        torch.from_numpy(pred),
        torch.from_numpy(gt),
        torch.from_numpy(data_range),
        reduction="none",
        mask=torch.from_numpy(masks),
    )
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-9)


def test_ssim_torch_scalar_data_range_and_float32():
    gt, pred = random_pair((2, 16, 16))
    t_gt, t_pred = torch.from_numpy(gt).float(), torch.from_numpy(pred).float()
    value = ssim_torch(t_pred, t_gt, 1.5)
    assert value.dtype == torch.float32
    expected = np.mean([skimage_ssim(g, p, 1.5) for g, p in zip(gt, pred)])
    assert value.item() == pytest.approx(expected, abs=1e-5)


def test_ssim_torch_computes_half_precision_in_float32():
    gt, pred = structured_pair((24, 24))  # MRI-like intensities, ~1e-4
    t_gt, t_pred = torch.from_numpy(gt)[None], torch.from_numpy(pred)[None]
    reference = ssim_torch(t_pred.float(), t_gt.float(), float(gt.max()))
    for dtype in (torch.float16, torch.bfloat16):
        value = ssim_torch(t_pred.to(dtype), t_gt.to(dtype), float(gt.max()))
        assert value.dtype == torch.float32
        # Only the rounding of the inputs to half precision remains.
        assert value.item() == pytest.approx(reference.item(), abs=1e-3)


def test_ssim_torch_is_differentiable():
    gt, pred = random_pair((1, 9, 10))
    t_pred = torch.from_numpy(pred).requires_grad_(True)
    t_gt, t_range = torch.from_numpy(gt), torch.tensor([1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda p: ssim_torch(p, t_gt, t_range), (t_pred,), fast_mode=True
    )


def test_ssim_torch_rejects_bad_arguments():
    x = torch.rand(2, 16, 16)
    with pytest.raises(ValueError, match="reduction"):
        ssim_torch(x, x, 1.0, reduction="sum")
    with pytest.raises(ValueError, match="differ"):
        ssim_torch(x, x[:, :15], 1.0)
    with pytest.raises(ValueError, match="odd"):
        ssim_torch(x, x, 1.0, win_size=6)
    with pytest.raises(ValueError, match="shape"):
        ssim_torch(torch.rand(2, 2, 16, 16), torch.rand(2, 2, 16, 16), 1.0)
