"""Heatmaps for landmark detection: rendering, learnable sigma, decoding, output stride.

Coordinates follow the family convention (see `podium.tasks.landmarks`): points are (x, y) with
pixel centres at integer coordinates, in the pixels of the map they refer to.

- `render_gaussian`: unnormalised Gaussians exp(-d^2 / 2 sigma^2) (peak 1 at the point),
  differentiable with respect to sigma, so sigma can be learned as in Payer et al. 2019,
  "Integrating spatial configuration into heatmap regression based CNNs for landmark
  localization" (Medical Image Analysis), and the landmarker package's learnable heatmaps.
- Decoding: `decode_argmax` (integer pixel), `decode_local_soft_argmax` (sub-pixel mean inside
  a small window around the argmax), `soft_argmax` (differentiable global expectation, the
  "integral regression" of Sun et al. 2018, "Integral Human Pose Regression", ECCV).
- Output stride: a heatmap `stride` times smaller than the input has its pixel i centred on input
  pixel stride * i + (stride - 1) / 2, i.e. x_h = (x + 0.5) / stride - 0.5 (what average pooling
  by `stride` does); `points_to_heatmap` / `heatmap_to_points` convert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------
# Rendering and learnable sigma
# --------------------------------------------------------------------------------------------


def _sigma_tensor(sigma: float | Tensor, like: Tensor) -> Tensor:
    """sigma as a tensor broadcastable to (B, K): a float, (K,) or (B, K)."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim > 2:
        raise ValueError(f"sigma must be a float, (K,) or (B, K), got shape {tuple(sigma.shape)}")
    return sigma


def render_gaussian(points: Tensor, height: int, width: int, sigma: float | Tensor) -> Tensor:
    """Gaussians exp(-((u - x)^2 + (v - y)^2) / (2 sigma^2)) on a (height, width) pixel grid.

    points: (B, K, 2) float (x, y) in the pixels of this grid; sigma: float, (K,) or (B, K), in
    the same pixels. Returns (B, K, height, width), peak value 1 at the point (the value at the
    nearest pixel is below 1 for a sub-pixel point). Differentiable w.r.t. points and sigma.
    """
    if points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(f"expected points of shape (B, K, 2), got {tuple(points.shape)}")
    points = points.float() if not points.is_floating_point() else points
    sigma = _sigma_tensor(sigma, points)
    two_var = (2.0 * sigma * sigma)[..., None, None]  # broadcasts against (B, K, 1, 1)
    u = torch.arange(width, dtype=points.dtype, device=points.device)
    v = torch.arange(height, dtype=points.dtype, device=points.device)
    dx2 = (u - points[..., 0, None]).square()[..., None, :]  # (B, K, 1, W)
    dy2 = (v - points[..., 1, None]).square()[..., :, None]  # (B, K, H, 1)
    return torch.exp(-(dx2 + dy2) / two_var)


class LearnableSigma(nn.Module):
    """One trainable Gaussian width per landmark: sigma = min_sigma + exp(log_excess).

    The parametrisation keeps sigma > min_sigma with a smooth gradient everywhere (a clamp would
    stop the gradient at the bound). `forward()` returns sigma, shape (K,), in heatmap pixels.

    Learnable sigma needs a regulariser: with a heatmap-regression loss (MSE, adaptive wing) the
    network can lower its loss by widening the targets, which are easier to predict but locate
    less precisely, so the losses add ``sigma_weight * mean(sigma^2)`` (Payer et al. 2019 penalise
    the sum of the squared sigmas). With the spatial-softmax NLL the cross-entropy alone already
    pulls sigma down (E_target[-log p] grows with the target's spread), towards `min_sigma`.
    """

    def __init__(self, num_landmarks: int, init_sigma: float = 2.0, min_sigma: float = 0.5):
        super().__init__()
        if not init_sigma > min_sigma >= 0:
            raise ValueError(f"need init_sigma > min_sigma >= 0, got {init_sigma}, {min_sigma}")
        self.min_sigma = float(min_sigma)
        self.log_excess = nn.Parameter(
            torch.full((num_landmarks,), math.log(init_sigma - min_sigma), dtype=torch.float32)
        )

    def forward(self) -> Tensor:
        return self.min_sigma + self.log_excess.exp()

    def extra_repr(self) -> str:
        return f"num_landmarks={self.log_excess.numel()}, min_sigma={self.min_sigma}"


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _check_heatmaps(heatmaps: Tensor) -> None:
    if heatmaps.ndim != 4:
        raise ValueError(f"expected heatmaps of shape (B, K, H, W), got {tuple(heatmaps.shape)}")


def spatial_softmax(heatmaps: Tensor) -> Tensor:
    """Softmax over the H x W pixels of each (B, K) map; same shape, each map sums to 1."""
    _check_heatmaps(heatmaps)
    b, k, h, w = heatmaps.shape
    return F.softmax(heatmaps.reshape(b, k, h * w).float(), dim=-1).reshape(b, k, h, w)


def _expectation(weights: Tensor) -> Tensor:
    """(B, K, H, W) weights summing to 1 -> expected (x, y), (B, K, 2)."""
    _, _, h, w = weights.shape
    u = torch.arange(w, dtype=weights.dtype, device=weights.device)
    v = torch.arange(h, dtype=weights.dtype, device=weights.device)
    x = (weights.sum(dim=2) * u).sum(dim=-1)
    y = (weights.sum(dim=3) * v).sum(dim=-1)
    return torch.stack([x, y], dim=-1)


def soft_argmax(heatmaps: Tensor, logits: bool = True) -> Tensor:
    """Differentiable global expectation of the pixel coordinates, (B, K, 2) (x, y).

    logits=True: weights = spatial_softmax(heatmaps); False: the heatmaps clamped at 0 and
    normalised (for heatmaps that are already non-negative scores).
    """
    _check_heatmaps(heatmaps)
    if logits:
        weights = spatial_softmax(heatmaps)
    else:
        heat = heatmaps.float().clamp(min=0)
        weights = heat / heat.sum(dim=(2, 3), keepdim=True).clamp(min=torch.finfo(heat.dtype).tiny)
    return _expectation(weights)


def decode_argmax(heatmaps: Tensor) -> Tensor:
    """Coordinates of the maximum of each map, (B, K, 2) float (x, y) at pixel centres."""
    _check_heatmaps(heatmaps)
    b, k, h, w = heatmaps.shape
    index = heatmaps.reshape(b, k, h * w).argmax(dim=-1)
    return torch.stack([index % w, torch.div(index, w, rounding_mode="floor")], dim=-1).float()


def decode_local_soft_argmax(heatmaps: Tensor, window: int = 5, logits: bool = True) -> Tensor:
    """Sub-pixel decoding: the weighted mean of the coordinates in a window around the argmax.

    The window (window x window pixels, odd) is centred on the argmax pixel; pixels of it that
    fall outside the map get no weight (the window is clamped at the borders). Weights are the
    softmax of the heatmap values inside the window (logits=True: for logits, e.g. those trained
    with the spatial-softmax NLL) or the values themselves clamped at 0 (logits=False: for
    non-negative heatmaps such as sigmoid/MSE outputs; a window of zeros falls back to the
    argmax). Returns (B, K, 2) float (x, y). Not differentiable through the argmax.

    The window truncates the peak, which pulls the estimate towards the argmax pixel: for a
    Gaussian peak of width sigma the bias is < 0.03 px with sigma <= 1 and window 5, but about
    0.18 px with sigma = 2; use window >= 6 * sigma + 1 for wider peaks.
    """
    _check_heatmaps(heatmaps)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    b, k, h, w = heatmaps.shape
    centre = decode_argmax(heatmaps).long()  # (B, K, 2)
    r = window // 2
    offsets = torch.arange(-r, r + 1, device=heatmaps.device)
    xs = centre[..., 0, None] + offsets  # (B, K, window)
    ys = centre[..., 1, None] + offsets
    inside = ((xs >= 0) & (xs < w))[..., None, :] & ((ys >= 0) & (ys < h))[..., :, None]
    flat = (ys.clamp(0, h - 1)[..., :, None] * w + xs.clamp(0, w - 1)[..., None, :])  # (B,K,win,win)
    values = heatmaps.reshape(b, k, h * w).float().gather(-1, flat.reshape(b, k, -1))
    values = values.reshape(b, k, window, window)
    if logits:
        weights = F.softmax(values.masked_fill(~inside, float("-inf")).reshape(b, k, -1), dim=-1)
    else:
        heat = (values.clamp(min=0) * inside).reshape(b, k, -1)
        total = heat.sum(dim=-1, keepdim=True)
        centre_only = torch.zeros_like(heat)
        centre_only[..., (window * window) // 2] = 1.0  # the argmax pixel
        weights = torch.where(total > 0, heat / total.clamp(min=torch.finfo(heat.dtype).tiny),
                              centre_only)
    weights = weights.reshape(b, k, window, window)
    x = (weights.sum(dim=-2) * xs.float()).sum(dim=-1)
    y = (weights.sum(dim=-1) * ys.float()).sum(dim=-1)
    return torch.stack([x, y], dim=-1)


# --------------------------------------------------------------------------------------------
# Output stride
# --------------------------------------------------------------------------------------------


def points_to_heatmap(points: Tensor, stride: float) -> Tensor:
    """Input-pixel (x, y) -> heatmap-pixel (x, y) for a heatmap `stride` times smaller."""
    return (points + 0.5) / stride - 0.5


def heatmap_to_points(points: Tensor, stride: float) -> Tensor:
    """Heatmap-pixel (x, y) -> input-pixel (x, y); the inverse of `points_to_heatmap`."""
    return (points + 0.5) * stride - 0.5
