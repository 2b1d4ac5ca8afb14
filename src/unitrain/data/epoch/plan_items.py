"""What each document of a window takes in a row, and what it counts for, vectorized over the window.

An item is what the packer places: a pretraining piece of at most `sequence_length` tokens, an SFT document, or
a preference group (a pair is a group of two responses scored (1, 0)) with its prompt. Per item: its cost in row
slots and its counts (`COUNTS`: pairs, target tokens, chosen-response target tokens, groups), which become the
per-row counts that normalize the loss. A group longer than a row is split into parts (`rules.split_group`,
each part with its own copy of the prompt) that fill a *wide row* of their own, one batch row per part, so that
every response of the group is in the same forward pass; a group with a response that does not fit a row even
with the prompt alone is dropped whole (and counted), as is, in `separate` mode, a group whose prompt + longest
response does not fit. Trade-off: the columns are read per window (no Python object per document); only split
groups, rare, take a Python loop each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from unitrain.data.epoch.ranking import response_wins
from unitrain.data.epoch.rules import split_group
from unitrain.errors import UnitrainError

COUNTS = ("pairs", "targets", "chosen_targets", "groups")
CHUNK = 1 << 16  # documents per vectorized pass where only a sum is needed (a window: bounded scratch)


class Columns:
    """One dataset's per-document columns the costs need (lazy on the memmap reader, which reads lengths
    straight from its mapped offsets)."""

    def __init__(self, dataset, objective: str) -> None:
        self.dataset = dataset
        preference = dataset.kind == "preference"
        self.groups = dataset.group_columns if preference and getattr(dataset, "is_groups", False) else None
        self.pairs = dataset.preference_spans if preference and self.groups is None else None  # (N, 2)
        self.sft_targets = dataset.sft_target_counts if objective == "sft" and not preference else None

    def lengths(self, docs: np.ndarray) -> np.ndarray:
        """Lengths (n,) int64 of the documents `docs`."""
        read = getattr(self.dataset, "lengths_of", None)
        return read(docs) if read is not None else self.dataset.document_lengths[docs].astype(np.int64)

    def responses(self, docs: np.ndarray, lengths: np.ndarray):
        """The groups of `docs`: (offsets (n + 1,) into the flat arrays, response lengths (r,), scores (r,),
        prompt lengths (n,))."""
        if self.groups is None:  # pairs: chosen, rejected scored 1, 0
            spans = self.pairs[docs].astype(np.int64)  # (n, 2) chosen begin, rejected begin
            response_lengths = np.stack([spans[:, 1] - spans[:, 0], lengths - spans[:, 1]], axis=1).reshape(
                -1
            )
            scores = np.tile(np.array([1.0, 0.0], np.float32), len(docs))
            return np.arange(0, 2 * len(docs) + 1, 2), response_lengths, scores, spans[:, 0]
        group_offsets, all_lengths, all_scores = self.groups
        counts = group_offsets[docs + 1] - group_offsets[docs]  # (n,)
        offsets = np.zeros(len(docs) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        flat = np.repeat(group_offsets[docs] - offsets[:-1], counts) + np.arange(int(offsets[-1]))  # (r,)
        response_lengths = all_lengths[flat].astype(np.int64)
        prompt = lengths - np.add.reduceat(response_lengths, offsets[:-1]) if len(docs) else lengths
        return offsets, response_lengths, all_scores[flat], prompt


@dataclass
class WindowItems:
    """The items of one window: those the packer places, and the groups that fill wide rows of their own."""

    document: np.ndarray  # (m,) int64
    part: np.ndarray | None  # (m,) pretraining piece numbers, or None (every item whole)
    cost: np.ndarray  # (m,) row slots
    counts: np.ndarray  # (m, 4) int64, columns COUNTS
    batch_rows: np.ndarray | None  # (m,) batch rows the item's row becomes (`separate`: one per response)
    tokens: int  # real tokens of every kept item, wide rows included
    dropped: int  # documents left out (longer than a row)
    wide: list[tuple[int, int, np.ndarray]] = field(default_factory=list)  # (document, parts, counts (4,))

    def _fit(self, S: int, tokens: np.ndarray) -> WindowItems:
        """Keep the items that fit a row (the others are dropped and counted); `tokens` (m,) per item."""
        fits = self.cost <= S
        self.tokens += int(tokens[fits].sum())
        self.dropped += int((~fits).sum())
        return self._keep(fits)

    def _keep(self, fits: np.ndarray) -> WindowItems:
        if fits.all():
            return self
        keep = np.flatnonzero(fits)
        self.document, self.cost, self.counts = self.document[keep], self.cost[keep], self.counts[keep]
        self.part = None if self.part is None else self.part[keep]
        self.batch_rows = None if self.batch_rows is None else self.batch_rows[keep]
        return self


def _per_group(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.add.reduceat(values, offsets[:-1]) if len(offsets) > 1 else values[:0]


def _preference_costs(columns: Columns, docs: np.ndarray, lengths: np.ndarray, mode: str, share_prompt: bool):
    """(offsets, response lengths, scores, prompt, cost, tokens) of the groups `docs` laid out whole."""
    offsets, response_lengths, scores, prompt = columns.responses(docs, lengths)
    count = np.diff(offsets)  # (n,)
    total = lengths - prompt
    duplicated = mode == "separate" or not share_prompt
    tokens = total + (count * prompt if duplicated else prompt)
    if mode == "separate":  # one batch row per response: the longest decides
        longest = np.maximum.reduceat(response_lengths, offsets[:-1]) if len(docs) else total
        return offsets, response_lengths, scores, prompt, prompt + longest, tokens
    return offsets, response_lengths, scores, prompt, tokens, tokens


def _preference_items(columns: Columns, docs, lengths, objective, mode, share_prompt, group_pairs, S):
    offsets, response_lengths, scores, prompt, cost, tokens = _preference_costs(
        columns, docs, lengths, mode, share_prompt
    )
    if objective == "sft":  # prompt + the best response, trained on that response
        best = np.maximum.reduceat(scores, offsets[:-1]) if len(docs) else scores[:0]
        group = np.repeat(np.arange(len(docs)), np.diff(offsets))
        first_best = np.where(scores == best[group], np.arange(len(scores)), len(scores))
        chosen = response_lengths[np.minimum.reduceat(first_best, offsets[:-1])] if len(docs) else prompt
        size = prompt + chosen
        counts = np.zeros((len(docs), 4), np.int64)
        counts[:, 1] = size - np.maximum(prompt, 1)
        return WindowItems(docs, None, size, counts, None, 0, 0)._fit(S, size)
    if (prompt == 0).any():
        raise UnitrainError(
            f"pair {int(docs[np.argmax(prompt == 0)])}: empty prompt, so nothing predicts the first response "
            "token (prepare with a BOS token)"
        )
    wins = response_wins(scores, offsets, group_pairs)  # (r,)
    counts = np.stack(
        [
            _per_group(wins, offsets),
            lengths - prompt,
            _per_group(wins * response_lengths, offsets),
            np.ones(len(docs), np.int64),
        ],
        axis=1,
    )  # (n, 4)
    batch_rows = np.diff(offsets) if mode == "separate" else None
    items = WindowItems(docs, None, cost, counts, batch_rows, 0, 0)
    over = np.flatnonzero(cost > S)
    if mode != "separate":
        for k in over:
            lengths_k = response_lengths[offsets[k] : offsets[k + 1]]
            starts = split_group(int(prompt[k]), lengths_k, S, share_prompt)
            if starts is not None:
                parts = len(starts)
                items.wide.append((int(docs[k]), parts, counts[k]))
                items.tokens += int(lengths_k.sum()) + int(prompt[k]) * (
                    parts if share_prompt else len(lengths_k)
                )
    fits = cost <= S
    items.tokens += int(tokens[fits].sum())
    items.dropped = len(over) - len(items.wide)
    return items._keep(fits)


def window_items(columns: Columns, docs: np.ndarray, packing: dict, S: int) -> WindowItems:
    """The items of the documents `docs` (in the shuffled order), per `packing` (objective, mode, share_prompt,
    group_pairs)."""
    objective, mode, share_prompt = packing["objective"], packing["mode"], packing["share_prompt"]
    lengths = columns.lengths(docs)
    # preference data, for sft or dpo (check_kind refuses it for pretrain, and dpo without it)
    if columns.pairs is not None or columns.groups is not None:
        return _preference_items(
            columns,
            docs,
            lengths,
            objective,
            mode,
            share_prompt,
            packing.get("group_pairs", "best_vs_rest"),
            S,
        )
    counts = np.zeros((len(docs), 4), np.int64)
    if objective == "sft":  # an sft or pretraining dataset: the whole document
        counts[:, 1] = columns.sft_targets[docs]
        return WindowItems(docs, None, lengths, counts, None, 0, 0)._fit(S, lengths)
    if (lengths <= S).all():
        kept = lengths > 0  # an empty document has no piece
        docs, lengths = (docs, lengths) if kept.all() else (docs[kept], lengths[kept])
        counts = np.zeros((len(docs), 4), np.int64)
        counts[:, 1] = lengths - 1
        return WindowItems(docs, None, lengths, counts, None, int(lengths.sum()), 0)
    pieces = -(-lengths // S)  # (n,)
    first = np.cumsum(pieces) - pieces
    part = np.arange(int(pieces.sum())) - np.repeat(first, pieces)  # (m,)
    cost = np.minimum(S, np.repeat(lengths, pieces) - part * S)
    counts = np.zeros((len(cost), 4), np.int64)
    counts[:, 1] = cost - 1
    return WindowItems(np.repeat(docs, pieces), part, cost, counts, None, int(cost.sum()), 0)


def extra_items(columns: Columns, indices: np.ndarray, packing: dict, S: int) -> int:
    """Items beyond one per document among `indices`: pieces of pretraining documents longer than a row, and
    the parts beyond the first of groups split over a wide row."""
    extra = 0
    objective = packing["objective"]
    for begin in range(0, len(indices), CHUNK):
        docs = indices[begin : begin + CHUNK]
        lengths = columns.lengths(docs)
        if objective == "pretrain":
            extra += int(np.maximum(-(-lengths // S) - 1, 0).sum())
        elif objective == "dpo" and packing["mode"] != "separate":
            if packing["share_prompt"]:  # a group's cost is its length: only the longer ones can split
                longer = lengths > S
                docs, lengths = docs[longer], lengths[longer]
            offsets, response_lengths, _, prompt, cost, _ = _preference_costs(
                columns, docs, lengths, packing["mode"], packing["share_prompt"]
            )
            for k in np.flatnonzero(cost > S):
                starts = split_group(
                    int(prompt[k]), response_lengths[offsets[k] : offsets[k + 1]], S, packing["share_prompt"]
                )
                extra += 0 if starts is None else len(starts) - 1
    return extra


def fit_length(dataset, indices: np.ndarray, packing: dict) -> int:
    """The shortest `sequence_length` that drops none of the documents `indices`: a pretraining document is cut
    into pieces (any length fits), an SFT document must fit whole, and a preference group needs its prompt with
    its longest response (longer groups are split)."""
    if packing["objective"] == "pretrain" or not len(indices):
        return 0
    columns, longest = Columns(dataset, packing["objective"]), 0
    for begin in range(0, len(indices), CHUNK):
        docs = np.asarray(indices[begin : begin + CHUNK], np.int64)
        lengths = columns.lengths(docs)
        if packing["objective"] == "sft":
            longest = max(longest, int(window_items(columns, docs, packing, 1 << 62).cost.max()))
            continue
        offsets, response_lengths, _, prompt = columns.responses(docs, lengths)
        alone = prompt + np.maximum.reduceat(response_lengths, offsets[:-1])  # (n,)
        longest = max(longest, int(alone.max()))
    return longest
