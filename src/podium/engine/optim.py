"""Optimizers (AdamW, SGD, NAdam) and schedulers (cosine, poly, exponential, step), each with linear
warmup, as one LambdaLR stepped once per optimizer step — so a resumed run continues the exact
learning-rate curve, and schedules work the same whether training runs by epochs or by steps.
"""

from __future__ import annotations

import math

import torch

from podium.errors import UserError

OPTIMIZERS = ("adamw", "sgd", "nadam")
SCHEDULERS = ("none", "cosine", "poly", "exponential", "step")


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    name = cfg.name.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    if name == "nadam":
        return torch.optim.NAdam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    raise UserError(f"optim.name={cfg.name!r} is not known. Valid choices: {', '.join(OPTIMIZERS)}.")


def lr_factor(step: int, cfg, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate after `step` optimizer steps."""
    warmup = int(cfg.warmup_steps + cfg.warmup_epochs * steps_per_epoch)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    name = cfg.name.lower()
    if name == "none":
        return 1.0
    if name == "cosine":
        span = max(1, total_steps - warmup)
        t = min(1.0, (step - warmup) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if name == "poly":  # (1 - t)^power over the steps after warmup (DeepLab, DAFormer: power 1.0)
        span = max(1, total_steps - warmup)
        t = min(1.0, (step - warmup) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - t) ** cfg.power
    intervals = (step - warmup) // steps_per_epoch if cfg.interval == "epoch" else step - warmup
    if name == "exponential":
        return cfg.gamma ** intervals
    if name == "step":
        return cfg.gamma ** (intervals // cfg.step_size)
    raise UserError(f"sched.name={cfg.name!r} is not known. Valid choices: {', '.join(SCHEDULERS)}.")


def build_scheduler(optimizer, cfg, total_steps: int, steps_per_epoch: int):
    if cfg.interval not in ("epoch", "step"):
        raise UserError(f"sched.interval={cfg.interval!r}: expected 'epoch' or 'step'.")
    lr_factor(0, cfg, total_steps, max(1, steps_per_epoch))  # validates the name before training starts
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, total_steps, max(1, steps_per_epoch))
    )
