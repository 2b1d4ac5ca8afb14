"""Learning-rate schedules against their closed forms; weight decay only on matrices."""

from __future__ import annotations

import math

import pytest
import torch

from unitrain.config import OptimizerSection, ScheduleSection
from unitrain.train.optim import build_optimizer, learning_rate_at


def closed_form(kind: str, step: int, lr: float, total: int, warmup: int, floor_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    if kind == "constant":
        return lr
    t = (step - warmup) / (total - warmup)
    floor = lr * floor_ratio
    if kind == "linear":
        return lr - (lr - floor) * t
    return floor + (lr - floor) * (math.cos(math.pi * t) + 1) / 2


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup, floor_ratio", [(0, 0.0), (3, 0.1)])
def test_schedule_matches_closed_form(kind, warmup, floor_ratio):
    schedule = ScheduleSection(kind=kind, warmup_steps=warmup, min_lr_ratio=floor_ratio)
    total, lr = 20, 2e-3
    values = [learning_rate_at(step, lr, total, schedule) for step in range(total)]
    for step, value in enumerate(values):
        assert value == pytest.approx(closed_form(kind, step, lr, total, warmup, floor_ratio), rel=1e-12)
    assert values[warmup] == pytest.approx(lr)  # peak right after warmup
    if kind != "constant":
        # the floor is reached one step after the last one: the last step still has a positive rate
        assert values[-1] > lr * floor_ratio
        assert learning_rate_at(total, lr, total, schedule) == pytest.approx(lr * floor_ratio)


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model, OptimizerSection(lr=0.1, weight_decay=0.5, betas=(0.9, 0.99)))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    # one step with zero gradients: only decayed parameters move, by lr * wd * value (AdamW's decoupled decay)
    before = [p.detach().clone() for p in model.parameters()]
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for param, old in zip(model.parameters(), before):
        expected = old * (1 - 0.1 * 0.5) if id(param) in decayed else old
        torch.testing.assert_close(param.detach(), expected)
