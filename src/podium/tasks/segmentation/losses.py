"""Segmentation losses with an ignore index and per-pixel weights, registered under kind "loss".

Every loss is called as ``loss(logits (B, C, H, W), target (B, H, W) int64, weight (B, H, W) | None)``
and returns a float32 scalar. A pixel counts with weight ``weight * (target != ignore_index)``:
pixels outside the field of view (weight 0) or labelled `ignore_index` change neither the value
nor the gradient, and that holds for the Dice and Tversky sums too, not only for the
cross-entropy. Weights must be >= 0 (not checked: that would synchronise with the GPU); soft
weights (e.g. a distance map) scale a pixel's share of every sum.

- ``dice_ce`` (default): soft Dice + cross-entropy, 1:1, the nnU-Net default (Isensee et al.,
  "nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation",
  Nature Methods 2021): Dice per class with the sums taken over the whole batch ("batch dice"),
  background left out, smooth terms 1e-5.
- ``seg_focal``: softmax focal loss per pixel (Lin et al., "Focal Loss for Dense Object
  Detection", ICCV 2017), gamma 2, optional alpha per class.
- ``tversky``: Tversky loss (Salehi et al., "Tversky loss function for image segmentation using
  3D fully convolutional deep networks", MLMI 2017), alpha 0.3 on false positives and beta 0.7 on
  false negatives: recall is favoured, which thin vessels and small lesions need.

Written by hand rather than wrapping MONAI (the design's reference for these losses) because
MONAI's DiceCELoss has no ignore index for its cross-entropy and none of MONAI's losses takes a
per-pixel weight map; with every pixel valid and weight 1 each loss here equals MONAI's
(`DiceCELoss` / `FocalLoss` / `TverskyLoss` with ``to_onehot_y=True`` and softmax) to float
precision: tests/tasks/segmentation/test_losses.py pins it. One documented difference: MONAI's
FocalLoss "mean" divides by B x C x H x W (the class axis too) without an ignore index but by the
number of valid pixels with one; `seg_focal` is always the mean over (weighted) pixels, i.e.
C x MONAI's value without an ignore index and MONAI's value with one.

Losses compute in float32 even under autocast: half-precision sums over millions of pixels lose
the small classes.

    loss = registry.build("loss", "dice_ce", cfg.loss, num_classes=2)
    value = loss(logits, batch["mask"], batch["fov"].float())
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from podium.engine.registry import register
from podium.errors import UserError

# Floor of the base of (1 - p_t)^gamma: a non-integer gamma < 1 has an infinite derivative at 0.
_POW_FLOOR = 1e-12


# --------------------------------------------------------------------------------------------
# Config schemas
# --------------------------------------------------------------------------------------------


@dataclass
class DiceCEConfig:
    name: str = "dice_ce"
    dice_weight: float = 1.0  # nnU-Net: 1:1
    ce_weight: float = 1.0
    include_background: bool = False  # Dice over the foreground classes only (nnU-Net's do_bg=False)
    batch_dice: bool = True  # Dice sums over the whole batch per class; false: per image, then mean
    smooth_nr: float = 1e-5  # added to the numerator (MONAI's default)
    smooth_dr: float = 1e-5  # added to the denominator; keeps an empty class finite
    ignore_index: int = 255  # label of pixels that never count (must match data.ignore_index)


@dataclass
class SegFocalConfig:
    name: str = "seg_focal"
    gamma: float = 2.0  # focusing parameter; 0 gives (alpha-weighted) cross-entropy
    alpha: list[float] | None = None  # one weight per class; None: no alpha weighting
    ignore_index: int = 255


@dataclass
class TverskyConfig:
    name: str = "tversky"
    alpha: float = 0.3  # weight of false positives
    beta: float = 0.7  # weight of false negatives (> alpha favours recall)
    include_background: bool = False
    batch: bool = True  # sums over the whole batch per class, as batch_dice
    smooth_nr: float = 1e-5
    smooth_dr: float = 1e-5
    ignore_index: int = 255


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_range(loss: str, key: str, value: float, low: float, high: float = math.inf) -> float:
    value = float(value)
    if not (low <= value <= high) or math.isnan(value):
        bound = f"between {low} and {high}" if high != math.inf else f">= {low}"
        raise UserError(f"loss {loss!r}: {key} must be {bound}, got {value}.")
    return value


def _check_classes(loss: str, num_classes: int) -> int:
    if int(num_classes) < 2:
        raise UserError(f"loss {loss!r} is a softmax loss and needs at least 2 classes (background and "
                        f"foreground), got num_classes={num_classes}.")
    return int(num_classes)


class _PixelLoss(nn.Module):
    """Shared input checks and the (log-probabilities, one-hot, weight) preparation."""

    def __init__(self, num_classes: int, ignore_index: int):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = int(ignore_index)

    def _prepare(self, logits: Tensor, target: Tensor, weight: Tensor | None):
        """-> log_p (B, C, H, W) float32, safe target (B, H, W) in [0, C), w (B, H, W) float32.

        w = weight * (target != ignore_index); ignored targets become 0 so that they can index
        (their weight is 0, so the class they get does not matter).
        """
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits (B, {self.num_classes}, H, W), got {tuple(logits.shape)}")
        if target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        shape = (logits.shape[0], *logits.shape[2:])
        if tuple(target.shape) != shape:
            raise ValueError(f"expected target {shape}, got {tuple(target.shape)}")
        valid = target != self.ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target)).long()
        w = valid.float()
        if weight is not None:
            if weight.ndim == 4 and weight.shape[1] == 1:
                weight = weight[:, 0]
            if tuple(weight.shape) != shape:
                raise ValueError(f"expected weight {shape}, got {tuple(weight.shape)}")
            w = w * weight.float()
        return F.log_softmax(logits.float(), dim=1), safe, w

    def _one_hot(self, safe: Tensor) -> Tensor:
        # A comparison rather than F.one_hot: no host synchronisation on the GPU.
        classes = torch.arange(self.num_classes, device=safe.device).view(1, -1, 1, 1)
        return (safe[:, None] == classes).float()


def _weighted_mean(per_pixel: Tensor, w: Tensor) -> Tensor:
    """sum(w * loss) / sum(w); 0 (zero gradient) for a batch without a counted pixel, no sync."""
    return (per_pixel * w).sum() / w.sum().clamp(min=torch.finfo(torch.float32).tiny)


def _overlap_sums(probs: Tensor, one_hot: Tensor, w: Tensor, batch: bool):
    """Weighted tp, sum of p, sum of y per class: (C,) with batch sums, (B, C) otherwise."""
    dims = (0, 2, 3) if batch else (2, 3)
    wp = probs * w[:, None]
    tp = (wp * one_hot).sum(dims)
    return tp, wp.sum(dims), (one_hot * w[:, None]).sum(dims)


def cross_entropy_map(log_p: Tensor, safe: Tensor) -> Tensor:
    """(B, H, W) per-pixel -log p_target."""
    return -log_p.gather(1, safe[:, None])[:, 0]


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


class DiceCELoss(_PixelLoss):
    """dice_weight * (1 - mean_c Dice_c) + ce_weight * CE, over weighted, non-ignored pixels.

    Dice_c = (2 * sum w p_c y_c + smooth_nr) / (sum w p_c + sum w y_c + smooth_dr), with p the
    softmax and y the one-hot target; the sums run over the pixels of the whole batch
    (`batch_dice`, nnU-Net) or of each image (then the mean over images and classes, MONAI's
    default). CE = sum w (-log p_y) / sum w. Background is left out of the Dice unless
    `include_background` (it is always in the CE).
    """

    def __init__(self, num_classes: int, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 include_background: bool = False, batch_dice: bool = True, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, ignore_index: int = 255):
        super().__init__(_check_classes("dice_ce", num_classes), ignore_index)
        self.dice_weight = _check_range("dice_ce", "dice_weight", dice_weight, 0.0)
        self.ce_weight = _check_range("dice_ce", "ce_weight", ce_weight, 0.0)
        if self.dice_weight == 0 and self.ce_weight == 0:
            raise UserError("loss 'dice_ce': dice_weight and ce_weight are both 0; the loss would be constant.")
        self.include_background = bool(include_background)
        self.batch_dice = bool(batch_dice)
        self.smooth_nr = _check_range("dice_ce", "smooth_nr", smooth_nr, 0.0)
        self.smooth_dr = _check_range("dice_ce", "smooth_dr", smooth_dr, 0.0)

    def dice_loss(self, log_p: Tensor, safe: Tensor, w: Tensor) -> Tensor:
        tp, pred_sum, true_sum = _overlap_sums(log_p.exp(), self._one_hot(safe), w, self.batch_dice)
        denominator = (pred_sum + true_sum + self.smooth_dr).clamp(min=torch.finfo(torch.float32).tiny)
        dice = (2 * tp + self.smooth_nr) / denominator
        if not self.include_background:
            dice = dice[..., 1:]
        return 1 - dice.mean()

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            log_p, safe, w = self._prepare(logits, target, weight)
            loss = logits.new_zeros((), dtype=torch.float32)
            if self.dice_weight:
                loss = loss + self.dice_weight * self.dice_loss(log_p, safe, w)
            if self.ce_weight:
                loss = loss + self.ce_weight * _weighted_mean(cross_entropy_map(log_p, safe), w)
            return loss


class SegFocalLoss(_PixelLoss):
    """Per pixel FL = -alpha[y] * (1 - p_y)^gamma * log p_y; the weighted mean over pixels.

    alpha does not enter the denominator (sum of w). gamma = 0 without alpha is exactly the
    weighted cross-entropy.
    """

    def __init__(self, num_classes: int, gamma: float = 2.0, alpha: Sequence[float] | None = None,
                 ignore_index: int = 255):
        super().__init__(_check_classes("seg_focal", num_classes), ignore_index)
        self.gamma = _check_range("seg_focal", "gamma", gamma, 0.0)
        if alpha is not None:
            alpha = [float(a) for a in alpha]
            if len(alpha) != num_classes:
                raise UserError(f"loss 'seg_focal': alpha needs one weight per class ({num_classes} classes, "
                                f"background first), got {len(alpha)} values.")
            if any(not a >= 0 or math.isinf(a) for a in alpha):
                raise UserError(f"loss 'seg_focal': alpha weights must be finite and >= 0, got {alpha}.")
            alpha = torch.tensor(alpha, dtype=torch.float32)
        self.register_buffer("alpha", alpha, persistent=False)

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            log_p, safe, w = self._prepare(logits, target, weight)
            log_pt = log_p.gather(1, safe[:, None])[:, 0]
            # 1 - p_t as -expm1(log p_t): accurate when p_t is close to 1.
            per_pixel = -(-torch.expm1(log_pt)).clamp(min=_POW_FLOOR).pow(self.gamma) * log_pt
            if self.alpha is not None:
                # .to: a no-op once the module sits on the logits' device; the task need not move it.
                per_pixel = per_pixel * self.alpha.to(per_pixel.device)[safe]
            return _weighted_mean(per_pixel, w)


class TverskyLoss(_PixelLoss):
    """1 - mean_c (tp_c + smooth_nr) / (tp_c + alpha fp_c + beta fn_c + smooth_dr).

    tp = sum w p y, fp = sum w p (1 - y), fn = sum w (1 - p) y per class, summed over the batch
    (`batch`) or per image. alpha = beta = 0.5 is the soft Dice loss.
    """

    def __init__(self, num_classes: int, alpha: float = 0.3, beta: float = 0.7,
                 include_background: bool = False, batch: bool = True, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, ignore_index: int = 255):
        super().__init__(_check_classes("tversky", num_classes), ignore_index)
        self.alpha = _check_range("tversky", "alpha", alpha, 0.0, 1.0)
        self.beta = _check_range("tversky", "beta", beta, 0.0, 1.0)
        if self.alpha + self.beta == 0:
            raise UserError("loss 'tversky': alpha and beta are both 0; the loss would be constant.")
        self.include_background = bool(include_background)
        self.batch = bool(batch)
        self.smooth_nr = _check_range("tversky", "smooth_nr", smooth_nr, 0.0)
        self.smooth_dr = _check_range("tversky", "smooth_dr", smooth_dr, 0.0)

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            log_p, safe, w = self._prepare(logits, target, weight)
            tp, pred_sum, true_sum = _overlap_sums(log_p.exp(), self._one_hot(safe), w, self.batch)
            fp, fn = pred_sum - tp, true_sum - tp
            denominator = tp + self.alpha * fp + self.beta * fn + self.smooth_dr
            index = (tp + self.smooth_nr) / denominator.clamp(min=torch.finfo(torch.float32).tiny)
            if not self.include_background:
                index = index[..., 1:]
            return 1 - index.mean()


# --------------------------------------------------------------------------------------------
# Registered factories
# --------------------------------------------------------------------------------------------


@register("loss", "dice_ce", schema=DiceCEConfig)
def dice_ce(cfg, *, num_classes: int) -> nn.Module:
    """Soft Dice + cross-entropy 1:1 (nnU-Net), with ignore index and pixel weights."""
    return DiceCELoss(num_classes, dice_weight=cfg.dice_weight, ce_weight=cfg.ce_weight,
                      include_background=cfg.include_background, batch_dice=cfg.batch_dice,
                      smooth_nr=cfg.smooth_nr, smooth_dr=cfg.smooth_dr, ignore_index=cfg.ignore_index)


@register("loss", "seg_focal", schema=SegFocalConfig)
def seg_focal(cfg, *, num_classes: int) -> nn.Module:
    """Per-pixel softmax focal loss (Lin et al. 2017), with ignore index and pixel weights."""
    alpha = None if cfg.alpha is None else list(cfg.alpha)
    return SegFocalLoss(num_classes, gamma=cfg.gamma, alpha=alpha, ignore_index=cfg.ignore_index)


@register("loss", "tversky", schema=TverskyConfig)
def tversky(cfg, *, num_classes: int) -> nn.Module:
    """Tversky loss (Salehi et al. 2017), alpha 0.3 / beta 0.7 favouring recall."""
    return TverskyLoss(num_classes, alpha=cfg.alpha, beta=cfg.beta,
                       include_background=cfg.include_background, batch=cfg.batch,
                       smooth_nr=cfg.smooth_nr, smooth_dr=cfg.smooth_dr, ignore_index=cfg.ignore_index)
