"""Exponential moving averages of a model: the trainer's weight EMA (`trainer.ema`) and the
teacher networks of self-training (the DACS / DAFormer / MIC teacher, MoCo's key encoder).

An EMA teacher follows the student after every optimizer step,
    theta_teacher <- a theta_teacher + (1 - a) theta_student,
with the warm start of Mean Teacher / DACS (Tarvainen & Valpola 2017; Tranheden et al. 2021,
"DACS: Domain Adaptation via Cross-domain Mixed Sampling", WACV): a = min(1 - 1 / (t + 1), alpha)
at optimizer step t, so the teacher is the student itself at t = 0 and averages over the last
~1 / (1 - alpha) steps later.

    teacher = EMATeacher(model, alpha=0.999)      # an auxiliary module: checkpointed and resumed
    teacher.update(model, step)                  # in Task.on_optimizer_step
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def warm_alpha(step: int, alpha: float) -> float:
    """min(1 - 1 / (step + 1), alpha): 0 at step 0 (copy the student), alpha in the long run."""
    return min(1.0 - 1.0 / (int(step) + 1), float(alpha))


@torch.no_grad()
def lerp_towards(target: nn.Module, source: nn.Module, alpha: float, buffers: bool = False) -> None:
    """target <- alpha target + (1 - alpha) source, parameter by parameter; with `buffers`, the
    floating buffers too (BatchNorm's running statistics) and the others copied."""
    t_params, s_params = list(target.parameters()), list(source.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"EMA of two different models: {len(t_params)} vs {len(s_params)} parameters")
    if t_params:
        torch._foreach_lerp_([p.data for p in t_params], [p.detach().to(p.dtype) for p in s_params], 1 - alpha)
    if buffers:
        for tb, sb in zip(target.buffers(), source.buffers()):
            if torch.is_floating_point(tb):
                tb.lerp_(sb.detach().to(tb.dtype), 1 - alpha)
            else:
                tb.copy_(sb)


class EMATeacher(nn.Module):
    """A frozen copy of `model` that follows it by EMA with the warm start above. `buffers=True`
    averages BatchNorm's running statistics too (the teacher runs in eval mode, so it needs
    them); MoCo's key encoder averages parameters only, as the paper does."""

    def __init__(self, model: nn.Module, alpha: float = 0.999, buffers: bool = True):
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"EMA alpha must be in [0, 1), got {alpha}")
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.alpha, self.buffers = float(alpha), buffers

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int, alpha: float | None = None) -> float:
        """One EMA step towards `student` after optimizer step `step`; returns the alpha used."""
        a = warm_alpha(step, self.alpha) if alpha is None else float(alpha)
        lerp_towards(self.model, student, a, self.buffers)
        return a


def ema_update(decay: float, warmup: bool = True):
    """An AveragedModel `multi_avg_fn` (the trainer's `trainer.ema`): exponential moving average
    with decay `decay`, or with min(decay, (1 + t) / (10 + t)) at the t-th update when `warmup`
    (AveragedModel copies the weights at t = 0 and counts updates in `n_averaged`)."""

    @torch.no_grad()
    def update(averaged: list, current: list, num_averaged) -> None:
        t = float(num_averaged)
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:
            for a, c in zip(averaged, current):
                a.copy_(a * d + c * (1 - d))

    return update
