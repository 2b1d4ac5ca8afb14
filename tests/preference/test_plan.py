"""The flat, windowed, compiled planner: equal to the old whole-epoch planner when the window covers the epoch,
and sound (every item once, rows within budget, counts that match the batches, deterministic, resumable) when it
does not."""

from __future__ import annotations

import numpy as np
import pytest

from unitrain.data.batches.collate import collate
from unitrain.data.batches.stream import BatchStream
from unitrain.data.epoch.plan import plan_rows
from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.memmap.writer import write_dataset

from .conftest import VOCAB, random_documents, random_pairs, recount
from .naive_planner import naive_epoch, naive_plan_rows

LAYOUTS = [
    ("pretrain", "packed", True),
    ("sft", "packed", True),
    *[("dpo", mode, share) for mode in ("packed", "pair", "separate") for share in (True, False)],
]


def pieces(plan, dataset_of, offsets=(0,)) -> list[tuple[int, list]]:
    """Each row of a plan as (source, [(local document, begin, end), ...]); `begin, end` as the naive planner
    writes them: a pretraining piece's range, `0, length` for whole documents, `part, length` for pairs."""
    S, rows = plan.sequence_length, []
    for r in range(len(plan)):
        items, source = [], 0
        for document, part in plan.row(r):
            source = int(np.searchsorted(offsets, document, side="right")) - 1
            local = document - offsets[source]
            length = int(dataset_of(source).document_lengths[local])
            if dataset_of(source).kind == "preference":  # the naive planner writes (pair, part, length)
                items.append((local, part, length))
                continue
            begin = part * S
            items.append((local, begin, min(begin + S, length) if plan.item_part is not None else length))
        rows.append((source, items))
    return rows


def naive_items(rows) -> list[list]:
    return [[tuple(int(v) for v in item) for item in row] for row in rows]


@pytest.fixture
def datasets(tmp_path):
    """Memmap datasets (so the planner reads the reader's vectorized columns) of each kind."""

    def sft_samples(count, seed):
        samples = random_documents(count, seed, length=(2, 40))
        rng = np.random.default_rng(seed)
        out = []
        for sample in samples:  # several spans per document, overlapping and unsorted, some at position 0
            n = len(sample.token_ids)
            begins = rng.integers(0, n, size=int(rng.integers(0, 4)))
            spans = np.array([(b, int(rng.integers(b + 1, n + 1))) for b in begins], np.int64).reshape(-1, 2)
            out.append(type(sample)(sample.token_ids, loss_masking_spans=spans))
        return out

    made = {}

    def make(kind: str, count: int, seed: int):
        name = f"{kind}-{count}-{seed}"
        if name not in made:
            samples = {
                "pretraining": lambda: random_documents(count, seed, length=(1, 70)),
                "sft": lambda: sft_samples(count, seed),
                "preference": lambda: random_pairs(count, seed, prompt=(1, 20), response=(1, 20)),
            }[kind]()
            path = write_dataset(
                tmp_path / name, samples, kind, vocab_size=VOCAB, eos_id=0, max_shard_tokens=500
            )
            made[name] = GPTMemmapDataset(path)
        return made[name]

    return make


def kind_of(objective: str) -> str:
    return {"pretrain": "pretraining", "sft": "sft", "dpo": "preference"}[objective]


@pytest.mark.parametrize("objective,mode,share_prompt", LAYOUTS)
def test_plan_rows_equals_the_naive_planner(objective, mode, share_prompt, datasets):
    dataset = datasets(kind_of(objective), 150, seed=11)
    order = np.random.default_rng(1).permutation(len(dataset))[:140]
    packing = dict(objective=objective, mode=mode, share_prompt=share_prompt, sequence_length=32)
    plan = plan_rows(dataset, order, **packing)
    rows, counts, dropped, tokens, slots = naive_plan_rows(dataset, order, **packing)
    assert [items for _, items in pieces(plan, lambda s: dataset)] == naive_items(rows)
    np.testing.assert_array_equal(plan.row_counts, with_groups(counts, objective))
    assert (plan.dropped, plan.num_tokens, plan.num_slots) == (dropped, tokens, slots)
    if objective == "pretrain":
        assert (
            plan.item_part is not None and plan.item_part.max() > 0
        )  # documents longer than a row were split
    else:
        assert dropped > 0  # some items do not fit: the drop path is compared too


@pytest.mark.parametrize("objective,mode,share_prompt", LAYOUTS)
def test_blended_epochs_equal_the_naive_planner(objective, mode, share_prompt, datasets):
    kind = kind_of(objective)
    first, second = datasets(kind, 90, seed=12), datasets(kind, 25, seed=13)
    train = np.sort(np.random.default_rng(2).permutation(90)[:80])
    sources = [(first, train, 1.0), (second, np.arange(25), 3.0)]  # the second repeats its documents
    packing = dict(objective=objective, mode=mode, share_prompt=share_prompt, sequence_length=32)
    stream = BatchStream(sources, **packing, micro_batch_size=1, accumulation_steps=1, seed=5, window=10**6)
    for epoch in (0, 3):
        stream.epoch = epoch
        rows, counts = naive_epoch(sources, seed=5, epoch=epoch, **packing)
        got = pieces(stream.plan, [first, second].__getitem__, offsets=stream.offsets)
        assert got == [(source, naive_items([items])[0]) for source, items in rows]
        np.testing.assert_array_equal(stream.plan.row_counts, with_groups(counts, objective))


def with_groups(counts: np.ndarray, objective: str) -> np.ndarray:
    """The naive planner's (pairs, targets, chosen targets) and the groups column: one group per pair."""
    return np.concatenate(
        [counts, counts[:, :1] if objective == "dpo" else np.zeros_like(counts[:, :1])], axis=1
    )


def test_a_single_source_draws_as_the_naive_planner_too(datasets):
    dataset = datasets("pretraining", 120, seed=14)
    sources = [(dataset, np.arange(3, 120), 1.0)]
    packing = dict(objective="pretrain", mode="packed", share_prompt=True, sequence_length=24)
    stream = BatchStream(sources, **packing, micro_batch_size=1, accumulation_steps=1, seed=9)
    rows, counts = naive_epoch(sources, seed=9, epoch=0, **packing)
    assert pieces(stream.plan, lambda s: dataset) == [(0, naive_items([items])[0]) for _, items in rows]


@pytest.mark.parametrize("objective,mode,share_prompt", LAYOUTS)
@pytest.mark.parametrize("window", [1, 7, 40])
def test_small_windows_plan_every_item_once_within_budget(objective, mode, share_prompt, window, datasets):
    dataset = datasets(kind_of(objective), 150, seed=15)
    packing = dict(objective=objective, mode=mode, share_prompt=share_prompt)
    S = 32
    plan = plan_rows(dataset, np.arange(150), sequence_length=S, window=window, **packing)
    whole = plan_rows(dataset, np.arange(150), sequence_length=S, **packing)
    planned = sorted(item for _, items in pieces(plan, lambda s: dataset) for item in items)
    assert planned == sorted(item for _, items in pieces(whole, lambda s: dataset) for item in items)
    assert plan.dropped == whole.dropped and plan.num_tokens == whole.num_tokens
    for r in range(len(plan)):
        batch = collate(dataset, plan, [r], **packing)
        assert batch.row_length <= S  # one row's slots (each batch row in `separate`)
        assert plan.row_counts[r].tolist() == recount(batch)
    row_windows = []  # rows never span two windows, and the windows are planned in order
    for _, items in pieces(plan, lambda s: dataset):
        windows = {document // window for document, *_ in items}
        assert len(windows) == 1
        row_windows.append(windows.pop())
    assert row_windows == sorted(row_windows)


def stream_of(dataset, **overrides):
    settings = dict(
        objective="pretrain",
        mode="packed",
        share_prompt=True,
        sequence_length=32,
        micro_batch_size=2,
        accumulation_steps=2,
        seed=4,
        window=9,
    )
    settings.update(overrides)
    return BatchStream([(dataset, np.arange(len(dataset)), 1.0)], **settings)


def step_key(step):
    return (
        [
            (b.input_ids.tolist(), b.target_positions.tolist(), b.group_index.tolist())
            for b in step.micro_batches
        ],
        step.global_pairs,
        step.global_targets,
        step.global_chosen_targets,
    )


@pytest.mark.parametrize("objective", ["pretrain", "dpo"])
def test_windowed_streams_are_deterministic_and_resume_at_any_row(objective, datasets):
    dataset = datasets(kind_of(objective), 60, seed=16)
    running = stream_of(dataset, objective=objective)
    again = stream_of(dataset, objective=objective)
    steps, states = [], []
    for _ in range(3 * -(-running.rows_per_epoch // 4)):  # about three epochs
        states.append(running.state_dict())
        steps.append(step_key(running.next_step()))
        assert step_key(again.next_step()) == steps[-1]
    for at in range(0, len(steps), 3):
        resumed = stream_of(dataset, objective=objective)
        resumed.load_state_dict(states[at])
        assert [step_key(resumed.next_step()) for _ in range(len(steps) - at)] == steps[at:]


def test_per_step_counts_equal_the_collated_batches_on_every_rank(datasets):
    dataset = datasets("preference", 80, seed=17)
    ranks = [stream_of(dataset, objective="dpo", micro_batch_size=1, rank=r, world_size=3) for r in range(3)]
    for _ in range(8):
        parts = [rank.next_step() for rank in ranks]
        batches = [b for part in parts for b in part.micro_batches]
        totals = np.sum([recount(b) for b in batches], axis=0).tolist()
        for part in parts:
            counts = [part.global_pairs, part.global_targets, part.global_chosen_targets, part.global_groups]
            assert counts == totals


def test_the_loop_of_windows_keeps_fill_high_on_many_short_documents(tmp_path):
    from unitrain.data.memmap.writer import DatasetWriter

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.3, 0.9, 20000).astype(np.int64), 1, 4000)  # mean ≈ 330
    with DatasetWriter(tmp_path / "docs", "pretraining", vocab_size=VOCAB, eos_id=0) as writer:
        writer.add_batch(rng.integers(0, VOCAB, int(lengths.sum())), lengths)
    dataset = GPTMemmapDataset(tmp_path / "docs")
    packing = dict(objective="pretrain", mode="packed", share_prompt=True, sequence_length=2048)
    plan = plan_rows(dataset, rng.permutation(len(dataset)), window=4096, **packing)
    assert plan.efficiency >= 0.99 and plan.num_tokens == int(lengths.sum())


@pytest.mark.parametrize("objective,bound", [("pretrain", 17), ("dpo", 18)])
def test_an_epoch_plan_allocates_a_few_bytes_per_document(objective, bound, tmp_path):
    """Peak memory the planner allocates (numpy's buffers, as tracemalloc counts them: exact, not timed) on
    200,000 documents or pairs with about as many rows per document as 330-token documents at S=2048: the plan's
    own arrays (4 B of item id, 4 B of piece or part, 28 B per row, one more column while the rows are shuffled)
    plus bounded scratch (measured: 15.5 B per document, 16.3 B per pair). The caller's index array is not
    counted. 8-byte item ids (19.6 B), shuffling whole (R, 4) copies of the rows' counts (21.4 B), scanning the
    epoch in chunks of 10⁶ for items to split (24.0 B) or computing every pair's costs to find the few that split
    (42 B) would exceed it."""
    import tracemalloc

    from unitrain.data.epoch.plan_kernel import pack_window
    from unitrain.data.memmap.writer import DatasetWriter

    rng, n = np.random.default_rng(0), 200_000
    lengths = np.maximum(rng.lognormal(4.0 if objective == "pretrain" else 3.8, 1.0, n), 3).astype(np.int64)
    spans = None
    if objective == "dpo":  # prompt, then two responses
        first = np.maximum((lengths * rng.uniform(0.3, 0.6, n)).astype(np.int64), 1)
        spans = np.stack([first, first + np.maximum((lengths - first) // 2, 1)], axis=1)
    kind = "pretraining" if objective == "pretrain" else "preference"
    with DatasetWriter(tmp_path / "data", kind, vocab_size=VOCAB, eos_id=0) as writer:
        writer.add_batch(np.zeros(int(lengths.sum()), np.uint16), lengths, preference_spans=spans)
    dataset = GPTMemmapDataset(tmp_path / "data")
    indices = np.arange(n)
    pack_window(np.array([1], np.int64), 2, False, np.empty(1, np.int64), np.empty(1, np.int64))  # compiled
    tracemalloc.start()
    try:
        stream = BatchStream(
            [(dataset, indices, 1.0)], objective=objective, mode="packed", share_prompt=True,
            sequence_length=512, micro_batch_size=1, accumulation_steps=8, seed=0, window=4096,
        )  # fmt: skip
        plan = stream.plan
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(plan) >= 0.1 * n and len(plan.item_document) >= n - plan.dropped
    assert peak <= bound * n, f"{peak / n:.1f} B per document"
