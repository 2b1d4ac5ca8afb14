"""Epoch plans as a few flat arrays: which items share a row, the rows' order, and each row's counts.

A plan is `item_document` (M,) int32, int64 past 2³¹ documents (a document id, offset by the sizes of the
sources before its own), `item_part` (M,) int32 or None (piece k of a pretraining document = tokens
[k·S, min((k+1)·S, L)); part p ≥ 1 of a preference group split over a wide row; None when every item is whole),
and per row `row_start` (R,) int64 into the items, `row_items` (R,) int32 and `row_counts` (R, 4) int32
(`plan_items.COUNTS`: pairs, targets, chosen-response targets, groups: a step's global counts are a sum over a
slice, known on every rank without communication). No Python object per document or row: 10⁸ documents cost
~10 bytes each (the plan file of a pretraining epoch), and a step reads a slice.

Packing is exact best-fit decreasing (`plan_kernel.pack_window`) inside windows of `window` consecutive
documents of the shuffled order; rows never span two windows. The trade-off: the only slots lost to windowing are
the last rows of each window (measured: docs/BENCHMARKS.md), and in exchange the cost is linear in the documents,
the memory is bounded by the window, and the order stays random across the whole epoch (rows of all windows and
sources are shuffled together). A window that covers the epoch gives today's whole-epoch best fit exactly.

Item costs (slots used in a row) are computed vectorized per window from the dataset's columns
(`document_lengths`, `preference_spans`, `group_columns`, `sft_target_counts`) in `plan_items.py`; see
`rules.py` for what each objective puts in a row. A preference group longer than a row fills a wide row of its
own (one batch row per part), placed after the packed rows of its window and shuffled with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unitrain.data.epoch.plan_items import COUNTS, Columns, extra_items, window_items
from unitrain.data.epoch.ranking import check_mode
from unitrain.data.epoch.rules import check_kind, check_options

CHUNK = 1 << 20  # items per slice when moving a source's planned items down over a gap (bounded scratch)


@dataclass
class PackingPlan:
    """Rows planned for one pass or one epoch, in their final order (see the module docstring)."""

    item_document: np.ndarray  # (M,) int32 (int64 when the ids reach 2³¹)
    item_part: np.ndarray | None  # (M,) int32, or None: every item is a whole document (part 0)
    row_start: np.ndarray  # (R,) int64 first item of each row in `item_document`
    row_items: np.ndarray  # (R,) int32 items in each row
    row_counts: np.ndarray  # (R, 4) int32 pairs, targets, chosen-response targets, groups
    sequence_length: int
    dropped: int  # documents (or groups with a response) longer than a row, left out
    num_tokens: int  # real tokens in all rows
    num_slots: (
        int  # batch-row slots counted at sequence_length (a `separate` or wide row is several batch rows)
    )

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


@dataclass
class _SourceRows:
    sizes: list  # per window: (rows,) int32 items per row
    counts: list  # per window: (rows, 4) int32
    written: int
    dropped: int
    tokens: int
    batch_rows: int  # rows of the PackedBatches these plan rows become


def _plan_source(columns, region, parts, count, *, offset, packing, S, window, bar) -> _SourceRows:
    """Pack the `count` documents at the end of `region` window by window, writing the items (global ids) from
    the start of `region`. The writes never overtake the reads: `region` has room for every extra item (pieces,
    parts of split groups)."""
    from unitrain.data.epoch.plan_kernel import pack_window

    one_per_row = packing["objective"] == "dpo" and packing["mode"] in ("pair", "separate")
    read, write = len(region) - count, 0
    result = _SourceRows([], [], 0, 0, 0, 0)
    for begin in range(0, count, window):
        docs = region[read + begin : read + min(begin + window, count)].copy()  # (n,) before writes reach it
        items = window_items(columns, docs, packing, S)
        order, sizes = np.empty(len(items.cost), np.int64), np.empty(len(items.cost), np.int64)
        rows = pack_window(items.cost, S, one_per_row, order, sizes)
        region[write : write + len(order)] = items.document[order] + offset
        if parts is not None:
            parts[write : write + len(order)] = 0 if items.part is None else items.part[order]
        write += len(order)
        starts = np.cumsum(sizes[:rows]) - sizes[:rows]
        counts = np.zeros((rows, len(COUNTS)), np.int32)
        for c in range(len(COUNTS)):
            if rows and items.counts[:, c].any():
                counts[:, c] = np.add.reduceat(items.counts[order, c], starts)
        result.batch_rows += rows if items.batch_rows is None else int(items.batch_rows.sum())
        result.sizes.append(sizes[:rows].astype(np.int32))
        result.counts.append(counts)
        for document, pieces, _ in items.wide:  # a split group: its parts fill a wide row
            region[write : write + pieces] = document + offset
            parts[write : write + pieces] = np.arange(1, pieces + 1)
            write += pieces
            result.batch_rows += pieces
        if items.wide:
            result.sizes.append(np.array([pieces for _, pieces, _ in items.wide], np.int32))
            result.counts.append(
                np.stack([group_counts for _, _, group_counts in items.wide]).astype(np.int32)
            )
        result.tokens += items.tokens
        result.dropped += items.dropped
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
    group_pairs: str = "best_vs_rest",
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
    check_mode(group_pairs)
    packing = dict(objective=objective, mode=mode, share_prompt=share_prompt, group_pairs=group_pairs)
    S = int(sequence_length)
    columns, regions, total = [], [], 0
    for dataset, indices, wanted, _ in sources:
        check_kind(dataset, objective)
        columns.append(Columns(dataset, objective))
        repeats = -(-wanted // len(indices)) if len(indices) else 0
        extra = repeats * extra_items(columns[-1], np.asarray(indices, np.int64), packing, S)
        regions.append((total, wanted + extra, wanted))
        total += wanted + extra
    ids = max((offset + len(dataset) for dataset, _, _, offset in sources), default=0)
    items = np.empty(total, np.int32 if ids < 1 << 31 else np.int64)  # drawn ids, then the planned items
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
    # The rows' arrays are joined and shuffled one (column) at a time, each window's pieces let go once copied:
    # the peak stays near one copy of the rows plus one column (about 40 bytes a row).
    counts = np.concatenate(
        [c for _, rows in planned for c in rows.counts] or [np.zeros((0, len(COUNTS)), np.int32)]
    )
    for _, rows in planned:
        rows.counts.clear()
    sizes = np.concatenate([s for _, rows in planned for s in rows.sizes] or [np.zeros(0, np.int32)])
    for _, rows in planned:
        rows.sizes.clear()
    starts = np.cumsum(sizes, dtype=np.int64)
    starts -= sizes
    if rng is not None:
        order = np.arange(len(sizes), dtype=np.int32 if len(sizes) < 1 << 31 else np.int64)
        rng.shuffle(order)  # `rng.permutation(len(sizes))`, without its int64 copy
        sizes = sizes[order]
        for c in range(len(COUNTS)):
            counts[:, c] = counts[order, c]
        starts = starts[order]
        del order
    return PackingPlan(
        item_document=items[:write],
        item_part=None if parts is None else parts[:write],
        row_start=starts,
        row_items=sizes,
        row_counts=counts,
        sequence_length=S,
        dropped=sum(rows.dropped for _, rows in planned),
        num_tokens=sum(rows.tokens for _, rows in planned),
        num_slots=S * sum(rows.batch_rows for _, rows in planned),
    )


def plan_rows(
    dataset,
    indices,
    *,
    objective: str,
    mode: str,
    share_prompt: bool,
    sequence_length: int,
    group_pairs: str = "best_vs_rest",
    window: int | None = None,
) -> PackingPlan:
    """Pack the documents `indices` (in the caller's order, which breaks ties) into rows, best-fit decreasing.

    Modes `pair` and `separate` put one group (pair) per row; `packed` and the pretrain/sft objectives fill rows.
    `efficiency` = real tokens / (batch-row slots counted at `sequence_length`: one batch row per response in
    `separate`, one per part of a split group). Rows are in the order the packer opened them (largest items
    first), then the wide rows of split groups.
    """
    indices = np.asarray(indices, dtype=np.int64)
    return build_plan(
        [(dataset, indices, len(indices), 0)],
        objective=objective,
        mode=mode,
        share_prompt=share_prompt,
        sequence_length=sequence_length,
        group_pairs=group_pairs,
        window=window,
    )
