"""Per-pair log-probs → DPO-family losses (one value per pair) and TRL-named reward metrics.

Every loss is computed pair by pair and returned unreduced; the trainer sums them and divides by the number of
pairs of the whole global batch. Never a sigmoid over a sum of log-ratios of several pairs, never a
per-micro-batch mean. The formulas follow TRL 1.16 (`DPOTrainer`; `simpo` from `CPOTrainer`, `orpo` from
`ORPOTrainer`) so runs compare; docs/dpo.md lists each one. Imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "simpo",
    "orpo",
    "sft",
    "plackett_luce",
)
# listwise: one value per group, averaged over the groups of the global batch
GROUP_LOSSES = ("plackett_luce",)
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "simpo")  # the losses that read label_smoothing


def response_logps(
    logps: torch.Tensor, target_response: torch.Tensor, num_responses: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probs (N,) → per-response sums (Rb,) and token counts (Rb,).

    Targets with `target_response < 0` (LM/SFT targets) are ignored."""
    keep = target_response >= 0  # (N,)
    slot = target_response[keep]  # (n,)
    sums = logps.new_zeros(num_responses).index_add(0, slot, logps[keep])  # (Rb,)
    counts = torch.zeros(num_responses, dtype=torch.int64, device=logps.device)
    counts = counts.index_add(0, slot, torch.ones_like(slot))  # (Rb,)
    return sums, counts


def pair_view(values: torch.Tensor, pair_responses: torch.Tensor) -> torch.Tensor:
    """Per-response values (Rb,) → (P, 2): column 0 the preferred response's, column 1 the other's."""
    return values[pair_responses]


@dataclass
class PreferenceLossConfig:
    """Which losses, their weights and their constants; contradictory settings are refused here (ValueError)."""

    losses: list[str] = field(default_factory=lambda: ["sigmoid"])
    weights: list[float] | None = None  # one per loss; None → all 1.0
    beta: float = 0.1  # β: temperature of the implicit reward; τ of IPO
    label_smoothing: float = 0.0  # conservative DPO / robust DPO flip rate / EXO ε / conservative SimPO
    simpo_gamma: float = 0.5  # SimPO target reward margin γ
    discopop_tau: float = 0.05  # DiscoPOP temperature τ

    def __post_init__(self) -> None:
        if isinstance(self.losses, str):
            self.losses = [self.losses]
        self.losses = list(self.losses)
        self.weights = [1.0] * len(self.losses) if self.weights is None else [float(w) for w in self.weights]
        unknown = [name for name in self.losses if name not in LOSSES]
        if not self.losses or unknown:
            raise ValueError(
                f"unknown preference loss {unknown or '(none given)'}; choose from {', '.join(LOSSES)}"
            )
        if len(set(self.losses)) != len(self.losses):
            raise ValueError(f"a loss is listed twice in {self.losses}; give it one weight instead")
        if len(self.weights) != len(self.losses):
            raise ValueError(f"{len(self.weights)} loss weights for {len(self.losses)} losses {self.losses}")
        if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"loss weights must be finite, ≥ 0 and not all 0, got {self.weights}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not (self.discopop_tau > 0 and math.isfinite(self.simpo_gamma)):
            raise ValueError(
                f"need discopop_tau > 0 and a finite simpo_gamma, got {self.discopop_tau}, {self.simpo_gamma}"
            )
        self._check_label_smoothing()

    def _check_label_smoothing(self) -> None:
        smoothing = self.label_smoothing
        if "exo_pair" in self.losses and not 0 < smoothing < 1:
            raise ValueError(
                f"exo_pair needs 0 < label_smoothing < 1 (ε, the paper uses 1e-3), got {smoothing}"
            )
        halves = [name for name in ("sigmoid", "robust", "simpo") if name in self.losses]
        if halves and not 0 <= smoothing < 0.5:
            raise ValueError(
                f"{halves[0]} needs 0 ≤ label_smoothing < 0.5 (at 0.5 and above the rejected response would be "
                f"preferred), got {smoothing}"
            )
        if smoothing != 0 and not any(name in SMOOTHED_LOSSES for name in self.losses):
            raise ValueError(
                f"label_smoothing={smoothing} has no effect on {self.losses}; only {', '.join(SMOOTHED_LOSSES)} use it"
            )


@dataclass
class PreferenceOutput:
    losses: torch.Tensor  # (P,) weighted sum of the configured losses, per pair
    chosen_rewards: torch.Tensor  # (P,) β · (policy − reference) log-prob of chosen, detached
    rejected_rewards: torch.Tensor  # (P,)
    metrics: dict[str, torch.Tensor]  # TRL names → (P,) detached per-pair values


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable on both sides of −ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _smoothed_sigmoid(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    return -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)


def preference_losses(
    policy: torch.Tensor,
    reference: torch.Tensor | None,
    counts: torch.Tensor,
    config: PreferenceLossConfig,
    *,
    chosen_tokens_per_pair: float | None = None,
) -> PreferenceOutput:
    """Per-pair losses from summed response log-probs.

    policy (P, 2), reference (P, 2) or None (reference-free: its log-probs count as 0), counts (P, 2) response
    tokens. `chosen_tokens_per_pair` normalizes `sft` (and the NLL that ORPO users add as `sft`): TRL divides the
    summed chosen NLL by the chosen tokens of the batch, so pass global chosen targets ÷ global pairs; the default
    is this call's own mean chosen length (exact for a single micro-batch).
    """
    beta, smoothing = config.beta, config.label_smoothing
    reference = torch.zeros_like(policy) if reference is None else reference.to(policy.dtype)
    lengths = counts.to(policy.dtype).clamp(min=1)  # (P, 2)
    chosen_ratio = policy[:, 0] - reference[:, 0]  # (P,) log π(c|x)/π_ref(c|x)
    rejected_ratio = policy[:, 1] - reference[:, 1]  # (P,)
    delta = chosen_ratio - rejected_ratio  # (P,)
    if chosen_tokens_per_pair is None:
        chosen_tokens_per_pair = float(counts[:, 0].sum().clamp(min=1)) / max(policy.shape[0], 1)

    def per_pair(name: str) -> torch.Tensor:
        if name == "sigmoid":
            return _smoothed_sigmoid(beta * delta, smoothing)
        if name == "hinge":
            return torch.relu(1 - beta * delta)
        if name == "ipo":
            normalized = chosen_ratio / lengths[:, 0] - rejected_ratio / lengths[:, 1]
            return (normalized - 1 / (2 * beta)) ** 2
        if name == "robust":
            clean = -(1 - smoothing) * F.logsigmoid(beta * delta)
            flipped = -smoothing * F.logsigmoid(-beta * delta)
            return (clean - flipped) / (1 - 2 * smoothing)
        if name == "exo_pair":
            log_q_win, log_q_lose = F.logsigmoid(beta * delta), F.logsigmoid(-beta * delta)
            return log_q_win.exp() * (log_q_win - math.log1p(-smoothing)) + log_q_lose.exp() * (
                log_q_lose - math.log(smoothing)
            )
        if name == "nca_pair":
            chosen, rejected = beta * chosen_ratio, beta * rejected_ratio
            return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
        if name == "bco_pair":
            return -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
        if name == "sppo_hard":
            return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
        if name == "apo_zero":
            return 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
        if name == "apo_down":
            return torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * delta)
        if name == "discopop":
            logits = beta * delta
            modulation = torch.sigmoid(logits / config.discopop_tau)
            return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
        if name == "sigmoid_norm":
            return -F.logsigmoid(beta * (chosen_ratio / lengths[:, 0] - rejected_ratio / lengths[:, 1]))
        average = policy / lengths  # (P, 2) mean log-prob per response token (reference-free losses)
        if name == "simpo":
            margin = average[:, 0] - average[:, 1] - config.simpo_gamma / beta
            return _smoothed_sigmoid(beta * margin, smoothing)
        if name == "orpo":
            log_odds = (average[:, 0] - average[:, 1]) - (_log1mexp(average[:, 0]) - _log1mexp(average[:, 1]))
            return -beta * F.logsigmoid(log_odds)
        return -policy[:, 0] / chosen_tokens_per_pair  # sft

    components = {name: per_pair(name) for name in config.losses if name not in GROUP_LOSSES}
    losses = sum(
        (
            weight * components[name]
            for name, weight in zip(config.losses, config.weights)
            if name in components
        ),
        start=torch.zeros_like(delta),
    )
    chosen_rewards = beta * chosen_ratio.detach()  # (P,)
    rejected_rewards = beta * rejected_ratio.detach()  # (P,)
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(policy.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy[:, 0].detach(),
        "logps/rejected": policy[:, 1].detach(),
    }
    if len(components) > 1:  # a list of losses: each term alone, unweighted (e.g. the DPO term beside `sft`)
        metrics.update({f"losses/{name}": value.detach() for name, value in components.items()})
    return PreferenceOutput(losses, chosen_rewards, rejected_rewards, metrics)


def plackett_luce_losses(
    rewards: torch.Tensor, response_group: torch.Tensor, response_score: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """Per-group DPO loss under the Plackett–Luce ranking model: −log P(the scores' ranking | implicit rewards).

    rewards (R,) β·(log π − log π_ref) of every response; response_group (R,) its group in [0, G); response_score
    (R,). With responses ordered by score, tier t (equal scores) of remaining set S_t contributes
    −Σ_{i∈t} [r_i − log Σ_{j∈S_t} exp(r_j)] (Breslow's treatment of ties; the last tier adds nothing). Without
    ties this is the exact Plackett–Luce likelihood, and for two responses it is the sigmoid loss. Returns (G,).
    """
    losses = rewards.new_zeros(num_groups)
    if rewards.numel() == 0:
        return losses
    by_score = torch.sort(-response_score, stable=True).indices  # (R,) best first
    order = by_score[torch.sort(response_group[by_score], stable=True).indices]  # (R,) by group, then score
    sizes = torch.bincount(response_group, minlength=num_groups)  # (G,)
    starts = torch.cumsum(sizes, 0) - sizes  # (G,) first position of each group in `order`
    for size in torch.unique(sizes).tolist():
        if size < 2:
            continue
        groups = torch.nonzero(sizes == size).squeeze(1)  # (g,)
        local = torch.arange(size, device=rewards.device)
        picked = order[starts[groups][:, None] + local]  # (g, n) responses, best first
        reward, score = rewards[picked], response_score[picked]  # (g, n)
        remaining = torch.logcumsumexp(reward.flip(-1), dim=-1).flip(-1)  # (g, n) log Σ_{j ≥ k} exp(r_j)
        new_tier = torch.ones_like(score, dtype=torch.bool)
        new_tier[:, 1:] = score[:, 1:] != score[:, :-1]
        tier_start = torch.where(new_tier, local, 0).cummax(dim=-1).values  # (g, n)
        chosen_now = score != score[:, -1:]  # every tier but the last picks its members from what remains
        terms = (reward - remaining.gather(1, tier_start)) * chosen_now  # (g, n)
        losses = losses.index_put((groups,), -terms.sum(dim=-1))
    return losses


def ranking_counts(
    rewards: torch.Tensor, response_group: torch.Tensor, response_score: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How well the implicit rewards (Rb,) rank each group's responses against their scores: (ordered pairs,
    pairs the rewards order the same way, groups whose highest reward belongs to a top-scored response). Ordered
    pairs are those with different scores; a tie in rewards is not a win (as TRL counts accuracy)."""
    same = response_group[:, None] == response_group[None, :]  # (Rb, Rb)
    ordered = same & (response_score[:, None] > response_score[None, :])
    correct = ordered & (rewards[:, None] > rewards[None, :])
    top_score = torch.full((num_groups,), -math.inf, dtype=response_score.dtype, device=rewards.device)
    top_score = top_score.scatter_reduce(0, response_group, response_score, "amax")
    top_reward = torch.full((num_groups,), -math.inf, dtype=rewards.dtype, device=rewards.device)
    top_reward = top_reward.scatter_reduce(0, response_group, rewards, "amax")
    # a miss: a response that is not top-scored reaches the group's highest reward
    miss = (rewards >= top_reward[response_group]) & (response_score < top_score[response_group])  # (Rb,)
    missed = torch.zeros(num_groups, dtype=torch.bool, device=rewards.device).index_put(
        (response_group,), miss, accumulate=True
    )
    return ordered.sum(), correct.sum(), (~missed).sum()
