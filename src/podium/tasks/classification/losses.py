"""Classification losses, registered under kind "loss".

Every loss takes `(logits (N, C) float, target (N,) long)` and returns the scalar mean loss over
the samples whose target is not `ignore_index`. A batch in which every target is ignored gives
0 (with a gradient of 0), never NaN, so one such batch cannot trip the divergence check.

- ``cross_entropy``: PyTorch's cross-entropy, optional label smoothing (Szegedy et al. 2016,
  "Rethinking the Inception Architecture for Computer Vision").
- ``weighted_ce``: cross-entropy with per-class weights computed from the training-label
  frequencies, either inverse frequency or the "effective number of samples" of Cui et al. 2019,
  "Class-Balanced Loss Based on Effective Number of Samples" (CVPR).
- ``focal``: multi-class softmax focal loss, Lin et al. 2017, "Focal Loss for Dense Object
  Detection" (ICCV).
- ``asymmetric``: single-label asymmetric loss, Ridnik et al. 2021, "Asymmetric Loss For
  Multi-Label Classification" (ICCV), the ``ASLSingleLabel`` variant of the reference code.

Factories have the signature ``factory(cfg, *, num_classes, class_counts=None)``; `cfg` has the
fields of the registered schema (an OmegaConf DictConfig or the dataclass itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from podium.engine.registry import register
from podium.errors import UserError

# Smallest base fed to `pow` in the focusing weights: `x ** g` has an infinite derivative at
# x = 0 for 0 < g < 1, and inf * 0 in the chain rule would make NaN gradients. Clamping moves
# the value by at most 1e-12 ** g, far below float32 resolution of a loss.
_POW_FLOOR = 1e-12


# --------------------------------------------------------------------------------------------
# Config schemas (the config keys each loss accepts)
# --------------------------------------------------------------------------------------------


@dataclass
class CrossEntropyConfig:
    name: str = "cross_entropy"
    label_smoothing: float = 0.0  # eps in [0, 1]: target = (1 - eps) * one_hot + eps / C
    ignore_index: int = -100  # targets equal to this do not count


@dataclass
class WeightedCEConfig:
    name: str = "weighted_ce"
    weighting: str = "inverse"  # inverse: N / (C * count_c) | effective: Cui et al. 2019
    beta: float = 0.999  # effective: (1 - beta^count) / (1 - beta) samples per class
    label_smoothing: float = 0.0
    ignore_index: int = -100


@dataclass
class FocalConfig:
    name: str = "focal"
    gamma: float = 2.0  # focusing parameter; 0 gives (alpha-weighted) cross-entropy
    alpha: Optional[list[float]] = None  # one weight per class; None: no alpha weighting
    ignore_index: int = -100


@dataclass
class AsymmetricConfig:
    name: str = "asymmetric"
    gamma_pos: float = 0.0  # focusing on the target class (reference code: 0; timm: 1)
    gamma_neg: float = 4.0  # focusing on the other classes
    eps: float = 0.1  # label smoothing: target = (1 - eps) * one_hot + eps / C
    ignore_index: int = -100


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_range(loss: str, key: str, value: float, low: float, high: float = math.inf) -> float:
    value = float(value)
    if not (low <= value <= high) or math.isnan(value):
        bound = f"between {low} and {high}" if high != math.inf else f">= {low}"
        raise UserError(f"loss {loss!r}: {key} must be {bound}, got {value}.")
    return value


def _valid_targets(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of counted samples, targets with ignored ones replaced by 0 so they can index)."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target))


def _mean_over(per_sample: torch.Tensor, valid: torch.Tensor, denom: torch.Tensor | None = None):
    """Sum of the counted samples divided by their count (or by `denom`).

    Done by hand rather than with reduction="mean" so that an all-ignored batch gives 0 instead
    of 0/0 = NaN, without a `.any()` that would synchronise with the GPU.
    """
    total = (per_sample * valid).sum()
    if denom is None:
        denom = valid.sum()
    return total / denom.to(total.dtype).clamp(min=torch.finfo(total.dtype).tiny)


def _check_logits(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"expected logits of shape (N, {num_classes}), got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"expected target of shape ({logits.shape[0]},), got {tuple(target.shape)}"
        )


# --------------------------------------------------------------------------------------------
# Cross-entropy, plain and class-weighted
# --------------------------------------------------------------------------------------------


class CrossEntropyLoss(nn.Module):
    """`F.cross_entropy` with optional class weights and label smoothing.

    The mean follows PyTorch's convention: with weights, the sum is divided by the total weight
    of the counted targets (sum_i w[y_i]), without weights by their number.
    """

    def __init__(
        self,
        num_classes: int,
        label_smoothing: float = 0.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.label_smoothing = _check_range(
            "cross_entropy", "label_smoothing", label_smoothing, 0.0, 1.0
        )
        self.ignore_index = int(ignore_index)
        # A buffer so that `.to(device)` moves it with the module; not persistent because it is
        # recomputed from the config and the labels, so checkpoints need not carry it.
        self.register_buffer("weight", None if weight is None else weight.float(), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, target, self.num_classes)
        valid, safe_target = _valid_targets(target, self.ignore_index)
        weight = None if self.weight is None else self.weight.to(logits.dtype)
        per_sample = F.cross_entropy(
            logits,
            target,
            weight=weight,
            ignore_index=self.ignore_index,
            reduction="none",
            label_smoothing=self.label_smoothing,
        )
        denom = None if weight is None else (weight[safe_target] * valid).sum()
        return _mean_over(per_sample, valid, denom)


def class_weights(
    class_counts: Sequence[int], weighting: str = "inverse", beta: float = 0.999
) -> torch.Tensor:
    """Per-class loss weights from the training-label counts.

    - "inverse": N / (C * count_c), scikit-learn's "balanced" heuristic; the average weight
      over the training samples is 1.
    - "effective": 1 / E_c with E_c = (1 - beta^count_c) / (1 - beta), the effective number of
      samples of Cui et al. 2019, normalised to mean 1 over the classes (their sum equals C).

    A class with no training sample would get an infinite weight; it gets the largest weight of
    the classes that do occur instead ("as rare as the rarest seen class"), which keeps the loss
    finite, including the label-smoothing term that touches every class.
    """
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.ndim != 1 or len(counts) == 0:
        raise UserError("weighted_ce: class_counts must be a non-empty list of counts.")
    if (counts < 0).any():
        raise UserError(f"weighted_ce: class counts must be >= 0, got {list(class_counts)}.")
    present = counts > 0
    if not present.any():
        raise UserError("weighted_ce: every class count is 0; the training labels are empty.")
    num_classes = len(counts)

    if weighting == "inverse":
        weights = counts.sum() / (num_classes * counts.clamp(min=1))
    elif weighting == "effective":
        _check_range("weighted_ce", "beta", beta, 0.0, 1.0 - 1e-12)
        effective_num = (1.0 - beta ** counts.clamp(min=1)) / (1.0 - beta)
        weights = 1.0 / effective_num
    else:
        raise UserError(
            f"weighted_ce: unknown weighting {weighting!r}. Valid choices: inverse, effective."
        )

    weights = torch.where(present, weights, weights[present].max())
    if weighting == "effective":
        weights = weights * num_classes / weights.sum()
    return weights.float()


# --------------------------------------------------------------------------------------------
# Focal loss
# --------------------------------------------------------------------------------------------


class FocalLoss(nn.Module):
    """Multi-class softmax focal loss: FL_i = -alpha[y_i] * (1 - p_t)^gamma * log p_t.

    p_t is the softmax probability of the true class. The result is the plain mean over the
    counted samples (alpha does not enter the denominator). gamma = 0 without alpha is exactly
    cross-entropy.

    Written by hand because torchvision's `sigmoid_focal_loss` is the binary, one-vs-all
    (sigmoid per class) form of the paper, not the softmax form used for single-label tasks.
    """

    def __init__(
        self,
        num_classes: int,
        gamma: float = 2.0,
        alpha: Sequence[float] | None = None,
        ignore_index: int = -100,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.gamma = _check_range("focal", "gamma", gamma, 0.0)
        self.ignore_index = int(ignore_index)
        if alpha is not None:
            alpha = [float(a) for a in alpha]
            if len(alpha) != num_classes:
                raise UserError(
                    f"loss 'focal': alpha needs one weight per class ({num_classes} classes), "
                    f"got {len(alpha)} values."
                )
            if any(a < 0 or math.isnan(a) for a in alpha):
                raise UserError(f"loss 'focal': alpha weights must be >= 0, got {alpha}.")
            alpha = torch.tensor(alpha, dtype=torch.float32)
        self.register_buffer("alpha", alpha, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, target, self.num_classes)
        valid, safe_target = _valid_targets(target, self.ignore_index)
        # log_softmax rather than log(softmax): stable for large logits.
        log_pt = F.log_softmax(logits.float(), dim=1).gather(1, safe_target[:, None]).squeeze(1)
        # 1 - p_t as -expm1(log p_t): accurate when p_t is close to 1.
        one_minus_pt = (-torch.expm1(log_pt)).clamp(min=_POW_FLOOR)
        per_sample = -one_minus_pt.pow(self.gamma) * log_pt
        if self.alpha is not None:
            per_sample = per_sample * self.alpha[safe_target]
        return _mean_over(per_sample, valid)


# --------------------------------------------------------------------------------------------
# Asymmetric loss (single-label)
# --------------------------------------------------------------------------------------------


class AsymmetricSingleLabelLoss(nn.Module):
    """Single-label asymmetric loss (Ridnik et al. 2021), the reference `ASLSingleLabel`.

    With log_p = log_softmax(logits) and one-hot targets y:
      weight_c = (1 - p_c)^gamma_pos for the target class, p_c^gamma_neg for the others;
      targets are smoothed as y_s = (1 - eps) * y + eps / C (PyTorch's label_smoothing
      convention: eps / C goes to every class, the target class included);
      loss_i = -sum_c y_s[c] * weight_c * log_p[c], and the result is the mean over samples.
    With gamma_pos = gamma_neg = 0 this is cross-entropy with label_smoothing = eps.

    Defaults follow the authors' reference code (gamma_pos = 0, gamma_neg = 4, eps = 0.1). Note
    that timm's copy (`timm.loss.AsymmetricLossSingleLabel`) defaults to gamma_pos = 1.
    As in the reference, the focusing weights are not detached: gradients flow through them.
    """

    def __init__(
        self,
        num_classes: int,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        eps: float = 0.1,
        ignore_index: int = -100,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.gamma_pos = _check_range("asymmetric", "gamma_pos", gamma_pos, 0.0)
        self.gamma_neg = _check_range("asymmetric", "gamma_neg", gamma_neg, 0.0)
        self.eps = _check_range("asymmetric", "eps", eps, 0.0, 1.0)
        self.ignore_index = int(ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, target, self.num_classes)
        valid, safe_target = _valid_targets(target, self.ignore_index)
        log_p = F.log_softmax(logits.float(), dim=1)
        one_hot = F.one_hot(safe_target, self.num_classes).to(log_p.dtype)
        is_target = one_hot.bool()

        # The reference writes the base as 1 - xs_pos - xs_neg; it is 1 - p for the target
        # class and p for the others.
        base = torch.where(is_target, -torch.expm1(log_p), log_p.exp()).clamp(min=_POW_FLOOR)
        exponent = torch.where(
            is_target,
            torch.full_like(log_p, self.gamma_pos),
            torch.full_like(log_p, self.gamma_neg),
        )
        weight = base.pow(exponent)

        smoothed = one_hot * (1.0 - self.eps) + self.eps / self.num_classes
        per_sample = -(smoothed * weight * log_p).sum(dim=1)
        return _mean_over(per_sample, valid)


# --------------------------------------------------------------------------------------------
# Registered factories
# --------------------------------------------------------------------------------------------


@register("loss", "cross_entropy", schema=CrossEntropyConfig)
def cross_entropy(cfg, *, num_classes: int, class_counts: list[int] | None = None) -> nn.Module:
    """Cross-entropy with optional label smoothing."""
    return CrossEntropyLoss(
        num_classes, label_smoothing=cfg.label_smoothing, ignore_index=cfg.ignore_index
    )


@register("loss", "weighted_ce", schema=WeightedCEConfig)
def weighted_ce(cfg, *, num_classes: int, class_counts: list[int] | None = None) -> nn.Module:
    """Cross-entropy weighted by inverse class frequency or effective number of samples."""
    if class_counts is None:
        raise UserError(
            "loss 'weighted_ce' needs the training labels to compute class weights, but no "
            "class counts were given; use a dataset that exposes its labels, or "
            "loss.name=cross_entropy."
        )
    if len(class_counts) != num_classes:
        raise UserError(
            f"loss 'weighted_ce': got {len(class_counts)} class counts for {num_classes} classes."
        )
    weight = class_weights(class_counts, cfg.weighting, cfg.beta)
    return CrossEntropyLoss(
        num_classes,
        label_smoothing=cfg.label_smoothing,
        weight=weight,
        ignore_index=cfg.ignore_index,
    )


@register("loss", "focal", schema=FocalConfig)
def focal(cfg, *, num_classes: int, class_counts: list[int] | None = None) -> nn.Module:
    """Multi-class softmax focal loss (Lin et al. 2017)."""
    alpha = None if cfg.alpha is None else list(cfg.alpha)
    return FocalLoss(num_classes, gamma=cfg.gamma, alpha=alpha, ignore_index=cfg.ignore_index)


@register("loss", "asymmetric", schema=AsymmetricConfig)
def asymmetric(cfg, *, num_classes: int, class_counts: list[int] | None = None) -> nn.Module:
    """Single-label asymmetric loss (Ridnik et al. 2021)."""
    return AsymmetricSingleLabelLoss(
        num_classes,
        gamma_pos=cfg.gamma_pos,
        gamma_neg=cfg.gamma_neg,
        eps=cfg.eps,
        ignore_index=cfg.ignore_index,
    )
