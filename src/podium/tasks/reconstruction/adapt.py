"""Zero-shot self-supervised adaptation of a trained reconstruction network to one scan.

Yaman, Hosseini and Akçakaya 2022, "Zero-Shot Self-Supervised Learning for MRI Reconstruction"
(ICLR), with transfer learning: a network trained elsewhere (here, on simulated k-space) is
fine-tuned on the scan it must reconstruct, using nothing but that scan's own measurements.

The acquired k-space points Omega are split once into a validation set Gamma and the rest; at
every step the rest is split again, at random, into a data-consistency set Theta (the network's
input) and a loss set Lambda (the measurements it must predict, SSDU: Yaman et al. 2020, MRM).
The loss is ||y - y_hat||_2 / ||y||_2 + ||y - y_hat||_1 / ||y||_1 on Lambda. Every `val_every`
steps the network, fed Omega minus Gamma, is scored on the held-out Gamma; the weights with the
lowest validation loss are kept (the pretrained ones if adaptation never beats them) and
training stops after `patience` checks without improvement. The final image uses all of Omega.
The calibration columns always stay in the input, so the coil sensitivities are estimated from
the same data as without adaptation.

    podium predict runs/<run> scan.mat --out recon.h5 --override task.adapt.steps=60

Works with any model that has `predicted_kspace(masked_kspace, mask, num_low_frequencies)`
accepting a per-point mask (VarNet, FI-VarNet). The caller's model is never modified: the
adaptation trains a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from podium.errors import UserError


@dataclass
class AdaptConfig:
    steps: int = 0  # maximum optimisation steps per scan; 0 disables adaptation
    lr: float = 1.0e-4  # Adam
    val_fraction: float = 0.2  # share of acquired points (outside the calibration block) held out
    loss_fraction: float = 0.4  # share of the remaining points the loss is computed on, per step
    val_every: int = 5
    patience: int = 4  # validation checks without improvement before stopping
    seed: int = 0
    # "columns": the splits take whole phase-encoding columns, so the network keeps seeing the
    # column undersampling it was trained on; "points": single k-space points (SSDU's choice)
    split: str = "columns"


def check_adapt_config(cfg: AdaptConfig) -> None:
    if int(cfg.steps) < 0:
        raise UserError(f"task.adapt.steps={cfg.steps}: expected an integer >= 0.")
    for key in ("val_fraction", "loss_fraction"):
        value = float(getattr(cfg, key))
        if not 0 < value < 1:
            raise UserError(f"task.adapt.{key}={value}: expected a share strictly between 0 and 1.")
    if float(cfg.lr) <= 0:
        raise UserError(f"task.adapt.lr={cfg.lr}: expected a learning rate > 0.")
    if cfg.split not in ("columns", "points"):
        raise UserError(f"task.adapt.split={cfg.split!r}: expected columns or points.")
    if int(cfg.val_every) < 1 or int(cfg.patience) < 1:
        raise UserError("task.adapt.val_every and task.adapt.patience must be integers >= 1.")


def split_points(acquired: Tensor, protected: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw `fraction` of the acquired, unprotected points (uniformly, without replacement).

    acquired, protected: (H, W) bool ((1, W) for whole columns). Returns (chosen, rest) with chosen | rest == acquired,
    chosen & rest empty, and every protected acquired point in rest."""
    candidates = torch.nonzero((acquired & ~protected).reshape(-1)).squeeze(1)
    count = round(fraction * candidates.numel())
    if count == 0 or count == candidates.numel():
        raise UserError(f"cannot hold out {fraction:.0%} of {candidates.numel()} acquired k-space points "
                        "outside the calibration block: too few points for self-supervised adaptation.")
    pick = candidates[torch.randperm(candidates.numel(), generator=generator)[:count].to(candidates.device)]
    chosen = torch.zeros(acquired.numel(), dtype=torch.bool, device=acquired.device)
    chosen[pick] = True
    chosen = chosen.reshape(acquired.shape)
    return chosen, acquired & ~chosen


def kspace_loss(predicted: Tensor, measured: Tensor, points: Tensor) -> Tensor:
    """Normalised L2 + L1 between predicted and measured k-space on the chosen points.

    predicted, measured: (B, C, H, W, 2); points: (H, W) or (1, W) bool, shared by every coil."""
    where = points[None, None, :, :, None].expand_as(measured)
    diff = (predicted - measured)[where].float()
    ref = measured[where].float()
    return diff.norm(2) / ref.norm(2).clamp_min(1e-12) + diff.abs().sum() / ref.abs().sum().clamp_min(1e-12)


def _as_point_mask(points: Tensor) -> Tensor:
    return points[None, None, :, :, None].float()


@dataclass
class AdaptResult:
    model: nn.Module  # the adapted copy, in eval mode
    best_step: int  # 0: the pretrained weights were kept
    steps_run: int
    history: list[dict]  # {"step", "val_loss"} and {"step", "loss"} entries


def adapt_to_scan(model: nn.Module, masked_kspace: Tensor, mask: Tensor, num_low_frequencies: Tensor | int,
                  cfg: AdaptConfig, on_step: Callable[[int, float], None] | None = None) -> AdaptResult:
    """Fine-tune a copy of `model` on one scan's own measurements (see the module docstring).

    masked_kspace (1, C, H, W, 2) and column mask (1, 1, 1, W, 1) exactly as the task's samples
    hold them; num_low_frequencies: the calibration block's width (> 0)."""
    from podium.tasks.reconstruction.models.varnet import centre_columns

    check_adapt_config(cfg)
    if masked_kspace.shape[0] != 1:
        raise ValueError("adapt_to_scan works on one slice at a time (batch size 1)")
    if not hasattr(model, "predicted_kspace"):
        raise UserError(f"task.adapt: model {type(model).__name__} has no predicted_kspace(); "
                        "self-supervised adaptation needs a k-space network (varnet, fivarnet).")
    nlf = torch.as_tensor(num_low_frequencies).reshape(-1)
    if int(nlf[0]) <= 0:
        raise UserError("task.adapt needs the calibration block's width (num_low_frequencies > 0).")
    rows = masked_kspace.shape[-3] if cfg.split == "points" else 1
    acquired = (mask.reshape(-1) != 0)[None, :].expand(rows, -1)
    protected = (centre_columns(mask, nlf).reshape(-1) != 0)[None, :].expand(rows, -1)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    val_points, train_points = split_points(acquired, protected, cfg.val_fraction, generator)

    work = copy.deepcopy(model).eval()  # eval: no dropout or batch statistics; gradients still flow
    for p in work.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(work.parameters(), lr=float(cfg.lr))
    measured = masked_kspace
    val_input = measured * _as_point_mask(train_points)

    def validation_loss() -> float:
        with torch.no_grad():
            pred = work.predicted_kspace(val_input, _as_point_mask(train_points), nlf)
            return float(kspace_loss(pred, measured, val_points))

    best = validation_loss()
    best_state, best_step, since = copy.deepcopy(work.state_dict()), 0, 0
    history = [{"step": 0, "val_loss": best}]
    step = 0
    for step in range(1, int(cfg.steps) + 1):
        loss_points, input_points = split_points(train_points, protected, cfg.loss_fraction, generator)
        pred = work.predicted_kspace(measured * _as_point_mask(input_points), _as_point_mask(input_points), nlf)
        loss = kspace_loss(pred, measured, loss_points)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": float(loss.detach())})
        if on_step is not None:
            on_step(step, float(loss.detach()))
        if step % int(cfg.val_every) == 0:
            current = validation_loss()
            history.append({"step": step, "val_loss": current})
            if current < best:
                best, best_state, best_step, since = current, copy.deepcopy(work.state_dict()), step, 0
            else:
                since += 1
                if since >= int(cfg.patience):
                    break
    work.load_state_dict(best_state)
    for p in work.parameters():
        p.requires_grad_(False)
    return AdaptResult(model=work, best_step=best_step, steps_run=step, history=history)
