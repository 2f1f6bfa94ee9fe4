"""Landmark losses, registered under kind "loss".

Heatmap losses take ``forward(logits (B, K, H, W), points (B, K, 2), visible (B, K) bool,
sigma)`` and return a scalar: `points` are (x, y) in HEATMAP pixels (convert input pixels with
`heatmaps.points_to_heatmap(points, model.output_stride)`), `sigma` is a float or a (K,) tensor
in heatmap pixels (a learnable one from `heatmaps.LearnableSigma`). Only visible landmarks count;
a batch with none gives 0 with a zero gradient, never NaN. Coordinates of invisible landmarks
may hold anything (NaN included). Visible points outside the map are clamped onto its border
pixels for the target.

- ``spatial_softmax_nll`` (default): per landmark, a softmax over all H x W pixels and the
  cross-entropy with a normalised Gaussian (or bilinear one-hot) target, as in integral / soft
  heatmap regression (Nibali et al. 2018, "Numerical Coordinate Regression with Convolutional
  Neural Networks"). Measured on a CPU budget in this project with sigma = 2 px heatmaps: MSE and
  adaptive wing had not started to localise after ten minutes, while the spatial-softmax NLL was
  within a few pixels after twenty iterations, hence the default.
- ``adaptive_wing``: Wang, Bo & Fuxin 2019, "Adaptive Wing Loss for Robust Face Alignment via
  Heatmap Regression" (ICCV), on sigmoid(logits), with the paper's weighted loss map.
- ``heatmap_mse``: MSE to the rendered Gaussian (Tompson et al. 2014; Payer et al. 2019).
- ``coord_l1``: L1 between predicted and true points, for the direct-regression baseline (a
  different signature: see `CoordL1Loss`).

A learnable sigma needs a regulariser (Payer et al. 2019): every heatmap loss adds
``sigma_weight * mean(sigma^2)`` when `sigma` is a tensor and sigma_weight > 0.

Factories have the signature ``factory(cfg, *, num_landmarks)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.landmarks.heatmaps import render_gaussian

# Smallest base fed to `pow` in the adaptive wing loss: |d|^(alpha - y) has an infinite
# derivative w.r.t. the exponent at |d| = 0 (log 0), which a learnable sigma would reach.
_POW_FLOOR = 1e-12


# --------------------------------------------------------------------------------------------
# Config schemas
# --------------------------------------------------------------------------------------------


@dataclass
class SpatialSoftmaxNLLConfig:
    name: str = "spatial_softmax_nll"
    target: str = "gaussian"  # gaussian: normalised Gaussian of width sigma | bilinear: 4 pixels
    sigma_weight: float = 0.0  # adds sigma_weight * mean(sigma^2) for a learnable sigma


@dataclass
class AdaptiveWingConfig:
    name: str = "adaptive_wing"
    omega: float = 14.0
    theta: float = 0.5
    epsilon: float = 1.0
    alpha: float = 2.1
    weight: float = 10.0  # W of the weighted loss map: W * M + 1 (M: dilated target >= 0.2)
    sigma_weight: float = 0.0


@dataclass
class HeatmapMSEConfig:
    name: str = "heatmap_mse"
    peak: float = 1.0  # the target is peak * Gaussian
    sigma_weight: float = 0.0


@dataclass
class CoordL1Config:
    name: str = "coord_l1"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check(logits: Tensor, points: Tensor, visible: Tensor, num_landmarks: int) -> None:
    if logits.ndim != 4 or logits.shape[1] != num_landmarks:
        raise ValueError(f"expected logits (B, {num_landmarks}, H, W), got {tuple(logits.shape)}")
    if points.shape != (*logits.shape[:2], 2):
        raise ValueError(f"expected points {(*logits.shape[:2], 2)}, got {tuple(points.shape)}")
    if visible.shape != logits.shape[:2]:
        raise ValueError(f"expected visible {tuple(logits.shape[:2])}, got {tuple(visible.shape)}")


def _safe_points(points: Tensor, visible: Tensor, height: int, width: int) -> Tensor:
    """Invisible points -> 0 (they may be NaN), visible ones clamped onto the map's pixels."""
    points = torch.where(visible[..., None], points.float(), torch.zeros_like(points, dtype=torch.float32))
    return torch.stack([points[..., 0].clamp(0, width - 1), points[..., 1].clamp(0, height - 1)], -1)


def _mean_over_visible(per_landmark: Tensor, visible: Tensor) -> Tensor:
    """Mean over visible landmarks; 0 (zero gradient) when none is visible, no GPU sync."""
    per_landmark = torch.where(visible, per_landmark, torch.zeros_like(per_landmark))
    return per_landmark.sum() / visible.sum().to(per_landmark.dtype).clamp(min=1)


def _sigma_penalty(loss: Tensor, sigma: float | Tensor, weight: float) -> Tensor:
    if weight > 0 and isinstance(sigma, Tensor):
        loss = loss + weight * sigma.float().square().mean()
    return loss


def _check_nonneg(loss: str, key: str, value: float) -> float:
    value = float(value)
    if not value >= 0 or math.isinf(value):
        raise UserError(f"loss {loss!r}: {key} must be a finite number >= 0, got {value}.")
    return value


def bilinear_target(points: Tensor, height: int, width: int) -> Tensor:
    """(B, K, H, W) bilinear one-hot: the 4 pixels around each point, weights summing to 1.

    Points must lie within [0, W - 1] x [0, H - 1]; the tent max(0, 1 - |u - x|) along each axis
    is exactly the bilinear interpolation weight of pixel u.
    """
    u = torch.arange(width, dtype=points.dtype, device=points.device)
    v = torch.arange(height, dtype=points.dtype, device=points.device)
    tx = (1 - (u - points[..., 0, None]).abs()).clamp(min=0)  # (B, K, W)
    ty = (1 - (v - points[..., 1, None]).abs()).clamp(min=0)  # (B, K, H)
    return ty[..., :, None] * tx[..., None, :]


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


class SpatialSoftmaxNLL(nn.Module):
    """Cross-entropy between the spatial softmax of the logits and a target distribution.

    log p = log_softmax over the H x W pixels of each landmark; target t = the Gaussian of width
    sigma normalised to sum 1 ("gaussian") or the bilinear one-hot of the sub-pixel point
    ("bilinear", sigma unused; the limit sigma -> 0 of a bilinearly spread Gaussian). Loss per
    landmark: sum over pixels of -t * log p; the result is the mean over visible landmarks.
    The minimum is the target's entropy, not 0. Measured on a CPU budget here, with sigma = 2 px
    heatmaps MSE and adaptive wing had not started to localise after ten minutes while this NLL
    was within a few pixels after twenty iterations, so it is the default loss.
    """

    def __init__(self, num_landmarks: int, target: str = "gaussian", sigma_weight: float = 0.0):
        super().__init__()
        if target not in ("gaussian", "bilinear"):
            raise UserError(f"loss 'spatial_softmax_nll': target={target!r}; expected gaussian or bilinear.")
        self.num_landmarks = num_landmarks
        self.target = target
        self.sigma_weight = _check_nonneg("spatial_softmax_nll", "sigma_weight", sigma_weight)

    def forward(self, logits: Tensor, points: Tensor, visible: Tensor, sigma: float | Tensor = 2.0) -> Tensor:
        _check(logits, points, visible, self.num_landmarks)
        b, k, h, w = logits.shape
        points = _safe_points(points, visible, h, w)
        log_p = F.log_softmax(logits.float().reshape(b, k, h * w), dim=-1)
        if self.target == "bilinear":
            target = bilinear_target(points, h, w)
        else:
            target = render_gaussian(points, h, w, sigma)
            target = target / target.sum(dim=(2, 3), keepdim=True).clamp(min=torch.finfo(target.dtype).tiny)
        per_landmark = -(target.reshape(b, k, h * w) * log_p).sum(dim=-1)
        return _sigma_penalty(_mean_over_visible(per_landmark, visible), sigma, self.sigma_weight)


class AdaptiveWingLoss(nn.Module):
    """Adaptive Wing loss (Wang et al. 2019) between sigmoid(logits) and the Gaussian heatmap.

    With y the target (rendered Gaussian, peak 1), y_hat = sigmoid(logit), d = |y - y_hat|:
      AWing = omega * ln(1 + (d / epsilon)^(alpha - y))   if d < theta
            = A * d - C                                    otherwise
      A = omega / (1 + (theta/epsilon)^(alpha - y)) * (alpha - y)
          * (theta/epsilon)^(alpha - y - 1) / epsilon
      C = theta * A - omega * ln(1 + (theta/epsilon)^(alpha - y))
    Weighted loss map (the paper's Eq. 9): each pixel is multiplied by W * M + 1, where M = 1
    where the 3 x 3 grey dilation of the target is >= 0.2, i.e. 11 near the landmark and 1 in
    the background with W = 10. Per landmark the weighted map is averaged over pixels; the
    result is the mean over visible landmarks. Defaults: omega 14, theta 0.5, epsilon 1,
    alpha 2.1, W 10.
    """

    def __init__(self, num_landmarks: int, omega: float = 14.0, theta: float = 0.5, epsilon: float = 1.0,
                 alpha: float = 2.1, weight: float = 10.0, sigma_weight: float = 0.0):
        super().__init__()
        self.num_landmarks = num_landmarks
        for key, value in {"omega": omega, "theta": theta, "epsilon": epsilon, "alpha": alpha}.items():
            if not float(value) > 0:
                raise UserError(f"loss 'adaptive_wing': {key} must be > 0, got {value}.")
        self.omega, self.theta, self.epsilon, self.alpha = map(float, (omega, theta, epsilon, alpha))
        self.weight = _check_nonneg("adaptive_wing", "weight", weight)
        self.sigma_weight = _check_nonneg("adaptive_wing", "sigma_weight", sigma_weight)

    def loss_map(self, pred: Tensor, target: Tensor) -> Tensor:
        """Unweighted per-pixel AWing of predictions in [0, 1] against the target heatmap."""
        delta = (target - pred).abs()
        exponent = self.alpha - target
        ratio = self.theta / self.epsilon
        a = (self.omega / (1 + ratio**exponent) * exponent * ratio ** (exponent - 1) / self.epsilon)
        c = self.theta * a - self.omega * torch.log1p(ratio**exponent)
        small = self.omega * torch.log1p((delta / self.epsilon).clamp(min=_POW_FLOOR) ** exponent)
        return torch.where(delta < self.theta, small, a * delta - c)

    def forward(self, logits: Tensor, points: Tensor, visible: Tensor, sigma: float | Tensor = 2.0) -> Tensor:
        _check(logits, points, visible, self.num_landmarks)
        h, w = logits.shape[-2:]
        target = render_gaussian(_safe_points(points, visible, h, w), h, w, sigma)
        mask = F.max_pool2d(target.detach(), kernel_size=3, stride=1, padding=1) >= 0.2
        weighted = self.loss_map(torch.sigmoid(logits.float()), target) * (self.weight * mask + 1)
        per_landmark = weighted.mean(dim=(2, 3))
        return _sigma_penalty(_mean_over_visible(per_landmark, visible), sigma, self.sigma_weight)


class HeatmapMSE(nn.Module):
    """Mean squared error between the raw output and peak * Gaussian (peak value 1 by default).

    Per landmark the mean over pixels; the result is the mean over visible landmarks.
    """

    # The output is the heat itself, not logits: decoders weight by heat, not by softmax.
    decodes_logits = False

    def __init__(self, num_landmarks: int, peak: float = 1.0, sigma_weight: float = 0.0):
        super().__init__()
        self.num_landmarks = num_landmarks
        self.peak = float(peak)
        if not self.peak > 0:
            raise UserError(f"loss 'heatmap_mse': peak must be > 0, got {peak}.")
        self.sigma_weight = _check_nonneg("heatmap_mse", "sigma_weight", sigma_weight)

    def forward(self, logits: Tensor, points: Tensor, visible: Tensor, sigma: float | Tensor = 2.0) -> Tensor:
        _check(logits, points, visible, self.num_landmarks)
        h, w = logits.shape[-2:]
        target = self.peak * render_gaussian(_safe_points(points, visible, h, w), h, w, sigma)
        per_landmark = (logits.float() - target).square().mean(dim=(2, 3))
        return _sigma_penalty(_mean_over_visible(per_landmark, visible), sigma, self.sigma_weight)


class CoordL1Loss(nn.Module):
    """Mean absolute coordinate error for direct regression (the `coord_regressor` baseline).

    NOTE the signature differs from the heatmap losses: ``forward(pred_points (B, K, 2),
    points (B, K, 2), visible (B, K))`` with both point sets in the same pixels (input pixels
    for `coord_regressor`); no sigma. Result: the mean of |pred - true| over the x and y of the
    visible landmarks (F.l1_loss over them); 0 with zero gradient when none is visible.
    """

    def __init__(self, num_landmarks: int):
        super().__init__()
        self.num_landmarks = num_landmarks

    def forward(self, pred_points: Tensor, points: Tensor, visible: Tensor) -> Tensor:
        if pred_points.shape != points.shape or points.shape[1:] != (self.num_landmarks, 2):
            raise ValueError(f"expected pred and true points (B, {self.num_landmarks}, 2), got "
                             f"{tuple(pred_points.shape)} and {tuple(points.shape)}")
        points = torch.where(visible[..., None], points.float(), pred_points.detach().float())
        per_landmark = (pred_points.float() - points).abs().mean(dim=-1)
        return _mean_over_visible(per_landmark, visible)


# --------------------------------------------------------------------------------------------
# Registered factories
# --------------------------------------------------------------------------------------------


@register("loss", "spatial_softmax_nll", schema=SpatialSoftmaxNLLConfig)
def spatial_softmax_nll(cfg, *, num_landmarks: int) -> nn.Module:
    """Spatial-softmax cross-entropy to a Gaussian / bilinear target (default landmark loss)."""
    return SpatialSoftmaxNLL(num_landmarks, target=cfg.target, sigma_weight=cfg.sigma_weight)


@register("loss", "adaptive_wing", schema=AdaptiveWingConfig)
def adaptive_wing(cfg, *, num_landmarks: int) -> nn.Module:
    """Adaptive Wing loss on sigmoid heatmaps (Wang et al. 2019)."""
    return AdaptiveWingLoss(num_landmarks, omega=cfg.omega, theta=cfg.theta, epsilon=cfg.epsilon,
                            alpha=cfg.alpha, weight=cfg.weight, sigma_weight=cfg.sigma_weight)


@register("loss", "heatmap_mse", schema=HeatmapMSEConfig)
def heatmap_mse(cfg, *, num_landmarks: int) -> nn.Module:
    """MSE to a rendered Gaussian heatmap."""
    return HeatmapMSE(num_landmarks, peak=cfg.peak, sigma_weight=cfg.sigma_weight)


@register("loss", "coord_l1", schema=CoordL1Config)
def coord_l1(cfg, *, num_landmarks: int) -> nn.Module:
    """L1 on coordinates, for the direct-regression baseline (pred_points, points, visible)."""
    return CoordL1Loss(num_landmarks)
