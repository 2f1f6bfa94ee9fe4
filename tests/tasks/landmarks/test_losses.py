"""Landmark losses: hand-computed values, masking, gradients, a tiny optimisation."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from podium.engine import registry
from podium.errors import UserError
from podium.tasks.landmarks import losses as L
from podium.tasks.landmarks.heatmaps import LearnableSigma, soft_argmax

HEATMAP_LOSSES = ["spatial_softmax_nll", "adaptive_wing", "heatmap_mse"]
SCHEMAS = {
    "spatial_softmax_nll": L.SpatialSoftmaxNLLConfig,
    "adaptive_wing": L.AdaptiveWingConfig,
    "heatmap_mse": L.HeatmapMSEConfig,
    "coord_l1": L.CoordL1Config,
}


def build(name, num_landmarks=2, **overrides):
    cfg = OmegaConf.structured(SCHEMAS[name](**overrides))
    return registry.build("loss", name, cfg, num_landmarks=num_landmarks)


def test_registered_with_schemas():
    for name, schema in SCHEMAS.items():
        assert registry.get("loss", name).schema is schema


# --------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------


def test_nll_bilinear_by_hand():
    logits = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    log_z = math.log(sum(math.exp(v) for v in (0, 1, 2, 3)))
    loss = build("spatial_softmax_nll", 1, target="bilinear")
    # point (x=0.25, y=1): 0.75 on pixel (0, 1) [value 2], 0.25 on pixel (1, 1) [value 3]
    got = loss(logits, torch.tensor([[[0.25, 1.0]]]), torch.tensor([[True]]))
    assert got.item() == pytest.approx(-(0.75 * (2 - log_z) + 0.25 * (3 - log_z)), rel=1e-6)


def test_nll_gaussian_by_hand():
    logits = torch.tensor([[[[0.5, -1.0, 2.0]]]])  # H = 1, W = 3
    log_z = math.log(sum(math.exp(v) for v in (0.5, -1.0, 2.0)))
    sigma, x = 1.5, 0.7
    g = [math.exp(-((u - x) ** 2) / (2 * sigma**2)) for u in range(3)]
    t = [v / sum(g) for v in g]
    expected = -sum(ti * (li - log_z) for ti, li in zip(t, (0.5, -1.0, 2.0)))
    got = build("spatial_softmax_nll", 1)(logits, torch.tensor([[[x, 0.0]]]), torch.tensor([[True]]), sigma)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def awing_by_hand(pred, y, omega=14.0, theta=0.5, eps=1.0, alpha=2.1):
    d = abs(y - pred)
    if d < theta:
        return omega * math.log(1 + (d / eps) ** (alpha - y))
    a = omega * (1 / (1 + (theta / eps) ** (alpha - y))) * (alpha - y) * (theta / eps) ** (alpha - y - 1) / eps
    c = theta * a - omega * math.log(1 + (theta / eps) ** (alpha - y))
    return a * d - c


def test_adaptive_wing_by_hand():
    # a 1 x 4 map, point on pixel 0 with sigma 1: targets 1, e^-0.5, e^-2, e^-4.5
    logits = torch.tensor([[[[2.0, -3.0, 0.3, 1.5]]]])
    sigma = 1.0
    targets = [math.exp(-(u**2) / (2 * sigma**2)) for u in range(4)]
    preds = [1 / (1 + math.exp(-v)) for v in (2.0, -3.0, 0.3, 1.5)]
    # 3-wide grey dilation of the target: 1, 1, e^-0.5, e^-2 -> >= 0.2 for pixels 0..2
    weights = [11, 11, 11, 1]
    expected = sum(w * awing_by_hand(p, y) for w, p, y in zip(weights, preds, targets)) / 4
    got = build("adaptive_wing", 1)(logits, torch.tensor([[[0.0, 0.0]]]), torch.tensor([[True]]), sigma)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # both branches were exercised
    assert any(abs(y - p) < 0.5 for p, y in zip(preds, targets))
    assert any(abs(y - p) >= 0.5 for p, y in zip(preds, targets))


def test_heatmap_mse_by_hand():
    out = torch.tensor([[[[0.5, 0.0], [0.0, 1.0]]]])
    target = [1.0, math.exp(-0.5), math.exp(-0.5), math.exp(-1.0)]  # point (0, 0), sigma 1
    expected = sum((o - 2 * t) ** 2 for o, t in zip((0.5, 0.0, 0.0, 1.0), target)) / 4
    got = build("heatmap_mse", 1, peak=2.0)(out, torch.zeros(1, 1, 2), torch.tensor([[True]]), 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_coord_l1_by_hand():
    pred = torch.tensor([[[1.0, 2.0], [5.0, 5.0], [0.0, 0.0]]])
    true = torch.tensor([[[2.0, 4.0], [5.0, 4.0], [float("nan"), 9.0]]])
    visible = torch.tensor([[True, True, False]])
    got = build("coord_l1", 3)(pred, true, visible)
    assert got.item() == pytest.approx((1 + 2 + 0 + 1) / 4)


# --------------------------------------------------------------------------------------------
# Masking, gradients, sigma
# --------------------------------------------------------------------------------------------


def sample(b=2, k=2, h=12, w=10):
    torch.manual_seed(0)
    logits = torch.randn(b, k, h, w, requires_grad=True)
    points = torch.rand(b, k, 2) * torch.tensor([w - 1.0, h - 1.0])
    return logits, points


@pytest.mark.parametrize("name", HEATMAP_LOSSES)
def test_invisible_landmarks_do_not_count(name):
    loss = build(name)
    logits, points = sample()
    visible = torch.tensor([[True, False], [True, True]])
    junk = points.clone()
    junk[0, 1] = float("nan")
    full = loss(logits, junk, visible, 2.0)
    subset = [loss(logits[i : i + 1, j : j + 1].detach().expand(1, 2, -1, -1).contiguous(),
                   points[i : i + 1, j : j + 1].expand(1, 2, 2), torch.tensor([[True, False]]), 2.0)
              for i, j in [(0, 0), (1, 0), (1, 1)]]
    assert full.item() == pytest.approx(sum(s.item() for s in subset) / 3, rel=1e-5)
    full.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0, 1] == 0).all()


@pytest.mark.parametrize("name", HEATMAP_LOSSES + ["coord_l1"])
def test_all_invisible_gives_zero_without_nan(name):
    loss = build(name)
    logits, points = sample()
    points = torch.full_like(points, float("nan"))
    visible = torch.zeros(2, 2, dtype=torch.bool)
    if name == "coord_l1":
        pred = torch.randn(2, 2, 2, requires_grad=True)
        value, leaf = loss(pred, points, visible), pred
    else:
        value, leaf = loss(logits, points, visible, 2.0), logits
    value.backward()
    assert value.item() == 0.0
    assert (leaf.grad == 0).all()


@pytest.mark.parametrize("name", HEATMAP_LOSSES)
def test_gradients_are_finite_including_learnable_sigma(name):
    loss = build(name, sigma_weight=0.1)
    logits, points = sample()
    sigma_module = LearnableSigma(2, init_sigma=2.0)
    sigma = sigma_module()
    value = loss(logits, points, torch.ones(2, 2, dtype=torch.bool), sigma)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.isfinite(sigma_module.log_excess.grad).all()


def test_sigma_penalty_is_added_for_tensors_only():
    logits, points = sample()
    visible = torch.ones(2, 2, dtype=torch.bool)
    plain = build("heatmap_mse")(logits, points, visible, 2.0)
    penalised = build("heatmap_mse", sigma_weight=0.5)
    assert penalised(logits, points, visible, 2.0).item() == pytest.approx(plain.item())
    sigma = torch.tensor([2.0, 2.0])
    assert penalised(logits, points, visible, sigma).item() == pytest.approx(plain.item() + 0.5 * 4.0)


def test_points_outside_the_map_are_clamped():
    loss = build("spatial_softmax_nll", 1)
    logits = torch.zeros(1, 1, 8, 8)
    inside = loss(logits + torch.arange(8.0), torch.tensor([[[7.0, 3.0]]]), torch.tensor([[True]]), 1.0)
    outside = loss(logits + torch.arange(8.0), torch.tensor([[[500.0, 3.0]]]), torch.tensor([[True]]), 1.0)
    assert torch.isfinite(outside) and outside.item() == pytest.approx(inside.item())


def test_config_errors():
    with pytest.raises(UserError, match="target"):
        build("spatial_softmax_nll", target="one_hot")
    with pytest.raises(UserError, match="sigma_weight"):
        build("heatmap_mse", sigma_weight=-1.0)


# --------------------------------------------------------------------------------------------
# The NLL localises on a tiny optimisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["gaussian", "bilinear"])
def test_nll_localises_a_learnable_map(target):
    torch.manual_seed(0)
    logits = torch.zeros(1, 1, 16, 16, requires_grad=True)
    point = torch.tensor([[[11.3, 4.6]]])
    loss = build("spatial_softmax_nll", 1, target=target)
    opt = torch.optim.Adam([logits], lr=0.5)
    first = None
    for _ in range(50):
        opt.zero_grad()
        value = loss(logits, point, torch.tensor([[True]]), 1.0)
        first = value.item() if first is None else first
        value.backward()
        opt.step()
    assert value.item() < first
    assert (soft_argmax(logits.detach()) - point).abs().max() < 0.5
