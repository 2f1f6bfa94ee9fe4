"""Segmentation losses: parity with MONAI, ignore index and pixel weights, float32 under
autocast, config validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as MonaiDiceCE
from monai.losses import DiceLoss as MonaiDice
from monai.losses import FocalLoss as MonaiFocal
from monai.losses import TverskyLoss as MonaiTversky
from omegaconf import OmegaConf

import podium
from podium.engine import registry
from podium.errors import UserError
from podium.tasks.segmentation import losses as L

CONF = Path(podium.__file__).parent / "conf" / "loss"
SCHEMAS = {"dice_ce": L.DiceCEConfig, "seg_focal": L.SegFocalConfig, "tversky": L.TverskyConfig}
IGNORE = 255


def _build(name, num_classes=2, **overrides):
    cfg = OmegaConf.merge(OmegaConf.structured(SCHEMAS[name]), OmegaConf.load(CONF / f"{name}.yaml"), overrides)
    return registry.build("loss", name, cfg, num_classes=num_classes)


def _batch(num_classes, b=2, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, num_classes, h, w, generator=g) * 2
    target = torch.randint(0, num_classes, (b, h, w), generator=g)
    return logits, target


def _with_ignore(target, seed=1):
    g = torch.Generator().manual_seed(seed)
    target = target.clone()
    target[torch.rand(target.shape, generator=g) < 0.3] = IGNORE
    return target


# --------------------------------------------------------------------------------------------
# Parity with MONAI (every pixel valid, weight 1)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 0.3)])
def test_dice_ce_equals_monai(num_classes, include_background, batch, weights):
    logits, target = _batch(num_classes)
    ours = _build("dice_ce", num_classes, include_background=include_background, batch_dice=batch,
                  dice_weight=weights[0], ce_weight=weights[1])
    ref = MonaiDiceCE(include_background=include_background, to_onehot_y=True, softmax=True, batch=batch,
                      lambda_dice=weights[0], lambda_ce=weights[1])
    expected = ref(logits, target[:, None])
    assert torch.allclose(ours(logits, target), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours(logits, target, torch.ones(target.shape)), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours(logits, target[:, None]), expected, atol=1e-5, rtol=1e-5)  # (B, 1, H, W)


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("include_background", [False, True])
def test_dice_ce_with_ignore_equals_monai_dice_plus_torch_ce(num_classes, include_background):
    """MONAI's DiceCELoss has no ignore index; its DiceLoss has one, and torch's CE too."""
    logits, target = _batch(num_classes)
    target = _with_ignore(target)
    ours = _build("dice_ce", num_classes, include_background=include_background)
    dice = MonaiDice(include_background=include_background, to_onehot_y=True, softmax=True, batch=True,
                     ignore_index=IGNORE)(logits, target[:, None])
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    assert torch.allclose(ours(logits, target), dice + ce, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5])
@pytest.mark.parametrize("alpha", [None, "per_class"])
def test_focal_equals_monai(num_classes, gamma, alpha):
    logits, target = _batch(num_classes)
    alpha = None if alpha is None else [0.1 + 0.2 * c for c in range(num_classes)]
    ours = _build("seg_focal", num_classes, gamma=gamma, alpha=alpha)
    ref = MonaiFocal(to_onehot_y=True, use_softmax=True, gamma=gamma, alpha=alpha)
    # MONAI's mean divides by B x C x H x W without an ignore index; ours by the pixels.
    assert torch.allclose(ours(logits, target), num_classes * ref(logits, target[:, None]), atol=1e-5, rtol=1e-5)
    ref_ignore = MonaiFocal(to_onehot_y=True, use_softmax=True, gamma=gamma, alpha=alpha, ignore_index=IGNORE)
    ignored = _with_ignore(target)
    assert torch.allclose(ours(logits, ignored), ref_ignore(logits, ignored[:, None]), atol=1e-5, rtol=1e-5)


def test_focal_with_gamma_0_is_cross_entropy():
    logits, target = _batch(3)
    target = _with_ignore(target)
    loss = _build("seg_focal", 3, gamma=0.0)
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target, ignore_index=IGNORE), atol=1e-6)


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.7), (0.5, 0.5), (0.9, 0.2)])
def test_tversky_equals_monai(num_classes, include_background, batch, alpha, beta):
    logits, target = _batch(num_classes)
    ours = _build("tversky", num_classes, alpha=alpha, beta=beta, include_background=include_background, batch=batch)
    ref = MonaiTversky(to_onehot_y=True, softmax=True, alpha=alpha, beta=beta,
                       include_background=include_background, batch=batch)
    assert torch.allclose(ours(logits, target), ref(logits, target[:, None]), atol=1e-5, rtol=1e-5)
    ref_ignore = MonaiTversky(to_onehot_y=True, softmax=True, alpha=alpha, beta=beta,
                              include_background=include_background, batch=batch, ignore_index=IGNORE)
    ignored = _with_ignore(target)
    assert torch.allclose(ours(logits, ignored), ref_ignore(logits, ignored[:, None]), atol=1e-5, rtol=1e-5)


def test_tversky_half_half_is_soft_dice():
    logits, target = _batch(3)
    tversky = _build("tversky", 3, alpha=0.5, beta=0.5)
    dice = _build("dice_ce", 3, ce_weight=0.0)
    assert torch.allclose(tversky(logits, target), dice(logits, target), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Ignore index and weights
# --------------------------------------------------------------------------------------------

LOSS_SETTINGS = [
    ("dice_ce", {}), ("dice_ce", {"batch_dice": False, "include_background": True}),
    ("seg_focal", {}), ("seg_focal", {"alpha": [0.2, 0.5, 0.3]}),
    ("tversky", {}), ("tversky", {"batch": False}),
]


def _loss_and_grad(loss, logits, target, weight):
    logits = logits.clone().requires_grad_(True)
    value = loss(logits, target, weight)
    (grad,) = torch.autograd.grad(value, logits)
    return value.detach(), grad


@pytest.mark.parametrize("name,overrides", LOSS_SETTINGS)
def test_uncounted_pixels_change_neither_loss_nor_gradient(name, overrides):
    loss = _build(name, 3, **overrides)
    logits, target = _batch(3)
    g = torch.Generator().manual_seed(5)
    weight = (torch.rand(target.shape, generator=g) > 0.3).float() * 0.5  # soft weights, some 0
    target = target.clone()
    target[:, :3] = IGNORE  # an ignored band, counted with weight != 0 otherwise
    uncounted = (weight == 0) | (target == IGNORE)
    value, grad = _loss_and_grad(loss, logits, target, weight)

    # anything else under the uncounted pixels: logits and labels
    logits2 = torch.where(uncounted[:, None], torch.randn(logits.shape, generator=g) * 10, logits)
    target2 = torch.where(weight == 0, torch.randint(0, 3, target.shape, generator=g), target)
    value2, grad2 = _loss_and_grad(loss, logits2, target2, weight)
    assert torch.isfinite(value)
    assert torch.allclose(value, value2, atol=1e-7, rtol=1e-6)
    assert torch.allclose(grad, grad2, atol=1e-9, rtol=1e-6)
    assert torch.all(grad.permute(0, 2, 3, 1)[uncounted] == 0)


@pytest.mark.parametrize("name,overrides", LOSS_SETTINGS)
def test_weight_2_counts_a_pixel_twice(name, overrides):
    """Integer weights: weight 2 everywhere on an image = the image next to a copy of itself."""
    loss = _build(name, 3, **overrides)
    logits, target = _batch(3)
    twice = loss(logits, target, torch.full(target.shape, 2.0))
    doubled = loss(torch.cat([logits, logits], dim=-1), torch.cat([target, target], dim=-1))
    assert torch.allclose(twice, doubled, atol=1e-6, rtol=1e-5)


def test_cross_entropy_is_the_weighted_mean():
    loss = _build("dice_ce", 2, dice_weight=0.0)
    logits, target = _batch(2)
    weight = torch.rand(target.shape, generator=torch.Generator().manual_seed(3))
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(loss(logits, target, weight), (weight * per_pixel).sum() / weight.sum(), atol=1e-6)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_batch_without_counted_pixels_is_finite_with_zero_gradient(name):
    loss = _build(name, 2)
    logits, target = _batch(2)
    value, grad = _loss_and_grad(loss, logits, torch.full_like(target, IGNORE), None)
    assert torch.isfinite(value)
    assert torch.all(grad == 0)
    value, grad = _loss_and_grad(loss, logits, target, torch.zeros(target.shape))
    assert torch.isfinite(value) and torch.all(grad == 0)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_float32_under_autocast(name):
    loss = _build(name, 3)
    logits, target = _batch(3)
    low = logits.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(low, target, torch.ones(target.shape, dtype=torch.bfloat16))
    assert value.dtype == torch.float32
    assert torch.allclose(value, loss(low.float(), target), atol=1e-6)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_training_reduces_the_loss(name):
    torch.manual_seed(0)
    loss = _build(name, 2)
    _, target = _batch(2, h=8, w=8)
    logits = torch.zeros(2, 2, 8, 8, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.2)
    start = loss(logits, target).item()
    for _ in range(30):
        opt.zero_grad()
        loss(logits, target).backward()
        opt.step()
    assert loss(logits, target).item() < 0.5 * start


# --------------------------------------------------------------------------------------------
# Config and input validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_shipped_configs_build(name):
    loss = _build(name, 2)
    assert loss.ignore_index == 255
    assert loss.num_classes == 2
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert set(cfg) <= {f for f in SCHEMAS[name].__dataclass_fields__}
    assert name in registry.list_names("loss")


@pytest.mark.parametrize("name,overrides,message", [
    ("tversky", {"alpha": -0.1}, "alpha must be between"),
    ("tversky", {"beta": 1.5}, "beta must be between"),
    ("tversky", {"alpha": 0.0, "beta": 0.0}, "both 0"),
    ("tversky", {"smooth_dr": -1.0}, "smooth_dr"),
    ("seg_focal", {"alpha": [0.5, 0.5, 0.5]}, "one weight per class"),
    ("seg_focal", {"alpha": [-0.5, 0.5]}, ">= 0"),
    ("seg_focal", {"gamma": -1.0}, "gamma"),
    ("dice_ce", {"dice_weight": -1.0}, "dice_weight"),
    ("dice_ce", {"dice_weight": 0.0, "ce_weight": 0.0}, "both 0"),
])
def test_bad_config_is_a_user_error(name, overrides, message):
    with pytest.raises(UserError, match=message):
        _build(name, 2, **overrides)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_one_class_is_a_user_error(name):
    with pytest.raises(UserError, match="at least 2 classes"):
        _build(name, 1)


def test_shape_mismatch_is_a_value_error():
    loss = _build("dice_ce", 2)
    logits, target = _batch(2)
    with pytest.raises(ValueError, match="logits"):
        loss(logits[:, :1], target)
    with pytest.raises(ValueError, match="target"):
        loss(logits, target[:, :5])
    with pytest.raises(ValueError, match="weight"):
        loss(logits, target, torch.ones(2, 3, 3))
