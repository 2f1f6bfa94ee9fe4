"""Reconstruction losses: registration, values against scikit-image and by-hand numpy, masking,
scale invariance and gradients, on tiny batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from skimage.metrics import structural_similarity

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.reconstruction import losses  # registers "ssim", "ssim_l1", "l1"

NAMES = ("ssim", "ssim_l1", "l1")


def make_loss(name: str, **fields):
    """Build a loss the way the engine does: a structured config validated by its schema.
    Looked up directly, not via registry.build, which would load every task family."""
    entry = registry._REGISTRY["loss"][name]
    return entry.factory(OmegaConf.structured(entry.schema(**fields)))


def batch(seed=0, b=2, h=20, w=18, dtype=torch.float64):
    """Targets at MRI-like scale (~1e-4) with a dark background, noisy predictions, a mask."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    inside = (((yy - h / 2) / (0.35 * h)) ** 2 + ((xx - w / 2) / (0.35 * w)) ** 2) < 1
    target = (inside * (1 + torch.rand(b, h, w, generator=gen, dtype=torch.float64))) * 1e-4
    pred = target + 2e-5 * torch.randn(b, h, w, generator=gen, dtype=torch.float64)
    data_range = target.flatten(1).amax(1) * torch.tensor([1.0, 1.3])[:b].to(torch.float64)
    mask = inside.expand(b, h, w).to(torch.float64)
    return pred.to(dtype), target.to(dtype), data_range.to(dtype), mask.to(dtype)


def skimage_mean_ssim(pred, target, data_range):
    return np.mean(
        [
            structural_similarity(t.numpy(), p.numpy(), win_size=7, data_range=float(r))
            for p, t, r in zip(pred, target, data_range)
        ]
    )


# --------------------------------------------------------------------------------------------
# Registration, schemas, config errors
# --------------------------------------------------------------------------------------------


def test_losses_registered_with_schemas_and_defaults():
    for name in NAMES:
        entry = registry._REGISTRY["loss"][name]
        assert entry.schema is not None and entry.schema().name == name
        assert isinstance(make_loss(name), torch.nn.Module)
    defaults = losses.SSIML1LossConfig()
    assert (defaults.ssim_weight, defaults.l1_weight, defaults.use_mask) == (0.84, 0.16, True)
    assert (losses.SSIMLossConfig().win_size, losses.SSIMLossConfig().k1) == (7, 0.01)


def test_factory_accepts_a_plain_dict_config():
    cfg = OmegaConf.create(
        {
            "name": "ssim_l1",
            "ssim_weight": 1.0,
            "l1_weight": 0.5,
            "use_mask": False,
            "win_size": 5,
            "k1": 0.01,
            "k2": 0.03,
        }
    )
    loss = losses.ssim_l1(cfg, some_context_the_engine_passes=1)
    assert (loss.ssim_weight, loss.l1_weight, loss.use_mask, loss.win_size) == (1.0, 0.5, False, 5)


@pytest.mark.parametrize(
    "name,fields,match",
    [
        ("ssim", {"win_size": 6}, "win_size"),
        ("ssim", {"k2": 0.0}, "k2"),
        ("ssim_l1", {"win_size": 1}, "win_size"),
        ("ssim_l1", {"l1_weight": -0.1}, "l1_weight"),
        ("ssim_l1", {"ssim_weight": 0.0, "l1_weight": 0.0}, "not both 0"),
    ],
)
def test_invalid_configs_are_user_errors(name, fields, match):
    with pytest.raises(UserError, match=match):
        make_loss(name, **fields)


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_zero_for_perfect_prediction_positive_otherwise(name):
    pred, target, data_range, mask = batch()
    loss = make_loss(name)
    for m in (None, mask):
        assert abs(loss(target.clone(), target, data_range, m).item()) < 1e-12
        assert loss(pred, target, data_range, m).item() > 1e-4


def test_ssim_loss_is_one_minus_skimage_ssim_and_ignores_mask():
    pred, target, data_range, mask = batch()
    loss = make_loss("ssim")
    expected = 1 - skimage_mean_ssim(pred, target, data_range)
    assert loss(pred, target, data_range).item() == pytest.approx(expected, abs=1e-9)
    assert loss(pred, target, data_range, mask).item() == pytest.approx(expected, abs=1e-9)


def test_l1_loss_by_hand():
    pred, target, data_range, _ = batch()
    p, t, r = pred.numpy(), target.numpy(), data_range.numpy()
    expected = np.mean([np.abs(p[b] - t[b]).mean() / r[b] for b in range(len(p))])
    assert make_loss("l1")(pred, target, data_range).item() == pytest.approx(expected, rel=1e-12)


def test_ssim_l1_by_hand_with_mask():
    pred, target, data_range, mask = batch()
    loss = make_loss("ssim_l1", ssim_weight=0.7, l1_weight=0.3)
    p, t, r, m = pred.numpy(), target.numpy(), data_range.numpy(), mask.numpy()
    ssim = np.mean(
        [
            structural_similarity(t[b] * m[b], p[b] * m[b], win_size=7, data_range=r[b])
            for b in range(len(p))
        ]
    )
    l1 = np.mean([(np.abs(p[b] - t[b]) * m[b]).sum() / m[b].sum() / r[b] for b in range(len(p))])
    expected = 0.7 * (1 - ssim) + 0.3 * l1
    assert loss(pred, target, data_range, mask).item() == pytest.approx(expected, abs=1e-9)


def test_ssim_l1_without_mask_is_the_plain_image_loss():
    pred, target, data_range, mask = batch()
    plain = make_loss("ssim_l1", ssim_weight=0.84, l1_weight=0.16)(pred, target, data_range)
    expected = (
        0.84 * (1 - skimage_mean_ssim(pred, target, data_range))
        + 0.16 * make_loss("l1")(pred, target, data_range).item()
    )
    assert plain.item() == pytest.approx(expected, abs=1e-9)
    unmasked = make_loss("ssim_l1", use_mask=False)
    assert unmasked(pred, target, data_range, mask).item() == pytest.approx(plain.item(), abs=1e-15)
    assert make_loss("ssim_l1")(pred, target, data_range, mask).item() != pytest.approx(
        plain.item(), abs=1e-6
    )


def test_mask_excludes_pixels_outside_it():
    pred, target, data_range, mask = batch()
    changed = pred + (1 - mask) * 5e-4  # large changes, only outside the mask
    masked = make_loss("ssim_l1")
    assert (
        masked(changed, target, data_range, mask).item()
        == masked(pred, target, data_range, mask).item()
    )
    unmasked = make_loss("ssim_l1", use_mask=False)
    assert (
        unmasked(changed, target, data_range, mask).item()
        > unmasked(pred, target, data_range, mask).item()
    )


@pytest.mark.parametrize("name", NAMES)
def test_losses_are_scale_free(name):
    pred, target, data_range, mask = batch()
    loss = make_loss(name)
    base = loss(pred, target, data_range, mask).item()
    scaled = loss(pred * 1e4, target * 1e4, data_range * 1e4, mask).item()
    assert scaled == pytest.approx(base, rel=1e-9)


def test_all_zero_mask_gives_a_finite_loss():
    pred, target, data_range, mask = batch()
    mask[0] = 0
    value = make_loss("ssim_l1")(pred, target, data_range, mask)
    assert torch.isfinite(value)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow_in_float32(name):
    pred, target, data_range, mask = batch(dtype=torch.float32)
    pred.requires_grad_(True)
    value = make_loss(name)(pred, target, data_range, mask)
    assert value.dtype == torch.float32 and value.ndim == 0
    value.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_masked_gradient_is_zero_outside_the_mask():
    pred, target, data_range, mask = batch()
    pred.requires_grad_(True)
    make_loss("ssim_l1")(pred, target, data_range, mask).backward()
    assert (pred.grad[mask == 0] == 0).all()
    assert pred.grad[mask == 1].abs().sum() > 0


def test_channel_dim_is_accepted():
    pred, target, data_range, mask = batch()
    loss = make_loss("ssim_l1")
    expected = loss(pred, target, data_range, mask).item()
    got = loss(pred[:, None], target[:, None], data_range, mask[:, None]).item()
    assert got == pytest.approx(expected, abs=1e-15)
