"""Epoch plans of a mixed run: datasets of different objectives (pretrain, sft, dpo) packed into the same rows.

Each source draws its documents as in a single-objective plan (`plan._draw`, the same seeded draw), and its items
are what its own objective makes of them (`plan_items.window_items`: pretraining pieces, SFT documents, preference
groups with their prompt). A window takes a proportional slice of every source, so each window packs pretraining
pieces, SFT documents and preference groups together with one best fit; the rows of all windows are shuffled
together. Groups longer than a row fill wide rows of their own, as in a preference plan. Per row, the counts gain
two columns (`MIXED_COUNTS`): the pretraining and the SFT targets, so that each objective's loss is divided by its
own global count, read from the plan on every rank without communication.

Trade-off: the planned items are gathered per window and joined at the end (one extra copy of the items, ~4-8
bytes a document, against the single-objective planner's in-place regions); pairs share rows with other documents
only in `packed` mode, which is the one a mixed run accepts.
"""

from __future__ import annotations

import numpy as np

from unitrain.data.epoch.plan import PackingPlan, _draw
from unitrain.data.epoch.plan_items import COUNTS, Columns, window_items
from unitrain.data.epoch.ranking import check_mode
from unitrain.data.epoch.rules import check_kind, check_options
from unitrain.errors import UnitrainError

MIXED_COUNTS = COUNTS + ("lm_targets", "sft_targets")


def build_mixed_plan(
    sources,
    objectives: list[str],
    *,
    mode: str,
    share_prompt: bool,
    sequence_length: int,
    group_pairs: str = "best_vs_rest",
    window: int | None = None,
    rng: np.random.Generator | None = None,
    progress: bool = False,
) -> PackingPlan:
    """Plan `sources` (a list of `(dataset, indices, wanted, offset)`, as `plan.build_plan`), source k trained by
    `objectives[k]`. Without `rng` the documents are `indices` in order and the rows stay in packing order."""
    S = int(sequence_length)
    check_mode(group_pairs)
    for objective in objectives:
        check_options(objective, mode, S)
    if mode != "packed" and "dpo" in objectives:
        raise UnitrainError(f"a mixed plan packs pairs with other documents: mode must be packed, not {mode}")
    if len(objectives) != len(sources):
        raise UnitrainError(f"{len(sources)} sources but {len(objectives)} objectives")
    columns, drawn = [], []
    for (dataset, indices, wanted, _), objective in zip(sources, objectives):
        check_kind(dataset, objective)
        columns.append(Columns(dataset, objective))
        docs = np.empty(wanted, np.int64)
        if rng is None:
            docs[:] = indices
        elif wanted:
            _draw(rng, np.asarray(indices, np.int64), wanted, docs)
        drawn.append(docs)
    total = sum(len(docs) for docs in drawn)
    windows = max(1, -(-total // window)) if window else 1
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit=" documents", desc="planning epoch", leave=False)
    items, parts, sizes, counts = [], [], [], []
    tokens = dropped = batch_rows = 0
    for w in range(windows):
        window_docs, window_parts, costs, window_counts, wide = [], [], [], [], []
        for (_, _, _, offset), objective, source_columns, docs in zip(sources, objectives, columns, drawn):
            begin, end = len(docs) * w // windows, len(docs) * (w + 1) // windows
            if begin == end:
                continue
            packing = dict(objective=objective, mode=mode, share_prompt=share_prompt, group_pairs=group_pairs)
            got = window_items(source_columns, docs[begin:end], packing, S)
            tokens += got.tokens
            dropped += got.dropped
            window_docs.append(got.document + offset)
            window_parts.append(np.zeros(len(got.cost), np.int64) if got.part is None else got.part)
            costs.append(got.cost)
            window_counts.append(_with_objective_columns(got.counts, objective))
            wide += [(document + offset, pieces, c) for document, pieces, c in got.wide]
            if bar is not None:
                bar.update(end - begin)
        if not costs:
            continue
        cost = np.concatenate(costs).astype(np.int64)
        order, row_sizes = np.empty(len(cost), np.int64), np.empty(len(cost), np.int64)
        from unitrain.data.epoch.plan_kernel import pack_window

        rows = pack_window(cost, S, False, order, row_sizes)
        items.append(np.concatenate(window_docs)[order])
        parts.append(np.concatenate(window_parts)[order])
        row_sizes = row_sizes[:rows]
        starts = np.cumsum(row_sizes) - row_sizes
        item_counts = np.concatenate(window_counts)[order]
        row_counts = np.zeros((rows, len(MIXED_COUNTS)), np.int64)
        if rows and len(item_counts):
            row_counts = np.add.reduceat(item_counts, starts, axis=0)
        sizes.append(row_sizes)
        counts.append(row_counts)
        batch_rows += rows
        for document, pieces, group_counts in wide:  # a split group: its parts fill a wide row
            items.append(np.full(pieces, document, np.int64))
            parts.append(np.arange(1, pieces + 1))
            sizes.append(np.array([pieces]))
            counts.append(_with_objective_columns(np.asarray(group_counts)[None], "dpo"))
            batch_rows += pieces
    if bar is not None:
        bar.close()
    return _plan(items, parts, sizes, counts, rng, S, dropped, tokens, batch_rows, sources)


def _with_objective_columns(counts: np.ndarray, objective: str) -> np.ndarray:
    """(m, 4) item counts → (m, 6): the targets also under the pretraining or the SFT column."""
    wider = np.zeros((len(counts), len(MIXED_COUNTS)), np.int64)
    wider[:, : len(COUNTS)] = counts
    if objective != "dpo":
        wider[:, MIXED_COUNTS.index("lm_targets" if objective == "pretrain" else "sft_targets")] = counts[
            :, 1
        ]
    return wider


def _plan(items, parts, sizes, counts, rng, S, dropped, tokens, batch_rows, sources) -> PackingPlan:
    ids = max((offset + len(dataset) for dataset, _, _, offset in sources), default=0)
    item_document = np.concatenate(items or [np.zeros(0, np.int64)]).astype(
        np.int32 if ids < 1 << 31 else np.int64
    )
    item_part = np.concatenate(parts or [np.zeros(0, np.int64)]).astype(np.int32)
    row_items = np.concatenate(sizes or [np.zeros(0, np.int64)]).astype(np.int32)
    row_counts = np.concatenate(counts or [np.zeros((0, len(MIXED_COUNTS)), np.int64)]).astype(np.int32)
    row_start = np.cumsum(row_items, dtype=np.int64) - row_items
    if rng is not None:
        order = rng.permutation(len(row_items))
        row_items, row_counts, row_start = row_items[order], row_counts[order], row_start[order]
    return PackingPlan(
        item_document=item_document,
        item_part=item_part if item_part.any() else None,
        row_start=row_start,
        row_items=row_items,
        row_counts=row_counts,
        sequence_length=S,
        dropped=dropped,
        num_tokens=tokens,
        num_slots=S * batch_rows,
    )
