"""The EMA teacher (engine/ema.py): warm start, the update rule, buffers, frozen parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from podium.engine.ema import EMATeacher, lerp_towards, warm_alpha


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def test_warm_start_is_min_of_one_minus_one_over_t_plus_one_and_alpha():
    assert warm_alpha(0, 0.999) == 0.0
    assert warm_alpha(1, 0.999) == pytest.approx(0.5)
    assert warm_alpha(9, 0.999) == pytest.approx(0.9)
    assert warm_alpha(10_000, 0.999) == pytest.approx(0.999)


def test_teacher_follows_the_student_by_the_ema_rule_and_is_never_trained():
    student = _net()
    teacher = EMATeacher(student, alpha=0.99)
    assert not any(p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(4.0)
    used = teacher.update(student, step=1000)
    assert used == pytest.approx(0.99)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * s)
    torch.testing.assert_close(teacher.model[1].running_mean, torch.full((2,), 0.04))
    assert teacher.model[1].num_batches_tracked == student[1].num_batches_tracked
    # step 0: the teacher becomes the student exactly
    teacher.update(student, step=0)
    for t, s in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)


def test_parameters_only_leaves_buffers_alone():
    student, target = _net(), _net()
    student[1].running_mean.fill_(3.0)
    lerp_towards(target, student, 0.5)
    assert torch.all(target[1].running_mean == 0)
