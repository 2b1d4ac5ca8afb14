"""Documents and preference pairs → rows of at most `sequence_length` token slots → PackedBatch.

`data/plan.py` decides which items share a row (best-fit decreasing: deterministic, and it leaves almost no empty
slots because many short items fill the gaps the long ones leave); `collate` turns planned rows into one
PackedBatch, reading only the documents of those rows. The trade-off: planning costs one pass over the item
lengths (and, for preference or SFT data, the spans) before training, and in exchange every objective and every
preference layout shares one batch type whose targets carry explicit predicting positions, so the model never
sees padding and no token is computed twice.

Item lengths (slots used in a row):
  pretrain    a document split into pieces of at most `sequence_length` tokens; each piece is its own document
  sft         prompt+chosen for preference data, else the whole document; longer than a row → dropped, counted
  dpo         share_prompt: prompt + chosen + rejected; otherwise 2·prompt + chosen + rejected (prompt duplicated);
              mode `separate` puts prompt+chosen and prompt+rejected in two batch rows of their own (as TRL), so
              a planned row holds one pair and becomes two batch rows
A preference pair is never split across rows; one that cannot fit is dropped and counted (truncate in
`unitrain prepare --max-length`, which sees the text).
"""

from __future__ import annotations

import numpy as np
import torch

from unitrain.data.batch import (
    RESPONSE_CHOSEN,
    RESPONSE_REJECTED,
    SEGMENT_CHOSEN,
    SEGMENT_PAD,
    SEGMENT_PLAIN,
    SEGMENT_PROMPT,
    SEGMENT_REJECTED,
    PackedBatch,
)
from unitrain.data.sample import GPTSample
from unitrain.errors import UnitrainError

OBJECTIVES = ("pretrain", "sft", "dpo")
MODES = ("separate", "pair", "packed")


def check_options(objective: str, mode: str, sequence_length: int) -> None:
    if objective not in OBJECTIVES:
        raise UnitrainError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if mode not in MODES:
        raise UnitrainError(f"packing mode must be one of {', '.join(MODES)}, got {mode!r}")
    if sequence_length < 2:
        raise UnitrainError(f"sequence_length must be at least 2, got {sequence_length}")


def check_kind(dataset, objective: str) -> None:
    kind = dataset.kind
    if objective == "dpo" and kind != "preference":
        raise UnitrainError(f"objective dpo needs a preference dataset, got a {kind} dataset")
    if objective == "pretrain" and kind == "preference":
        raise UnitrainError("objective pretrain needs a pretraining or sft dataset, got a preference dataset")


def sft_targets(sample: GPTSample) -> tuple[np.ndarray, int]:
    """Indices (in the SFT document) of the tokens trained on, and the document length."""
    if sample.is_preference:
        prompt_length, length = sample.chosen_span
        return np.arange(max(prompt_length, 1), length), length
    length = len(sample.token_ids)
    keep = np.ones(length, dtype=bool)
    keep[0] = False  # the first token has no context to predict it from
    if sample.loss_masking_spans is not None:
        for begin, end in sample.loss_masking_spans:
            keep[begin:end] = False
    return np.flatnonzero(keep), length


class _RowBuilder:
    """Accumulates the slots and targets of one row; positions are row-local until the batch is assembled."""

    def __init__(self) -> None:
        self.tokens: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.documents: list[np.ndarray] = []
        self.segments: list[np.ndarray] = []
        self.length = 0
        self.num_documents = 0
        self.targets: list[tuple[np.ndarray, np.ndarray, int, int]] = []  # tokens, slots, pair, response

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

    def target(self, tokens: np.ndarray, slots: np.ndarray, pair: int = -1, response: int = -1) -> None:
        self.targets.append(
            (np.asarray(tokens, dtype=np.int64), np.asarray(slots, dtype=np.int64), pair, response)
        )


def _add_response(
    row: _RowBuilder,
    response: np.ndarray,
    segment: int,
    document: int,
    last_prompt: int,
    prompt_length: int,
    pair: int,
    kind: int,
) -> None:
    start = row.add(response, np.arange(prompt_length, prompt_length + len(response)), segment, document)
    # the first response token is predicted by the last prompt slot, the others by the slot before them
    slots = np.concatenate([[last_prompt], np.arange(start, start + len(response) - 1)])
    row.target(response, slots, pair, kind)


def _add_pair(row: _RowBuilder, sample: GPTSample, pair: int, share_prompt: bool) -> None:
    prompt, chosen, rejected = sample.prompt_ids, sample.chosen_ids, sample.rejected_ids
    positions = np.arange(len(prompt))
    document = row.new_document()
    last = row.add(prompt, positions, SEGMENT_PROMPT, document) + len(prompt) - 1
    _add_response(row, chosen, SEGMENT_CHOSEN, document, last, len(prompt), pair, RESPONSE_CHOSEN)
    if not share_prompt:
        document = row.new_document()
        last = row.add(prompt, positions, SEGMENT_PROMPT, document) + len(prompt) - 1
    _add_response(row, rejected, SEGMENT_REJECTED, document, last, len(prompt), pair, RESPONSE_REJECTED)


def _add_document(row: _RowBuilder, sample: GPTSample, begin: int, end: int, objective: str) -> None:
    document = row.new_document()
    if objective == "pretrain":
        tokens = sample.token_ids[begin:end]
        start = row.add(tokens, np.arange(len(tokens)), SEGMENT_PLAIN, document)
        row.target(tokens[1:], np.arange(start, start + len(tokens) - 1))
        return
    keep, length = sft_targets(sample)
    start = row.add(sample.token_ids[:length], np.arange(length), SEGMENT_PLAIN, document)
    row.target(sample.token_ids[keep], start + keep - 1)


def read_rows(plan, rows, sample_of) -> list[list[tuple]]:
    """Rows `rows` of a plan as lists of `(sample, document, begin, end)` items, `sample_of(document)` reading
    each sample; `begin, end` is the token range of a pretraining piece (the whole document otherwise)."""
    read = []
    for r in rows:
        items = []
        for document, part in plan.row(r):
            sample = sample_of(document)
            begin = part * plan.sequence_length
            items.append((sample, document, begin, min(begin + plan.sequence_length, len(sample.token_ids))))
        read.append(items)
    return read


def collate(dataset, plan, rows, *, objective: str, mode: str, share_prompt: bool) -> PackedBatch:
    """Rows `rows` (row numbers) of a plan of `dataset` → one PackedBatch (rows padded to the longest; two batch
    rows per row in `separate`)."""
    read = read_rows(plan, rows, lambda document: dataset[document])
    return collate_samples(read, objective=objective, mode=mode, share_prompt=share_prompt)


def collate_samples(rows, *, objective: str, mode: str, share_prompt: bool) -> PackedBatch:
    """Like `collate`, from rows of `(sample, pair index, begin, end)` items already read (from any dataset)."""
    builders: list[_RowBuilder] = []
    pair_index: list[int] = []
    for items in rows:
        if objective != "dpo":
            builders.append(_RowBuilder())
            for sample, _, begin, end in items:
                _add_document(builders[-1], sample, begin, end, objective)
            continue
        if mode != "separate":
            builders.append(_RowBuilder())
        for sample, index, _, _ in items:
            pair = len(pair_index)
            pair_index.append(index)
            if mode == "separate":
                chosen_row, rejected_row = _RowBuilder(), _RowBuilder()
                _add_pair_separate(chosen_row, rejected_row, sample, pair)
                builders += [chosen_row, rejected_row]
            else:
                _add_pair(builders[-1], sample, pair, share_prompt)
    return _assemble(builders, pair_index)


def _add_pair_separate(
    chosen_row: _RowBuilder, rejected_row: _RowBuilder, sample: GPTSample, pair: int
) -> None:
    prompt = sample.prompt_ids
    for row, response, segment, kind in (
        (chosen_row, sample.chosen_ids, SEGMENT_CHOSEN, RESPONSE_CHOSEN),
        (rejected_row, sample.rejected_ids, SEGMENT_REJECTED, RESPONSE_REJECTED),
    ):
        document = row.new_document()
        last = row.add(prompt, np.arange(len(prompt)), SEGMENT_PROMPT, document) + len(prompt) - 1
        _add_response(row, response, segment, document, last, len(prompt), pair, kind)


def _assemble(builders: list[_RowBuilder], pair_index: list[int]) -> PackedBatch:
    num_rows = len(builders)
    width = max((row.length for row in builders), default=0)
    input_ids = np.zeros((num_rows, width), dtype=np.int64)
    position_ids = np.zeros((num_rows, width), dtype=np.int64)
    document_id = np.full((num_rows, width), -1, dtype=np.int64)
    segment = np.full((num_rows, width), SEGMENT_PAD, dtype=np.int64)
    target_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for r, row in enumerate(builders):
        if row.length:
            input_ids[r, : row.length] = np.concatenate(row.tokens)
            position_ids[r, : row.length] = np.concatenate(row.positions)
            document_id[r, : row.length] = np.concatenate(row.documents)
            segment[r, : row.length] = np.concatenate(row.segments)
        for tokens, slots, pair, response in row.targets:
            count = len(tokens)
            target_parts.append(
                (
                    tokens,
                    r * width + slots,
                    np.full(count, pair, np.int64),
                    np.full(count, response, np.int64),
                )
            )
    columns = [np.concatenate(part) if target_parts else np.zeros(0, np.int64) for part in zip(*target_parts)]
    if not columns:
        columns = [np.zeros(0, np.int64)] * 4
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),  # (R, T)
        position_ids=torch.from_numpy(position_ids),  # (R, T)
        document_id=torch.from_numpy(document_id),  # (R, T)
        segment=torch.from_numpy(segment),  # (R, T)
        target_tokens=torch.from_numpy(columns[0]),  # (N,)
        target_positions=torch.from_numpy(columns[1]),  # (N,) flat r * T + t
        target_pair=torch.from_numpy(columns[2]),  # (N,)
        target_response=torch.from_numpy(columns[3]),  # (N,)
        pair_index=torch.tensor(pair_index, dtype=torch.int64),  # (P,)
    )
