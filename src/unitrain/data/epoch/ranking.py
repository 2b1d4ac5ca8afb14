"""Which preference pairs a scored group yields (`dpo.group_pairs`), one group at a time or vectorized over many.

A response is preferred to another when its score is strictly higher; ties yield no pair.
  all            every such ordered pair
  best_vs_rest   every top-scored response against every response scored lower
  best_vs_worst  every top-scored response against every bottom-scored one
A pair (scores 1, 0) yields its one pair in every mode. `wins` — how many pairs a response is the preferred side
of — is what the planner needs per response (pairs per group = the sum of its wins; chosen-response tokens per
pair = Σ length × wins), computed for a whole dataset with a few sorts, no Python loop per group. Trade-off: the
pair list of a group is built in collate, per batch, from the scores stored in the dataset, so changing the mode
needs no new `prepare`.
"""

from __future__ import annotations

import numpy as np

from unitrain.errors import UnitrainError

GROUP_PAIRS = ("all", "best_vs_rest", "best_vs_worst")


def check_mode(mode: str) -> None:
    if mode not in GROUP_PAIRS:
        raise UnitrainError(f"group_pairs must be one of {', '.join(GROUP_PAIRS)}, got {mode!r}")


def group_pairs(scores: np.ndarray, mode: str) -> np.ndarray:
    """(k, 2) int64 (preferred, other) response numbers of one group, ordered by preferred then other. Called
    per group, so `mode` is not checked here: callers check it once (`check_mode`)."""
    scores = np.asarray(scores)
    better = scores[:, None] > scores[None, :]  # (N, N) i preferred to j
    if mode != "all":
        top = scores == scores.max()
        other = scores < scores.max() if mode == "best_vs_rest" else scores == scores.min()
        better &= top[:, None] & other[None, :]
    return np.argwhere(better).astype(np.int64)


def response_wins(scores: np.ndarray, group_offsets: np.ndarray, mode: str) -> np.ndarray:
    """(R,) pairs in which each response is the preferred side, for groups `[offsets[g], offsets[g + 1])` of the
    flat `scores` (R,); vectorized over every group."""
    check_mode(mode)
    scores = np.asarray(scores, dtype=np.float64)
    offsets = np.asarray(group_offsets, dtype=np.int64)
    sizes = np.diff(offsets)  # (G,)
    group = np.repeat(np.arange(len(sizes)), sizes)  # (R,)
    if mode == "all":
        order = np.lexsort((scores, group))  # by group, then score ascending
        ranked, ranked_group = scores[order], group[order]
        position = np.arange(len(order))
        new_run = np.ones(len(order), dtype=bool)
        new_run[1:] = (ranked[1:] != ranked[:-1]) | (ranked_group[1:] != ranked_group[:-1])
        run_start = np.maximum.accumulate(np.where(new_run, position, 0))  # first of its equal scores
        wins = np.empty(len(order), dtype=np.int64)
        wins[order] = run_start - offsets[ranked_group]  # responses of its group scored lower
        return wins
    best = np.maximum.reduceat(scores, offsets[:-1]) if len(sizes) else scores[:0]  # (G,)
    worst = np.minimum.reduceat(scores, offsets[:-1]) if len(sizes) else scores[:0]
    top = scores == best[group]
    if mode == "best_vs_rest":
        losers = sizes - np.add.reduceat(top.astype(np.int64), offsets[:-1]) if len(sizes) else sizes
    else:
        bottom = (
            np.add.reduceat((scores == worst[group]).astype(np.int64), offsets[:-1]) if len(sizes) else sizes
        )
        losers = np.where(best > worst, bottom, 0)
    return np.where(top, losers[group], 0).astype(np.int64)
