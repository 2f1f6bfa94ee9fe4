"""Heatmap rendering, learnable sigma, decoding and output stride."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from podium.tasks.landmarks.heatmaps import (
    LearnableSigma,
    decode_argmax,
    decode_local_soft_argmax,
    heatmap_to_points,
    points_to_heatmap,
    render_gaussian,
    soft_argmax,
    spatial_softmax,
)


def test_render_gaussian_values_and_pixel_centres():
    points = torch.tensor([[[3.0, 2.0], [0.0, 0.0]]])
    maps = render_gaussian(points, 5, 6, torch.tensor([1.0, 2.0]))
    assert maps.shape == (1, 2, 5, 6)
    assert maps[0, 0, 2, 3] == 1.0  # row y = 2, column x = 3: the pixel centre is the point
    assert maps[0, 0, 2, 4].item() == pytest.approx(math.exp(-1 / 2))
    assert maps[0, 0, 3, 4].item() == pytest.approx(math.exp(-2 / 2))
    assert maps[0, 1, 0, 1].item() == pytest.approx(math.exp(-1 / 8))
    assert decode_argmax(maps)[0].tolist() == [[3.0, 2.0], [0.0, 0.0]]


def test_render_gaussian_is_differentiable_in_sigma():
    sigma = torch.tensor([1.5, 2.5], requires_grad=True)
    points = torch.tensor([[[4.2, 3.1], [2.0, 5.5]]])
    render_gaussian(points, 8, 8, sigma).sum().backward()
    assert torch.isfinite(sigma.grad).all() and (sigma.grad > 0).all()  # wider -> more mass


def test_learnable_sigma():
    module = LearnableSigma(4, init_sigma=2.0, min_sigma=0.5)
    assert torch.allclose(module(), torch.full((4,), 2.0))
    assert [n for n, _ in module.named_parameters()] == ["log_excess"]
    with torch.no_grad():
        module.log_excess.fill_(-50.0)
    assert (module() >= 0.5).all()
    with pytest.raises(ValueError):
        LearnableSigma(2, init_sigma=0.5, min_sigma=0.5)


def test_local_soft_argmax_is_sub_pixel():
    true = torch.tensor([[[10.3, 7.6], [4.55, 12.2]]])
    maps = render_gaussian(true, 20, 24, 1.0)
    assert (decode_argmax(maps) - true).abs().max() <= 0.5
    heat = decode_local_soft_argmax(maps, window=5, logits=False)
    assert (heat - true).abs().max() < 0.05
    # logits: the log of a Gaussian is what a spatial-softmax network outputs
    from_logits = decode_local_soft_argmax(maps.clamp(min=1e-30).log(), window=5, logits=True)
    assert (from_logits - true).abs().max() < 0.05


def test_local_soft_argmax_window_is_clamped_at_the_border():
    true = torch.tensor([[[0.2, 0.0], [15.0, 9.4]]])
    maps = render_gaussian(true, 10, 16, 0.8)
    out = decode_local_soft_argmax(maps, window=5, logits=False)
    # only the pixels of the window inside the map count: x in 0..2, y in 0..2 for the corner
    corner = maps[0, 0, :3, :3]
    expected_x = (corner.sum(0) * torch.arange(3.0)).sum() / corner.sum()
    expected_y = (corner.sum(1) * torch.arange(3.0)).sum() / corner.sum()
    assert torch.allclose(out[0, 0], torch.stack([expected_x, expected_y]))
    assert ((out[..., 0] >= 0) & (out[..., 0] <= 15) & (out[..., 1] >= 0) & (out[..., 1] <= 9)).all()
    zeros = decode_local_soft_argmax(torch.zeros(1, 1, 4, 4), logits=False)
    assert zeros.tolist() == [[[0.0, 0.0]]]  # falls back to the argmax


def test_spatial_softmax_and_soft_argmax():
    logits = torch.randn(2, 3, 6, 5, requires_grad=True)
    probs = spatial_softmax(logits)
    assert torch.allclose(probs.sum(dim=(2, 3)), torch.ones(2, 3))
    blob = render_gaussian(torch.tensor([[[4.25, 3.3]]]), 8, 9, 0.8)
    assert torch.allclose(soft_argmax(blob, logits=False), torch.tensor([[[4.25, 3.3]]]), atol=1e-3)
    assert torch.allclose(soft_argmax(blob.log()), torch.tensor([[[4.25, 3.3]]]), atol=1e-3)
    assert torch.allclose(soft_argmax(blob * 1000), decode_argmax(blob), atol=1e-3)  # sharp logits
    soft_argmax(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_stride_conversion_matches_average_pooling():
    p = torch.tensor([[[37.3, 21.8]]])
    assert torch.allclose(heatmap_to_points(points_to_heatmap(p, 4), 4), p)
    assert points_to_heatmap(torch.tensor([[[1.5, 0.0]]]), 4).tolist() == [[[0.0, -0.375]]]
    full = render_gaussian(p, 64, 64, 4.0)
    pooled = F.avg_pool2d(full, 4)
    centroid = soft_argmax(pooled, logits=False)
    assert torch.allclose(centroid, points_to_heatmap(p, 4), atol=1e-3)
