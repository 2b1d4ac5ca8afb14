"""One micro-batch's preference loss: per-response log-prob sums → the pairs its groups yield → per-pair
losses; the listwise loss per group; and the metric sums that the step reduces over micro-batches and ranks.

Pair losses are summed here and divided by the global batch's pairs by the caller, the listwise loss likewise by
its groups, so neither depends on how groups share rows or micro-batches. Trade-off: the ranking metrics compare
every two responses of the micro-batch (a (Rb, Rb) mask), cheap next to the forward pass at the few hundred
responses a micro-batch holds.
"""

from __future__ import annotations

import torch

from unitrain.data.batch import PackedBatch
from unitrain.losses.preference import (
    GROUP_LOSSES,
    PreferenceLossConfig,
    pair_view,
    plackett_luce_losses,
    preference_losses,
    ranking_counts,
    response_logps,
)

PAIR_SUMS = ("pairs", "chosen_rewards", "rejected_rewards", "accuracies", "chosen_logps", "rejected_logps")
RANKING_SUMS = ("groups", "ordered_pairs", "ordered_correct", "top1_correct")


def pair_sum_keys(config: PreferenceLossConfig) -> tuple[str, ...]:
    """The per-pair sums of a batch under this loss config: PAIR_SUMS, and with a list of pair losses each term's
    (`losses/<name>`)."""
    terms = [name for name in config.losses if name not in GROUP_LOSSES]
    return PAIR_SUMS + (tuple(f"losses/{name}" for name in terms) if len(terms) > 1 else ())


def pair_table(
    policy: torch.Tensor, reference: torch.Tensor | None, counts: torch.Tensor, pairs: torch.Tensor
) -> torch.Tensor:
    """(P, 3) float64 on the CPU, one row per pair: the reward margin in nats (β = 1: the chosen response's
    log-prob gain over the reference minus the rejected one's), the longer response's tokens, and the chosen
    response's gain alone (> 0: the policy makes it more likely than the reference does). What `score` reports
    per pair, from the numbers validation computes anyway."""
    gains = policy.detach().double() - (0.0 if reference is None else reference.detach().double())  # (Rb,)
    gains, lengths = pair_view(gains, pairs), pair_view(counts, pairs)  # (P, 2) each
    margins = gains[:, 0] - gains[:, 1]
    return torch.stack([margins, lengths.max(dim=1).values.double(), gains[:, 0]], dim=1).cpu()


def preference_loss_sums(
    logps: torch.Tensor,
    batch: PackedBatch,
    reference: torch.Tensor | None,
    config: PreferenceLossConfig,
    chosen_per_pair: float | None,
    ranking: bool,
    table: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(sum of per-pair losses, sum of per-group listwise losses or None, metric sums: with a listwise loss,
    its detached sum as `group_loss`).

    logps (N,) the policy's target log-probs; reference (Rb,) the reference's response log-probs or None.
    `table`, when given (validation), gets this batch's `pair_table` appended."""
    policy, counts = response_logps(logps, batch.target_response, batch.num_responses)  # (Rb,) each
    pairs = batch.pair_responses  # (P, 2)
    if table is not None:
        table.append(pair_table(policy, reference, counts, pairs))
    output = preference_losses(
        pair_view(policy, pairs),
        None if reference is None else pair_view(reference, pairs),
        pair_view(counts, pairs),
        config,
        chosen_tokens_per_pair=chosen_per_pair,
    )
    sums = {
        "pairs": batch.num_pairs,
        "chosen_rewards": output.chosen_rewards.sum(),
        "rejected_rewards": output.rejected_rewards.sum(),
        "accuracies": (output.chosen_rewards > output.rejected_rewards).sum(),
        "chosen_logps": output.metrics["logps/chosen"].sum(),
        "rejected_logps": output.metrics["logps/rejected"].sum(),
        **{key: value.sum() for key, value in output.metrics.items() if key.startswith("losses/")},
    }
    listwise = [w for name, w in zip(config.losses, config.weights) if name in GROUP_LOSSES]
    group_loss = None
    if listwise or ranking:
        rewards = config.beta * (policy - (0.0 if reference is None else reference))  # (Rb,)
        if listwise:
            group_loss = (
                listwise[0]
                * plackett_luce_losses(
                    rewards, batch.response_group, batch.response_score, batch.num_groups
                ).sum()
            )
            sums["group_loss"] = group_loss.detach()
        if ranking:
            ordered, correct, top1 = ranking_counts(
                rewards.detach(), batch.response_group, batch.response_score, batch.num_groups
            )
            sums.update(
                groups=batch.num_groups, ordered_pairs=ordered, ordered_correct=correct, top1_correct=top1
            )
    return output.losses.sum(), group_loss, sums
