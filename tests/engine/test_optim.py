"""Optimizers by name and the learning-rate curve (warmup + cosine / exponential / step)."""

from __future__ import annotations

import math

import pytest
import torch

from podium.engine.checkpoint import atomic_save, load_checkpoint
from podium.engine.optim import build_optimizer, build_scheduler, lr_factor
from podium.engine.schema import OptimConfig, SchedConfig
from podium.errors import UserError


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


# ---------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize(
    "name, cls",
    [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("nadam", torch.optim.NAdam), ("AdamW", torch.optim.AdamW)],
)
def test_optimizer_names_build_the_right_class(name, cls):
    opt = build_optimizer(params(), OptimConfig(name=name, lr=0.05, weight_decay=0.1))
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.05 and group["weight_decay"] == 0.1


def test_optimizer_hyperparameters_are_passed():
    sgd = build_optimizer(params(), OptimConfig(name="sgd", momentum=0.8, nesterov=True))
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["nesterov"] is True
    adamw = build_optimizer(params(), OptimConfig(name="adamw", betas=[0.8, 0.9], eps=1e-6))
    assert tuple(adamw.param_groups[0]["betas"]) == (0.8, 0.9) and adamw.param_groups[0]["eps"] == 1e-6


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError) as info:
        build_optimizer(params(), OptimConfig(name="lamb"))
    assert "lamb" in str(info.value)
    for name in ("adamw", "sgd", "nadam"):
        assert name in str(info.value)


# ---------------------------------------------------------------------------- lr_factor


def test_linear_warmup_reaches_one_at_the_end_of_warmup():
    cfg = SchedConfig(name="none", warmup_steps=4)
    factors = [lr_factor(s, cfg, total_steps=100, steps_per_epoch=10) for s in range(6)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_warmup_epochs_count_in_steps_per_epoch():
    cfg = SchedConfig(name="none", warmup_steps=2, warmup_epochs=0.5)  # 2 + 0.5 * 8 = 6 steps
    assert lr_factor(0, cfg, 100, steps_per_epoch=8) == pytest.approx(1 / 6)
    assert lr_factor(5, cfg, 100, steps_per_epoch=8) == pytest.approx(1.0)


def test_poly_warms_up_linearly_then_decays_as_a_power_of_the_remaining_fraction():
    cfg = SchedConfig(name="poly", warmup_steps=10, power=0.9, min_lr_ratio=0.0)
    total = 110
    assert lr_factor(0, cfg, total, 10) == pytest.approx(0.1)
    assert lr_factor(9, cfg, total, 10) == pytest.approx(1.0)  # end of warmup
    assert lr_factor(10, cfg, total, 10) == pytest.approx(1.0)
    assert lr_factor(60, cfg, total, 10) == pytest.approx(0.5 ** 0.9)  # halfway after warmup
    assert lr_factor(total, cfg, total, 10) == pytest.approx(0.0)
    linear = SchedConfig(name="poly", power=1.0, min_lr_ratio=0.1)
    assert lr_factor(25, linear, 100, 10) == pytest.approx(0.1 + 0.9 * 0.75)


def test_cosine_goes_from_one_to_min_lr_ratio():
    cfg = SchedConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.05)
    total = 110
    assert lr_factor(9, cfg, total, 10) == pytest.approx(1.0)  # end of warmup
    assert lr_factor(10, cfg, total, 10) == pytest.approx(1.0)  # start of the cosine
    assert lr_factor(60, cfg, total, 10) == pytest.approx(0.05 + 0.95 * 0.5)  # halfway
    assert lr_factor(total, cfg, total, 10) == pytest.approx(0.05)
    assert lr_factor(total + 50, cfg, total, 10) == pytest.approx(0.05)  # stays at the floor
    curve = [lr_factor(s, cfg, total, 10) for s in range(10, total + 1)]
    assert all(a >= b for a, b in zip(curve, curve[1:]))


def test_exponential_per_epoch_uses_steps_per_epoch():
    cfg = SchedConfig(name="exponential", gamma=0.5, interval="epoch")
    spe = 4
    assert [lr_factor(s, cfg, 100, spe) for s in (0, 3, 4, 7, 8, 12)] == pytest.approx(
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]
    )


def test_exponential_per_step():
    cfg = SchedConfig(name="exponential", gamma=0.9, interval="step")
    assert [lr_factor(s, cfg, 100, 4) for s in range(4)] == pytest.approx([1.0, 0.9, 0.81, 0.729])


def test_exponential_after_warmup_starts_at_one():
    cfg = SchedConfig(name="exponential", gamma=0.5, interval="epoch", warmup_epochs=1)
    assert lr_factor(3, cfg, 100, 4) == pytest.approx(1.0)  # last warmup step
    assert lr_factor(4, cfg, 100, 4) == pytest.approx(1.0)  # first epoch after warmup
    assert lr_factor(8, cfg, 100, 4) == pytest.approx(0.5)


@pytest.mark.parametrize("interval, spe", [("epoch", 5), ("step", 5)])
def test_step_decays_every_step_size_intervals(interval, spe):
    cfg = SchedConfig(name="step", gamma=0.1, step_size=3, interval=interval)
    unit = spe if interval == "epoch" else 1
    assert lr_factor(3 * unit - 1, cfg, 1000, spe) == pytest.approx(1.0)
    assert lr_factor(3 * unit, cfg, 1000, spe) == pytest.approx(0.1)
    assert lr_factor(6 * unit - 1, cfg, 1000, spe) == pytest.approx(0.1)
    assert lr_factor(6 * unit, cfg, 1000, spe) == pytest.approx(0.01)


def test_unknown_scheduler_and_interval_are_user_errors():
    opt = torch.optim.SGD(params(), lr=0.1)
    with pytest.raises(UserError, match="warmup_restarts"):
        build_scheduler(opt, SchedConfig(name="warmup_restarts"), 100, 10)
    with pytest.raises(UserError, match="hour"):
        build_scheduler(opt, SchedConfig(name="step", interval="hour"), 100, 10)


def test_build_scheduler_tolerates_zero_steps_per_epoch():
    opt = torch.optim.SGD(params(), lr=0.1)
    sched = build_scheduler(opt, SchedConfig(name="exponential", gamma=0.5, interval="epoch"), 10, 0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert sched.last_epoch == 0


# ---------------------------------------------------------------------------- scheduler


def _make(cfg, total=40, spe=8, lr=0.1):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return model, opt, build_scheduler(opt, cfg, total, spe)


def _step(model, opt, sched):
    opt.zero_grad()
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched.step()
    return opt.param_groups[0]["lr"]


def test_scheduler_follows_lr_factor():
    cfg = SchedConfig(name="cosine", warmup_steps=3, min_lr_ratio=0.1)
    model, opt, sched = _make(cfg)
    lrs = [opt.param_groups[0]["lr"]] + [_step(model, opt, sched) for _ in range(40)]
    assert lrs == pytest.approx([0.1 * lr_factor(s, cfg, 40, 8) for s in range(41)])
    assert lrs[-1] == pytest.approx(0.01)


@pytest.mark.parametrize(
    "cfg",
    [
        SchedConfig(name="cosine", warmup_steps=3, min_lr_ratio=0.1),
        SchedConfig(name="exponential", gamma=0.8, interval="epoch", warmup_epochs=0.5),
        SchedConfig(name="step", gamma=0.5, step_size=2, interval="epoch"),
    ],
)
def test_scheduler_state_dict_round_trip_continues_the_curve(cfg, tmp_path):
    torch.manual_seed(0)
    model, opt, sched = _make(cfg)
    reference = [_step(model, opt, sched) for _ in range(30)]

    torch.manual_seed(0)
    model, opt, sched = _make(cfg)
    for _ in range(13):
        _step(model, opt, sched)
    atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                tmp_path / "last.pt")

    state = load_checkpoint(tmp_path / "last.pt")  # weights_only: the schedule state is plain data
    model2, opt2, sched2 = _make(cfg)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(reference[12])
    resumed = [_step(model2, opt2, sched2) for _ in range(17)]
    assert resumed == pytest.approx(reference[13:])
    assert not math.isclose(reference[0], reference[-1])
