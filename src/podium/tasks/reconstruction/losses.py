"""MRI reconstruction losses, registered under kind "loss".

Every loss is called as `loss(pred, target, data_range, mask=None) -> scalar`, with magnitude
images pred, target (B, H, W), data_range (B,) (each sample's target-volume maximum, as in the
metric) and an optional foreground mask (B, H, W) of float 0/1 weights.

- ``ssim``: 1 - SSIM with the fastMRI window (7 x 7 uniform, K1 0.01, K2 0.03, sample covariance),
  the training loss of E2E-VarNet (Sriram et al. 2020) and fastMRI's `SSIMLoss`. The mask is
  accepted for a uniform call signature and ignored: use ``ssim_l1`` for a masked loss.
- ``ssim_l1``: ssim_weight * (1 - SSIM(pred * mask, target * mask))
             + l1_weight * sum(mask * |pred - target|) / (sum(mask) * data_range),
  i.e. the SNU leaderboard's masked SSIM plus an L1 term averaged over the masked pixels only.
  The L1 term is divided by data_range so that, like SSIM, it does not depend on the intensity
  scale of the data, and the weights mean the same on any dataset. Default weights 0.84 / 0.16
  follow Zhao et al. 2017, "Loss Functions for Image Restoration with Neural Networks" (IEEE TCI),
  whose best mix was 0.84 (MS-)SSIM + 0.16 L1: SSIM keeps structure and contrast, L1 keeps the
  overall intensity, which SSIM alone constrains weakly. Without a mask, or with
  use_mask false, both terms are over the whole image.
- ``l1``: mean |pred - target| / data_range over the whole image (the mask is ignored).

    import torch
    from omegaconf import OmegaConf
    from podium.tasks.reconstruction.losses import SSIML1LossConfig, ssim_l1

    loss = ssim_l1(OmegaConf.structured(SSIML1LossConfig(ssim_weight=0.84, l1_weight=0.16)))
    target = torch.rand(2, 32, 32)
    pred = target + 0.1 * torch.randn(2, 32, 32)
    loss(pred, target, target.flatten(1).amax(1), mask=(target > 0.2).float())
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from podium.engine.registry import register
from podium.errors import UserError
from podium.tasks.reconstruction.metrics import ssim_torch

# --------------------------------------------------------------------------------------------
# Config schemas
# --------------------------------------------------------------------------------------------


@dataclass
class SSIMLossConfig:
    name: str = "ssim"
    win_size: int = 7  # side of the uniform window (odd); 7 is the fastMRI / SNU metric
    k1: float = 0.01
    k2: float = 0.03


@dataclass
class SSIML1LossConfig:
    name: str = "ssim_l1"
    ssim_weight: float = 0.84  # Zhao et al. 2017's mix
    l1_weight: float = 0.16  # applies to L1 / data_range, so scale-free
    use_mask: bool = True  # score inside the foreground mask when the batch carries one
    win_size: int = 7
    k1: float = 0.01
    k2: float = 0.03


@dataclass
class L1LossConfig:
    name: str = "l1"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_ssim_params(loss: str, win_size: int, k1: float, k2: float) -> None:
    if int(win_size) != win_size or win_size < 3 or win_size % 2 == 0:
        raise UserError(f"loss {loss!r}: win_size must be an odd integer >= 3, got {win_size}.")
    for key, value in (("k1", k1), ("k2", k2)):
        if not (float(value) > 0 and math.isfinite(float(value))):
            raise UserError(f"loss {loss!r}: {key} must be a positive number, got {value}.")


def _per_sample_range(data_range, reference: torch.Tensor) -> torch.Tensor:
    """data_range as a (B, 1, 1) tensor of the images' dtype, for broadcasting over (B, H, W)."""
    data_range = torch.as_tensor(data_range, dtype=reference.dtype, device=reference.device)
    return data_range.reshape(-1, 1, 1)


def _squeeze_channel(image: torch.Tensor) -> torch.Tensor:
    """Accept (B, 1, H, W) as well as (B, H, W)."""
    return image.squeeze(1) if image.ndim == 4 and image.shape[1] == 1 else image


def masked_l1(
    pred: torch.Tensor, target: torch.Tensor, data_range, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the batch of sum(mask * |pred - target|) / (sum(mask) * data_range).

    Without a mask it is the plain per-image mean. An all-zero mask gives 0 for that image
    (the denominator is clamped), never NaN.
    """
    pred, target = _squeeze_channel(pred), _squeeze_channel(target)
    error = (pred - target).abs() / _per_sample_range(data_range, pred)
    if mask is None:
        return error.flatten(1).mean(dim=1).mean()
    mask = _squeeze_channel(mask).to(error.dtype)
    total = (error * mask).flatten(1).sum(dim=1)
    count = mask.expand_as(error).flatten(1).sum(dim=1)
    return (total / count.clamp(min=1.0)).mean()


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


class SSIMLoss(nn.Module):
    """1 - SSIM over the batch (mean of the per-image SSIMs); the mask is ignored."""

    def __init__(self, win_size: int = 7, k1: float = 0.01, k2: float = 0.03):
        super().__init__()
        _check_ssim_params("ssim", win_size, k1, k2)
        self.win_size, self.k1, self.k2 = int(win_size), float(k1), float(k2)

    def forward(self, pred, target, data_range, mask=None) -> torch.Tensor:
        ssim = ssim_torch(pred, target, data_range, self.win_size, self.k1, self.k2)
        return 1 - ssim


class SSIML1Loss(nn.Module):
    """ssim_weight * (1 - masked SSIM) + l1_weight * masked L1 / data_range (see module doc)."""

    def __init__(
        self,
        ssim_weight: float = 0.84,
        l1_weight: float = 0.16,
        use_mask: bool = True,
        win_size: int = 7,
        k1: float = 0.01,
        k2: float = 0.03,
    ):
        super().__init__()
        _check_ssim_params("ssim_l1", win_size, k1, k2)
        ssim_weight, l1_weight = float(ssim_weight), float(l1_weight)
        if min(ssim_weight, l1_weight) < 0 or ssim_weight + l1_weight <= 0:
            raise UserError(
                "loss 'ssim_l1': ssim_weight and l1_weight must be >= 0 and not both 0, got "
                f"ssim_weight={ssim_weight}, l1_weight={l1_weight}."
            )
        self.ssim_weight, self.l1_weight = ssim_weight, l1_weight
        self.use_mask = bool(use_mask)
        self.win_size, self.k1, self.k2 = int(win_size), float(k1), float(k2)

    def forward(self, pred, target, data_range, mask=None) -> torch.Tensor:
        mask = mask if self.use_mask else None
        loss = pred.new_zeros(())
        if self.ssim_weight:
            ssim = ssim_torch(pred, target, data_range, self.win_size, self.k1, self.k2, mask=mask)
            loss = loss + self.ssim_weight * (1 - ssim)
        if self.l1_weight:
            loss = loss + self.l1_weight * masked_l1(pred, target, data_range, mask)
        return loss


class L1Loss(nn.Module):
    """Mean |pred - target| / data_range; the mask is ignored."""

    def forward(self, pred, target, data_range, mask=None) -> torch.Tensor:
        return masked_l1(pred, target, data_range)


# --------------------------------------------------------------------------------------------
# Registered factories
# --------------------------------------------------------------------------------------------


@register("loss", "ssim", schema=SSIMLossConfig)
def ssim(cfg, **context) -> nn.Module:
    """1 - SSIM, fastMRI window (the E2E-VarNet training loss)."""
    return SSIMLoss(win_size=cfg.win_size, k1=cfg.k1, k2=cfg.k2)


@register("loss", "ssim_l1", schema=SSIML1LossConfig)
def ssim_l1(cfg, **context) -> nn.Module:
    """Foreground-masked SSIM + L1 mix (Zhao et al. 2017 weights by default)."""
    return SSIML1Loss(
        ssim_weight=cfg.ssim_weight,
        l1_weight=cfg.l1_weight,
        use_mask=cfg.use_mask,
        win_size=cfg.win_size,
        k1=cfg.k1,
        k2=cfg.k2,
    )


@register("loss", "l1", schema=L1LossConfig)
def l1(cfg, **context) -> nn.Module:
    """Plain L1 divided by the data range."""
    return L1Loss()
