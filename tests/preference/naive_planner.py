"""The planner as it was before epoch plans became flat arrays: a Python loop over item tuples with a sorted
`(free, row id)` list searched by bisect, and the stream's seeded draw and row shuffle. Kept here, outside the
package, as the independent reference that the compiled, windowed planner must equal when its window covers the
epoch. Since pairs longer than a row are split rather than dropped, a pair whose responses each fit a row with the
prompt gets a wide row of its own after the packed rows (parts 1 and 2: prompt + chosen, prompt + rejected)."""

from __future__ import annotations

import bisect

import numpy as np

from unitrain.data.epoch.rules import sft_targets


def _item_costs(dataset, indices, objective, mode, share_prompt, sequence_length):
    """Per item: (document index, begin, end, row slots, pairs, targets, chosen targets, real tokens)."""
    items, wide = [], []
    if objective == "pretrain":
        for index in indices:
            length = int(dataset.document_lengths[index])
            for begin in range(0, length, sequence_length):
                end = min(begin + sequence_length, length)
                items.append((int(index), begin, end, end - begin, 0, end - begin - 1, 0, end - begin))
        return items, [False] * len(items)
    for index in indices:
        sample = dataset[int(index)]
        if objective == "sft":
            targets, length = sft_targets(sample)
            items.append((int(index), 0, length, length, 0, len(targets), 0, length))
            wide.append(False)
            continue
        prompt = sample.chosen_span[0]
        chosen = sample.chosen_span[1] - sample.chosen_span[0]
        rejected = sample.rejected_span[1] - sample.rejected_span[0]
        duplicated = mode == "separate" or not share_prompt
        tokens = prompt + chosen + rejected + (prompt if duplicated else 0)
        slots = prompt + max(chosen, rejected) if mode == "separate" else tokens
        items.append((int(index), 0, len(sample.token_ids), slots, 1, chosen + rejected, chosen, tokens))
        splittable = mode != "separate" and prompt + max(chosen, rejected) <= sequence_length
        wide.append(splittable and slots > sequence_length)
    return items, wide


def naive_plan_rows(dataset, indices, *, objective, mode, share_prompt, sequence_length):
    """→ (rows: list of (k, 3) int64 arrays of (document, begin, end), row_counts (R, 3), dropped, tokens, slots)."""
    items, wide = _item_costs(dataset, np.asarray(indices), objective, mode, share_prompt, sequence_length)
    fits = [item for item in items if item[3] <= sequence_length]
    one_per_row = objective == "dpo" and mode in ("pair", "separate")
    order = sorted(range(len(fits)), key=lambda k: -fits[k][3])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for k in order:
        size = fits[k][3]
        at = len(free) if one_per_row else bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row_id = free.pop(at)
            rows[row_id].append(k)
        else:
            room, row_id = sequence_length, len(rows)
            rows.append([k])
        if not one_per_row and room - size > 0:
            bisect.insort(free, (room - size, row_id))
    arrays = [np.array([fits[k][:3] for k in row], dtype=np.int64).reshape(-1, 3) for row in rows]
    counts = [[sum(fits[k][c] for k in row) for c in (4, 5, 6)] for row in rows]
    per_row = 2 if objective == "dpo" and mode == "separate" else 1
    slots, tokens = len(rows) * sequence_length * per_row, sum(item[7] for item in fits)
    split = [item for item, is_wide in zip(items, wide) if is_wide]
    for index, _, length, _, pairs, targets, chosen, _ in split:
        arrays.append(np.array([(index, 1, length), (index, 2, length)], dtype=np.int64))
        counts.append([pairs, targets, chosen])
        slots += 2 * sequence_length
        tokens += length + (length - targets)  # two copies of the prompt
    return (
        arrays,
        np.array(counts, np.int64).reshape(-1, 3),
        len(items) - len(fits) - len(split),
        tokens,
        slots,
    )


def naive_epoch(sources, *, seed, epoch, sequence_length, **packing):
    """`sources` as BatchStream takes them → rows [(source, (k, 3) items)] and counts (R, 3), shuffled."""
    rng = np.random.default_rng([seed, epoch])
    weights = np.array([float(w) for _, _, w in sources])
    weights = weights / weights.sum()
    total = sum(len(indices) for _, indices, _ in sources)
    rows, counts = [], []
    for source, ((dataset, indices, _), weight) in enumerate(zip(sources, weights)):
        indices = np.asarray(indices, np.int64)
        wanted = int(round(total * weight)) if len(sources) > 1 else len(indices)
        if wanted == 0 or len(indices) == 0:
            continue
        repeats = -(-wanted // len(indices))
        chosen = np.concatenate([rng.permutation(indices) for _ in range(repeats)])[:wanted]
        planned, row_counts, *_ = naive_plan_rows(dataset, chosen, sequence_length=sequence_length, **packing)
        rows += [(source, items) for items in planned]
        counts.append(row_counts)
    order = rng.permutation(len(rows))
    return [rows[k] for k in order], np.concatenate(counts)[order]
