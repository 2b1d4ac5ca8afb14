"""What a preference user reads beside the accuracy: the distribution of reward margins, the accuracy by
response length, and how often the model makes the chosen response more likely than the reference does.

Computed from per-pair numbers (`score`'s rows), in numpy, once per report. Trade-off: the length buckets are the
quartiles of the pairs at hand (so each holds about a quarter of them), not fixed token counts comparable across
datasets.
"""

from __future__ import annotations

import numpy as np

BINS = 8


def margin_histogram(margins: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """(counts (bins,), edges (bins + 1,)) over equal-width bins from the smallest to the largest margin."""
    low, high = (float(margins.min()), float(margins.max())) if len(margins) else (0.0, 0.0)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return np.histogram(margins, bins=bins, range=(low, high))


def length_buckets(lengths: np.ndarray, correct: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(shortest, longest, pairs, correct) of each quartile bucket of `lengths` (fewer buckets when lengths
    repeat)."""
    edges = np.unique(np.quantile(lengths, [0.25, 0.5, 0.75])) if len(lengths) else np.array([])
    bucket = np.searchsorted(edges, lengths, side="left")  # (P,) 0..len(edges)
    found = []
    for number in range(len(edges) + 1):
        chosen = bucket == number
        if chosen.any():
            found.append(
                (
                    int(lengths[chosen].min()),
                    int(lengths[chosen].max()),
                    int(chosen.sum()),
                    int(correct[chosen].sum()),
                )
            )
    return found


def preference_report(margins: np.ndarray, lengths: np.ndarray, chosen_gains: np.ndarray | None) -> list[str]:
    """Lines for the pairs of a score: `margins` (P,) reward margins (chosen minus rejected, log-prob minus the
    reference's), `lengths` (P,) tokens of each pair's longer response, `chosen_gains` (P,) the chosen response's
    log-prob minus the reference's (None without a reference)."""
    if not len(margins):
        return []
    quantiles = np.quantile(margins, [0.1, 0.5, 0.9])
    counts, edges = margin_histogram(margins)
    lines = [
        f"reward margins (nats): 10% {quantiles[0]:.3f}, median {quantiles[1]:.3f}, 90% {quantiles[2]:.3f}, "
        f"mean {margins.mean():.3f}; histogram "
        + " ".join(f"[{edges[i]:.2f},{edges[i + 1]:.2f}):{int(count)}" for i, count in enumerate(counts))
    ]
    buckets = length_buckets(lengths, margins > 0)
    lines.append(
        "accuracy by the longer response's tokens: "
        + ", ".join(f"{low}-{high}: {right / pairs:.3f} of {pairs}" for low, high, pairs, right in buckets)
    )
    if chosen_gains is not None:
        wins = int((chosen_gains > 0).sum())
        lines.append(
            f"chosen responses more likely than under the reference: {wins} of {len(chosen_gains)} "
            f"(win rate {wins / len(chosen_gains):.3f})"
        )
    return lines
