"""Planned rows → one PackedBatch: the documents of those rows read, laid out slot by slot, with their targets.

`epoch/plan.py` decides which items share a row (best-fit decreasing: deterministic, and it leaves almost no empty
slots because many short items fill the gaps the long ones leave); `collate` turns planned rows into one
PackedBatch, reading only the documents of those rows, under the rules of `epoch/rules.py` (what SFT trains on,
where a split group's parts start). The trade-off: planning costs one pass over the item lengths (and, for
preference or SFT data, the spans) before training, and in exchange every objective and every preference layout
shares one batch type whose targets carry explicit predicting positions, so the model never sees padding and no
token is computed twice.
"""

from __future__ import annotations

import numpy as np
import torch

from unitrain.data.batch import (
    SEGMENT_PAD,
    SEGMENT_PLAIN,
    SEGMENT_PROMPT,
    SEGMENT_RESPONSE,
    PackedBatch,
)
from unitrain.data.epoch.ranking import check_mode, group_pairs
from unitrain.data.epoch.rules import sft_document, sft_targets, split_group
from unitrain.data.sample import GPTSample


class _RowBuilder:
    """Accumulates the slots and targets of one row; positions are row-local until the batch is assembled."""

    def __init__(self) -> None:
        self.tokens: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.documents: list[np.ndarray] = []
        self.segments: list[np.ndarray] = []
        self.length = 0
        self.num_documents = 0
        self.targets: list[tuple[np.ndarray, np.ndarray, int]] = []  # tokens, slots, batch-local response

    def add(self, tokens: np.ndarray, positions: np.ndarray, segment: int, document: int) -> int:
        start = self.length
        self.tokens.append(np.asarray(tokens, dtype=np.int64))
        self.positions.append(np.asarray(positions, dtype=np.int64))
        self.documents.append(np.full(len(tokens), document, dtype=np.int64))
        self.segments.append(np.full(len(tokens), segment, dtype=np.int64))
        self.length += len(tokens)
        return start

    def new_document(self) -> int:
        self.num_documents += 1
        return self.num_documents - 1

    def target(self, tokens: np.ndarray, slots: np.ndarray, response: int = -1) -> None:
        self.targets.append((np.asarray(tokens, dtype=np.int64), np.asarray(slots, dtype=np.int64), response))

    def add_prompt(self, prompt: np.ndarray) -> tuple[int, int]:
        """A new document starting with `prompt` → (document id, slot of the last prompt token)."""
        document = self.new_document()
        return document, self.add(prompt, np.arange(len(prompt)), SEGMENT_PROMPT, document) + len(prompt) - 1

    def add_response(self, response: np.ndarray, segment: int, document: int, last_prompt: int, prompt_length: int,
                     index: int) -> None:  # fmt: skip
        start = self.add(response, np.arange(prompt_length, prompt_length + len(response)), segment, document)
        # the first response token is predicted by the last prompt slot, the others by the slot before them
        slots = np.concatenate([[last_prompt], np.arange(start, start + len(response) - 1)])
        self.target(response, slots, index)


class _Responses:
    """The per-response, per-pair and per-group columns of a batch, filled group by group."""

    def __init__(self, group_pairs_mode: str) -> None:
        self.mode = group_pairs_mode
        self.group: list[np.ndarray] = []
        self.number: list[np.ndarray] = []
        self.score: list[np.ndarray] = []
        self.pairs: list[np.ndarray] = []
        self.group_index: list[int] = []
        self.count = 0

    def add_group(self, index: int, scores: np.ndarray) -> int:
        """Register a group (dataset index, its N scores) → the batch-local index of its first response."""
        base = self.count
        self.group.append(np.full(len(scores), len(self.group_index), np.int64))
        self.number.append(np.arange(len(scores), dtype=np.int64))
        self.score.append(np.asarray(scores, np.float32))
        self.pairs.append(group_pairs(scores, self.mode) + base)
        self.group_index.append(index)
        self.count += len(scores)
        return base


def _add_document(row: _RowBuilder, sample: GPTSample, begin: int, end: int, objective: str) -> None:
    document = row.new_document()
    if objective == "pretrain":
        tokens = sample.token_ids[begin:end]
        start = row.add(tokens, np.arange(len(tokens)), SEGMENT_PLAIN, document)
        row.target(tokens[1:], np.arange(start, start + len(tokens) - 1))
        return
    keep, length = sft_targets(sample)
    tokens = sft_document(sample)
    start = row.add(tokens, np.arange(length), SEGMENT_PLAIN, document)
    row.target(tokens[keep], start + keep - 1)


def _add_group(
    builders: list[_RowBuilder], sample: GPTSample, numbers: range, base: int, mode: str, share_prompt: bool
) -> None:
    """Responses `numbers` of a group with the prompt: into the last builder (one document; with `share_prompt`
    off, one document per response), or in `separate` mode one new builder per response (as TRL)."""
    prompt = sample.prompt_ids
    row = builders[-1] if mode != "separate" else None
    document = last = None
    for position, number in enumerate(numbers):
        if mode == "separate":
            row = _RowBuilder()
            builders.append(row)
        if document is None or mode == "separate" or not share_prompt:
            document, last = row.add_prompt(prompt)
        segment = SEGMENT_RESPONSE + (position if mode != "separate" and share_prompt else 0)
        row.add_response(sample.response_ids(number), segment, document, last, len(prompt), base + number)


def read_rows(plan, rows, sample_of) -> list[list[tuple]]:
    """Rows `rows` of a plan as lists of `(sample, document, part)` items, `sample_of(document)` reading each
    sample. `part` is a pretraining document's piece number, or for preference data 0 (the whole group) or
    p ≥ 1 (part p of a group split over several batch rows)."""
    return [[(sample_of(document), document, part) for document, part in plan.row(r)] for r in rows]


def collate(
    dataset, plan, rows, *, objective: str, mode: str, share_prompt: bool, group_pairs: str = "best_vs_rest"
) -> PackedBatch:
    """Rows `rows` (row numbers) of a plan of `dataset` → one PackedBatch (rows padded to the longest; in
    `separate` one batch row per response, and a split group one batch row per part)."""
    read = read_rows(plan, rows, lambda document: dataset[document])
    return collate_samples(
        read,
        objective=objective,
        mode=mode,
        share_prompt=share_prompt,
        group_pairs=group_pairs,
        sequence_length=plan.sequence_length,
    )


def collate_samples(
    rows,
    *,
    objective: str,
    mode: str,
    share_prompt: bool,
    group_pairs: str = "best_vs_rest",
    sequence_length: int,
) -> PackedBatch:
    """Like `collate`, from rows of `(sample, document index, part)` items already read (from any dataset);
    `sequence_length` is the planned row length, which places the parts of split groups."""
    check_mode(group_pairs)
    builders: list[_RowBuilder] = []
    responses = _Responses(group_pairs)
    for items in rows:
        if objective != "dpo":
            builders.append(_RowBuilder())
            for sample, _, part in items:
                begin = part * sequence_length
                end = min(begin + sequence_length, len(sample.token_ids))
                _add_document(builders[-1], sample, begin, end, objective)
            continue
        if mode != "separate":
            builders.append(_RowBuilder())
        split: tuple[int, int] | None = None  # (document, first response) of the group being split
        for sample, index, part in items:
            scores = sample.group_scores
            if part == 0:
                base = responses.add_group(index, scores)
                _add_group(builders, sample, range(len(scores)), base, mode, share_prompt)
                continue
            lengths = np.diff(sample.group_spans, axis=1)[:, 0]
            starts = split_group(len(sample.prompt_ids), lengths, sequence_length, share_prompt) + [
                len(scores)
            ]
            if split is None or split[0] != index:
                split = (index, responses.add_group(index, scores))
            if builders[-1].length:
                builders.append(_RowBuilder())
            _add_group(builders, sample, range(starts[part - 1], starts[part]), split[1], mode, share_prompt)
    return _assemble(builders, responses)


def _assemble(builders: list[_RowBuilder], responses: _Responses) -> PackedBatch:
    num_rows = len(builders)
    width = max((row.length for row in builders), default=0)
    input_ids = np.zeros((num_rows, width), dtype=np.int64)
    position_ids = np.zeros((num_rows, width), dtype=np.int64)
    document_id = np.full((num_rows, width), -1, dtype=np.int64)
    segment = np.full((num_rows, width), SEGMENT_PAD, dtype=np.int64)
    target_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for r, row in enumerate(builders):
        if row.length:
            input_ids[r, : row.length] = np.concatenate(row.tokens)
            position_ids[r, : row.length] = np.concatenate(row.positions)
            document_id[r, : row.length] = np.concatenate(row.documents)
            segment[r, : row.length] = np.concatenate(row.segments)
        for tokens, slots, response in row.targets:
            target_parts.append((tokens, r * width + slots, np.full(len(tokens), response, np.int64)))
    columns = [np.concatenate(part) for part in zip(*target_parts)] or [np.zeros(0, np.int64)] * 3

    def joined(parts: list[np.ndarray], dtype, shape=(0,)) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(shape, dtype))

    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),  # (R, T)
        position_ids=torch.from_numpy(position_ids),  # (R, T)
        document_id=torch.from_numpy(document_id),  # (R, T)
        segment=torch.from_numpy(segment),  # (R, T)
        target_tokens=torch.from_numpy(columns[0]),  # (N,)
        target_positions=torch.from_numpy(columns[1]),  # (N,) flat r * T + t
        target_response=torch.from_numpy(columns[2]),  # (N,)
        response_group=joined(responses.group, np.int64),  # (Rb,)
        response_number=joined(responses.number, np.int64),  # (Rb,)
        response_score=joined(responses.score, np.float32),  # (Rb,)
        pair_responses=joined(responses.pairs, np.int64, (0, 2)).reshape(-1, 2),  # (P, 2)
        group_index=torch.tensor(responses.group_index, dtype=torch.int64),  # (G,)
    )
