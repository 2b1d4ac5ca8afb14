"""Epoch plans as a few flat arrays: which items share a row, the rows' order, and each row's counts.

A plan is `item_document` (M,) int64 (a document id, offset by the sizes of the sources before its own),
`item_part` (M,) int32 or None (piece k of a pretraining document = tokens [k·S, min((k+1)·S, L)); None when
every item is piece 0), and per row `row_start` (R,) int64 into the items, `row_items` (R,) int32 and
`row_counts` (R, 3) int32 (pairs, targets, chosen-response targets: a step's global counts are a sum over a
slice, known on every rank without communication). No Python object per document or row: 10⁸ documents cost
~14 bytes each (the plan file of a pretraining epoch), and a step reads a slice.

Packing is exact best-fit decreasing (`plan_kernel.pack_window`) inside windows of `window` consecutive
documents of the shuffled order; rows never span two windows. The trade-off: the only slots lost to windowing are
the last rows of each window (measured: docs/BENCHMARKS.md), and in exchange the cost is linear in the documents,
the memory is bounded by the window, and the order stays random across the whole epoch (rows of all windows and
sources are shuffled together). A window that covers the epoch gives today's whole-epoch best fit exactly.

Item costs (slots used in a row) are computed vectorized per window from the dataset's columns
(`document_lengths`, `preference_spans`, `sft_target_counts`); see `packing.py` for what each objective puts in a
row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unitrain.data.packing import check_kind, check_options
from unitrain.errors import UnitrainError

CHUNK = 1 << 20  # documents per vectorized pass where only a sum is needed


@dataclass
class PackingPlan:
    """Rows planned for one pass or one epoch, in their final order (see the module docstring)."""

    item_document: np.ndarray  # (M,) int64
    item_part: np.ndarray | None  # (M,) int32, or None: every item is a whole document (part 0)
    row_start: np.ndarray  # (R,) int64 first item of each row in `item_document`
    row_items: np.ndarray  # (R,) int32 items in each row
    row_counts: np.ndarray  # (R, 3) int32 pairs, targets, chosen-response targets
    sequence_length: int
    dropped: int  # documents/pairs longer than a row, left out
    num_tokens: int  # real tokens in all rows
    num_slots: int  # row slots counted at sequence_length (two batch rows per row in `separate`)

    def __len__(self) -> int:
        return len(self.row_start)

    @property
    def efficiency(self) -> float:
        return self.num_tokens / self.num_slots if self.num_slots else 0.0

    def row(self, r: int) -> list[tuple[int, int]]:
        """The `(document, part)` items of row `r`, in the order `collate` lays them out."""
        start, count = int(self.row_start[r]), int(self.row_items[r])
        documents = self.item_document[start : start + count].tolist()
        parts = [0] * count if self.item_part is None else self.item_part[start : start + count].tolist()
        return list(zip(documents, parts))


class _Columns:
    """One dataset's per-document columns the costs need (lazy on the memmap reader, which reads lengths
    straight from its mapped offsets)."""

    def __init__(self, dataset, objective: str) -> None:
        self.dataset = dataset
        self.preference = dataset.preference_spans if dataset.kind == "preference" else None  # (N, 2)
        self.sft_targets = (
            dataset.sft_target_counts if objective == "sft" and self.preference is None else None
        )

    def lengths(self, docs: np.ndarray) -> np.ndarray:
        """Lengths (n,) int64 of the documents `docs`."""
        read = getattr(self.dataset, "lengths_of", None)
        return read(docs) if read is not None else self.dataset.document_lengths[docs].astype(np.int64)


def _window_items(columns: _Columns, docs: np.ndarray, objective: str, mode: str, share_prompt: bool, S: int):
    """Items of the documents `docs` (in order): (document, part or None, cost, pairs, targets, chosen, tokens)."""
    lengths = columns.lengths(docs)
    zeros = np.zeros(len(docs), np.int64)
    if objective == "pretrain":
        if (lengths <= S).all():
            kept = lengths > 0  # an empty document has no piece
            docs, lengths = (docs, lengths) if kept.all() else (docs[kept], lengths[kept])
            zeros = np.zeros(len(docs), np.int64)
            return docs, None, lengths, zeros, lengths - 1, zeros, lengths
        pieces = -(-lengths // S)  # (n,)
        first = np.cumsum(pieces) - pieces
        part = np.arange(int(pieces.sum())) - np.repeat(first, pieces)  # (m,)
        cost = np.minimum(S, np.repeat(lengths, pieces) - part * S)
        zeros = np.zeros(len(cost), np.int64)
        return np.repeat(docs, pieces), part, cost, zeros, cost - 1, zeros, cost
    if columns.preference is None:  # sft on an sft or pretraining dataset: the whole document
        return docs, None, lengths, zeros, columns.sft_targets[docs].astype(np.int64), zeros, lengths
    spans = columns.preference[docs].astype(np.int64)  # (n, 2) chosen begin, rejected begin
    prompt, chosen, rejected = spans[:, 0], spans[:, 1] - spans[:, 0], lengths - spans[:, 1]
    if objective == "sft":  # prompt + chosen, trained on chosen
        return docs, None, spans[:, 1], zeros, spans[:, 1] - np.maximum(prompt, 1), zeros, spans[:, 1]
    if (prompt == 0).any():
        raise UnitrainError(
            f"pair {int(docs[np.argmax(prompt == 0)])}: empty prompt, so nothing predicts the first response "
            "token (prepare with a BOS token)"
        )
    duplicated = mode == "separate" or not share_prompt
    tokens = prompt + chosen + rejected + (prompt if duplicated else 0)
    cost = prompt + np.maximum(chosen, rejected) if mode == "separate" else tokens  # separate: its longer row
    return docs, None, cost, np.ones(len(docs), np.int64), chosen + rejected, chosen, tokens


def _extra_pieces(columns: _Columns, indices: np.ndarray, S: int) -> int:
    """Pieces beyond the first of the documents `indices` (pretraining splits a document longer than S)."""
    extra = 0
    for begin in range(0, len(indices), CHUNK):
        chunk = columns.lengths(indices[begin : begin + CHUNK])
        extra += int(np.maximum(-(-chunk // S) - 1, 0).sum())
    return extra


@dataclass
class _SourceRows:
    sizes: list  # per window: (rows,) int32 items per row
    counts: list  # per window: (rows, 3) int32
    written: int
    dropped: int
    tokens: int


def _plan_source(columns, region, parts, count, *, offset, packing, S, window, bar) -> _SourceRows:
    """Pack the `count` documents at the end of `region` window by window, writing the items (global ids) from
    the start of `region`. The writes never overtake the reads: `region` has room for every extra piece."""
    from unitrain.data.plan_kernel import pack_window

    objective, mode, share_prompt = packing["objective"], packing["mode"], packing["share_prompt"]
    one_per_row = objective == "dpo" and mode in ("pair", "separate")
    read, write = len(region) - count, 0
    result = _SourceRows([], [], 0, 0, 0)
    for begin in range(0, count, window):
        docs = region[read + begin : read + min(begin + window, count)].copy()  # (n,) before writes reach it
        item_doc, item_part, cost, *columns_of_rows, tokens = _window_items(
            columns, docs, objective, mode, share_prompt, S
        )
        fits = cost <= S
        if not fits.all():
            result.dropped += int((~fits).sum())
            keep = np.flatnonzero(fits)
            item_doc, cost, tokens = item_doc[keep], cost[keep], tokens[keep]
            item_part = None if item_part is None else item_part[keep]
            columns_of_rows = [column[keep] for column in columns_of_rows]
        order, sizes = np.empty(len(cost), np.int64), np.empty(len(cost), np.int64)
        rows = pack_window(cost, S, one_per_row, order, sizes)
        region[write : write + len(order)] = item_doc[order] + offset
        if parts is not None:
            parts[write : write + len(order)] = 0 if item_part is None else item_part[order]
        starts = np.cumsum(sizes[:rows]) - sizes[:rows]
        counts = np.zeros((rows, 3), np.int32)
        for c, column in enumerate(columns_of_rows):
            if rows and column.any():
                counts[:, c] = np.add.reduceat(column[order], starts)
        result.sizes.append(sizes[:rows].astype(np.int32))
        result.counts.append(counts)
        result.tokens += int(tokens.sum())
        write += len(order)
        if bar is not None:
            bar.update(len(docs))
    result.written = write
    return result


def _draw(rng, indices: np.ndarray, wanted: int, out: np.ndarray) -> None:
    """`out[:] = concatenate([rng.permutation(indices) for each repeat])[:wanted]`, without the concatenation."""
    for begin in range(0, wanted, len(indices)):
        end = min(begin + len(indices), wanted)
        if end - begin == len(indices):
            out[begin:end] = indices
            rng.shuffle(out[begin:end])  # what `permutation` does to its own copy
        else:
            out[begin:end] = rng.permutation(indices)[: end - begin]


def build_plan(
    sources,
    *,
    objective: str,
    mode: str,
    share_prompt: bool,
    sequence_length: int,
    window: int | None = None,
    rng: np.random.Generator | None = None,
    progress: bool = False,
) -> PackingPlan:
    """Plan `sources`: a list of `(dataset, indices, wanted, offset)`.

    With `rng`, each source draws `wanted` documents as shuffled copies of `indices` (repeated when it wants more)
    and the rows of all sources are shuffled together at the end; without, the documents are `indices` in order
    (`wanted` = their count) and the rows stay in the order they were opened. `window=None` packs each source as
    one window.
    """
    check_options(objective, mode, sequence_length)
    packing = dict(objective=objective, mode=mode, share_prompt=share_prompt)
    S = int(sequence_length)
    columns, regions, total = [], [], 0
    for dataset, indices, wanted, _ in sources:
        check_kind(dataset, objective)
        columns.append(_Columns(dataset, objective))
        repeats = -(-wanted // len(indices)) if len(indices) else 0
        extra = repeats * _extra_pieces(columns[-1], indices, S) if objective == "pretrain" else 0
        regions.append((total, wanted + extra, wanted))
        total += wanted + extra
    items = np.empty(total, np.int64)
    any_parts = any(size > wanted for _, size, wanted in regions)
    parts = np.empty(total, np.int32) if any_parts else None
    for (_, indices, wanted, _), (base, size, _) in zip(sources, regions):
        tail = items[base + size - wanted : base + size]
        if rng is None:
            tail[:] = indices
        elif wanted:
            _draw(rng, np.asarray(indices, np.int64), wanted, tail)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(w for _, _, w in regions), unit=" documents", desc="planning epoch", leave=False)
    planned, write = [], 0
    for (_, _, _, offset), (base, size, wanted), source_columns in zip(sources, regions, columns):
        region = items[base : base + size]
        part_region = None if parts is None else parts[base : base + size]
        rows = _plan_source(
            source_columns, region, part_region, wanted, offset=offset, packing=packing, S=S,
            window=window or max(wanted, 1), bar=bar,
        )  # fmt: skip
        if base != write:  # close the gap left by dropped items and unused room (chunks: no full-size copy)
            for begin in range(0, rows.written, CHUNK):
                end = min(begin + CHUNK, rows.written)
                items[write + begin : write + end] = items[base + begin : base + end]
                if parts is not None:
                    parts[write + begin : write + end] = parts[base + begin : base + end]
        planned.append((write, rows))
        write += rows.written
    if bar is not None:
        bar.close()
    sizes = np.concatenate([s for _, rows in planned for s in rows.sizes] or [np.zeros(0, np.int32)])
    counts = np.concatenate([c for _, rows in planned for c in rows.counts] or [np.zeros((0, 3), np.int32)])
    for _, rows in planned:  # the per-window pieces are copied: let them go before the shuffle
        rows.sizes.clear()
        rows.counts.clear()
    starts = np.cumsum(sizes, dtype=np.int64) - sizes
    if rng is not None:  # one array at a time: the rows' peak memory stays near one copy
        order = rng.permutation(len(sizes))
        starts = starts[order]
        sizes = sizes[order]
        counts = counts[order]
        del order
    rows_total = len(sizes)
    batch_rows_per_row = 2 if objective == "dpo" and mode == "separate" else 1
    return PackingPlan(
        item_document=items[:write],
        item_part=None if parts is None else parts[:write],
        row_start=starts,
        row_items=sizes,
        row_counts=counts,
        sequence_length=S,
        dropped=sum(rows.dropped for _, rows in planned),
        num_tokens=sum(rows.tokens for _, rows in planned),
        num_slots=rows_total * S * batch_rows_per_row,
    )


def plan_rows(
    dataset,
    indices,
    *,
    objective: str,
    mode: str,
    share_prompt: bool,
    sequence_length: int,
    window: int | None = None,
) -> PackingPlan:
    """Pack the documents `indices` (in the caller's order, which breaks ties) into rows, best-fit decreasing.

    Modes `pair` and `separate` put one pair per row; `packed` and the pretrain/sft objectives fill rows.
    `efficiency` = real tokens / (row slots counted at `sequence_length`, two batch rows per row in `separate`).
    Rows are in the order the packer opened them (largest items first).
    """
    indices = np.asarray(indices, dtype=np.int64)
    return build_plan(
        [(dataset, indices, len(indices), 0)],
        objective=objective,
        mode=mode,
        share_prompt=share_prompt,
        sequence_length=sequence_length,
        window=window,
    )
