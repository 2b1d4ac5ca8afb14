"""Each DPO-family loss against a plain-`math` closed form on fixed inputs; config refusals; pair sums."""

from __future__ import annotations

import math

import pytest
import torch

from unitrain.losses.lm import lm_loss_sum
from unitrain.losses.preference import (
    GROUP_LOSSES,
    LOSSES,
    PreferenceLossConfig,
    pair_view,
    preference_losses,
    response_logps,
)

# the last pair has β·Δ = 3 > 1: hinge's clamp at zero is reached
POLICY = [(-12.0, -15.5), (-30.25, -22.0), (-4.0, -4.0), (-60.0, -41.5), (-10.0, -20.0)]
REFERENCE = [(-13.0, -14.0), (-29.0, -25.0), (-4.5, -3.0), (-55.0, -45.0), (-12.0, -12.0)]
COUNTS = [(6, 9), (14, 10), (3, 3), (25, 17), (5, 8)]
BETA, SMOOTH, GAMMA, TAU = 0.3, 0.2, 0.7, 0.05


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(logsig(x))


def expected(name: str, pc, pr, rc, rr, nc, nr, chosen_per_pair, ls: float) -> float:
    """The formulas of docs/dpo.md, written out in scalar math."""
    b = BETA
    cl, rl = pc - rc, pr - rr
    d = cl - rl
    table = {
        "sigmoid": lambda: -(1 - ls) * logsig(b * d) - ls * logsig(-b * d),
        "hinge": lambda: max(0.0, 1 - b * d),
        "ipo": lambda: (cl / nc - rl / nr - 1 / (2 * b)) ** 2,
        "robust": lambda: (-(1 - ls) * logsig(b * d) + ls * logsig(-b * d)) / (1 - 2 * ls),
        "exo_pair": lambda: (
            sig(b * d) * (logsig(b * d) - math.log(1 - ls)) + sig(-b * d) * (logsig(-b * d) - math.log(ls))
        ),
        "nca_pair": lambda: -logsig(b * cl) - 0.5 * logsig(-b * cl) - 0.5 * logsig(-b * rl),
        "bco_pair": lambda: -logsig(b * cl) - logsig(-b * rl),
        "sppo_hard": lambda: (cl - 0.5 / b) ** 2 + (rl + 0.5 / b) ** 2,
        "apo_zero": lambda: 1 - sig(b * cl) + sig(b * rl),
        "apo_down": lambda: sig(b * cl) + 1 - sig(b * d),
        "discopop": lambda: -logsig(b * d) * (1 - sig(b * d / TAU)) + math.exp(-b * d) * sig(b * d / TAU),
        "sigmoid_norm": lambda: -logsig(b * (cl / nc - rl / nr)),
        "simpo": lambda: (
            -(1 - ls) * logsig(b * (pc / nc - pr / nr - GAMMA / b))
            - ls * logsig(-b * (pc / nc - pr / nr - GAMMA / b))
        ),
        "orpo": lambda: (
            -b
            * logsig(pc / nc - pr / nr - (math.log(1 - math.exp(pc / nc)) - math.log(1 - math.exp(pr / nr))))
        ),
        "sft": lambda: -pc / chosen_per_pair,
    }
    return table[name]()


def run(names, weights=None, reference=True, smoothing=SMOOTH, **kwargs):
    config = PreferenceLossConfig(names, weights, BETA, smoothing, GAMMA, TAU)
    ref = torch.tensor(REFERENCE, dtype=torch.float64) if reference else None
    return preference_losses(
        torch.tensor(POLICY, dtype=torch.float64), ref, torch.tensor(COUNTS), config, **kwargs
    )


@pytest.mark.parametrize(
    "name", [n for n in LOSSES if n not in ("robust", "simpo", "exo_pair") and n not in GROUP_LOSSES]
)
def test_loss_matches_closed_form_without_smoothing(name):
    out = run([name], smoothing=0.0)
    mean_chosen = sum(c for c, _ in COUNTS) / len(COUNTS)
    for k, ((pc, pr), (rc, rr), (nc, nr)) in enumerate(zip(POLICY, REFERENCE, COUNTS)):
        want = expected(name, pc, pr, rc, rr, nc, nr, mean_chosen, 0.0)
        assert out.losses[k].item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name", ["sigmoid", "robust", "simpo", "exo_pair"])
def test_smoothed_losses_match_closed_form(name):
    out = run([name])
    for k, ((pc, pr), (rc, rr), (nc, nr)) in enumerate(zip(POLICY, REFERENCE, COUNTS)):
        assert out.losses[k].item() == pytest.approx(
            expected(name, pc, pr, rc, rr, nc, nr, None, SMOOTH), rel=1e-12
        )


def test_weighted_list_reference_free_and_global_sft_normalizer():
    out = run(["sigmoid", "sft"], [1.0, 0.1], reference=False, chosen_tokens_per_pair=20.0)
    for k, (pc, pr) in enumerate(POLICY):
        want = expected("sigmoid", pc, pr, 0, 0, 1, 1, None, SMOOTH) + 0.1 * (-pc / 20.0)
        assert out.losses[k].item() == pytest.approx(want, rel=1e-12)
    # TRL's sft is the token mean over the batch: mean of per-pair values == total chosen NLL / chosen tokens
    sft = run(["sft"], smoothing=0.0).losses.mean().item()
    assert sft == pytest.approx(-sum(pc for pc, _ in POLICY) / sum(c for c, _ in COUNTS), rel=1e-12)


def test_metrics_use_trl_names_and_per_pair_rewards():
    out = run(["sigmoid"])
    chosen = [BETA * (pc - rc) for (pc, _), (rc, _) in zip(POLICY, REFERENCE)]
    rejected = [BETA * (pr - rr) for (_, pr), (_, rr) in zip(POLICY, REFERENCE)]
    assert out.metrics["rewards/chosen"].tolist() == pytest.approx(chosen)
    assert out.metrics["rewards/rejected"].tolist() == pytest.approx(rejected)
    assert out.metrics["rewards/margins"].tolist() == pytest.approx([c - r for c, r in zip(chosen, rejected)])
    assert out.metrics["rewards/accuracies"].tolist() == [float(c > r) for c, r in zip(chosen, rejected)]
    assert out.metrics["logps/chosen"].tolist() == [pc for pc, _ in POLICY]
    assert out.metrics["logps/rejected"].tolist() == [pr for _, pr in POLICY]


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(losses=["exo_pair"], label_smoothing=0.0), "exo_pair needs"),
        (dict(losses=["robust"], label_smoothing=0.5), "robust needs"),
        (dict(losses=["sigmoid"], label_smoothing=0.7), "sigmoid needs"),
        (dict(losses=["hinge"], label_smoothing=0.1), "has no effect"),
        (dict(losses=["sigmoid", "sft"], weights=[1.0]), "1 loss weights for 2"),
        (dict(losses=["sigmoid", "sigmoid"]), "listed twice"),
        (dict(losses=["dpo"]), "unknown preference loss"),
        (dict(losses=["sigmoid"], beta=0.0), "beta must be"),
        (dict(losses=["sigmoid", "sft"], weights=[0.0, 0.0]), "not all 0"),
    ],
)
def test_contradictions_are_refused_with_a_reason(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        PreferenceLossConfig(**kwargs)


def test_response_logps_sums_per_response_and_ignores_lm_targets():
    logps = torch.tensor([-1.0, -2.0, -0.5, -3.0, -0.25, -4.0])
    response = torch.tensor([2, 1, 3, -1, 1, 2])
    sums, counts = response_logps(logps, response, num_responses=5)
    assert sums.tolist() == [0.0, -2.25, -5.0, -0.5, 0.0]
    assert counts.tolist() == [0, 2, 2, 1, 0]
    pairs = torch.tensor([[2, 1], [3, 1]])
    assert pair_view(sums, pairs).tolist() == [[-5.0, -2.25], [-0.5, -2.25]]


def test_lm_loss_is_a_sum_and_a_count():
    total, count = lm_loss_sum(torch.tensor([-1.0, -0.5, -2.0]))
    assert total.item() == 3.5 and count == 3
