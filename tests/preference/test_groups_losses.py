"""Groups: the pairs a ranking yields (against brute force over all pairs), and the Plackett–Luce loss against a
closed form in plain Python (ties by Breslow), equal to the sigmoid loss for two responses."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from unitrain.data.epoch.ranking import GROUP_PAIRS, group_pairs, response_wins
from unitrain.losses.preference import PreferenceLossConfig, plackett_luce_losses, preference_losses


def brute_pairs(scores: list[float], mode: str) -> list[tuple[int, int]]:
    best, worst = max(scores), min(scores)
    pairs = []
    for i, j in itertools.product(range(len(scores)), repeat=2):
        if scores[i] <= scores[j]:
            continue
        if mode == "best_vs_rest" and scores[i] != best:
            continue
        if mode == "best_vs_worst" and (scores[i] != best or scores[j] != worst):
            continue
        pairs.append((i, j))
    return pairs


@pytest.mark.parametrize("mode", GROUP_PAIRS)
def test_pairs_and_wins_match_brute_force(mode):
    rng = random.Random(0)
    groups = [[rng.choice([0.0, 1.0, 2.5, 7.0]) for _ in range(rng.randint(2, 7))] for _ in range(300)]
    groups.append([1.0, 0.0])  # a pair
    for scores in groups:
        assert group_pairs(np.array(scores), mode).tolist() == [list(p) for p in brute_pairs(scores, mode)]
    offsets = np.cumsum([0] + [len(g) for g in groups])
    wins = response_wins(np.concatenate(groups), offsets, mode)
    expected = [
        sum(1 for i, _ in brute_pairs(scores, mode) if i == k)
        for scores in groups
        for k in range(len(scores))
    ]
    assert wins.tolist() == expected
    assert group_pairs(np.array([1.0, 0.0]), mode).tolist() == [[0, 1]]


def closed_form(rewards: list[float], scores: list[float]) -> float:
    """−log of Breslow's tied Plackett–Luce likelihood, tier by tier, in plain math."""
    tiers = sorted(set(scores), reverse=True)
    loss = 0.0
    for tier in tiers[:-1]:
        remaining = [r for r, s in zip(rewards, scores) if s <= tier]
        log_norm = math.log(sum(math.exp(r) for r in remaining))
        loss -= sum(r - log_norm for r, s in zip(rewards, scores) if s == tier)
    return loss


def test_plackett_luce_matches_the_closed_form():
    rng = random.Random(1)
    groups = [([rng.uniform(-3, 3) for _ in range(n)], [rng.choice([0.0, 1.0, 2.0, 3.0]) for _ in range(n)])
              for n in (2, 3, 3, 4, 5, 6, 2, 4) for _ in range(3)]  # fmt: skip
    groups = [(r, s) for r, s in groups if len(set(s)) > 1]
    flat_rewards, flat_scores, membership = [], [], []
    for number, (rewards, scores) in enumerate(groups):
        flat_rewards += rewards
        flat_scores += scores
        membership += [number] * len(rewards)
    shuffle = list(range(len(flat_rewards)))
    rng.shuffle(shuffle)  # responses of a group need not be contiguous nor ordered
    losses = plackett_luce_losses(
        torch.tensor([flat_rewards[k] for k in shuffle], dtype=torch.float64),
        torch.tensor([membership[k] for k in shuffle]),
        torch.tensor([flat_scores[k] for k in shuffle], dtype=torch.float64),
        len(groups),
    )
    expected = [closed_form(rewards, scores) for rewards, scores in groups]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-12)


def test_plackett_luce_of_two_responses_is_the_sigmoid_loss():
    policy = torch.tensor([[-12.0, -15.5], [-30.25, -22.0], [-4.0, -4.5]], dtype=torch.float64)
    reference = torch.tensor([[-13.0, -14.0], [-29.0, -25.0], [-4.5, -3.0]], dtype=torch.float64)
    beta = 0.3
    sigmoid = preference_losses(policy, reference, torch.ones(3, 2), PreferenceLossConfig(beta=beta)).losses
    rewards = (beta * (policy - reference)).reshape(-1)  # chosen, rejected, chosen, ...
    listwise = plackett_luce_losses(
        rewards, torch.arange(3).repeat_interleave(2), torch.tensor([1.0, 0.0] * 3), 3
    )
    torch.testing.assert_close(listwise, sigmoid, rtol=1e-12, atol=0)


def test_plackett_luce_gradient_matches_finite_differences():
    rewards = torch.tensor([0.3, -1.2, 2.0, 0.5, -0.1], dtype=torch.float64, requires_grad=True)
    group, scores = (
        torch.tensor([0, 0, 0, 1, 1]),
        torch.tensor([2.0, 2.0, 1.0, 0.0, 3.0], dtype=torch.float64),
    )
    torch.autograd.gradcheck(lambda r: plackett_luce_losses(r, group, scores, 2), (rewards,))


def test_plackett_luce_is_not_computed_as_a_pair_loss():
    config = PreferenceLossConfig(losses=["plackett_luce", "sft"], weights=[1.0, 0.5])
    policy = torch.tensor([[-2.0, -3.0]])
    output = preference_losses(policy, None, torch.tensor([[4, 4]]), config)
    torch.testing.assert_close(output.losses, torch.tensor([0.5 * 2.0 / 4]))  # only the sft term is per pair
