"""Splits, seeded epochs, rank slices with global counts, blending, resume at the exact next row."""

from __future__ import annotations

import numpy as np
import pytest

from unitrain.data.batches.stream import BatchStream, iterate_batches, split_indices
from unitrain.errors import UnitrainError

from .conftest import ListDataset, random_pairs, recount


def stream(dataset, **overrides):
    kwargs = dict(
        objective="dpo",
        mode="packed",
        share_prompt=True,
        sequence_length=40,
        micro_batch_size=2,
        accumulation_steps=2,
        seed=3,
    )
    kwargs.update(overrides)
    sources = kwargs.pop("sources", [(dataset, np.arange(len(dataset)), 1.0)])
    return BatchStream(sources, **kwargs)


def batch_key(batch):
    return (batch.input_ids.tolist(), batch.target_positions.tolist(), batch.group_index.tolist())


def test_split_is_seeded_disjoint_and_complete():
    train, validation = split_indices(50, 0.1, seed=1)
    assert len(validation) == 5 and sorted(np.concatenate([train, validation]).tolist()) == list(range(50))
    again = split_indices(50, 0.1, seed=1)
    assert (again[1] == validation).all() and not (split_indices(50, 0.1, seed=2)[1] == validation).all()
    assert len(split_indices(3, 0.01, seed=0)[1]) == 1 and len(split_indices(3, 0.0, seed=0)[1]) == 0
    with pytest.raises(UnitrainError, match="validation_fraction"):
        split_indices(10, 1.0, seed=0)


def test_an_epoch_visits_every_pair_once_then_reshuffles():
    dataset = ListDataset(random_pairs(30, seed=41), "preference")
    single = stream(dataset, micro_batch_size=1, accumulation_steps=1)
    epochs = {0: [], 1: [], 2: []}
    while single.epoch < 2:
        pairs = single.next_step().micro_batches[0].group_index.tolist()
        epochs[single.epoch] += pairs  # one row per step: it comes from the epoch current after the step
    assert sorted(epochs[0]) == list(range(30)) and sorted(epochs[1]) == list(range(30))
    assert epochs[0] != epochs[1]


def test_ranks_split_each_step_and_share_the_global_counts():
    dataset = ListDataset(random_pairs(40, seed=42), "preference")
    whole = stream(dataset, micro_batch_size=2, accumulation_steps=2, world_size=1)
    ranks = [
        stream(dataset, micro_batch_size=1, accumulation_steps=2, rank=r, world_size=2) for r in range(2)
    ]
    for _ in range(5):
        step = whole.next_step()
        parts = [r.next_step() for r in ranks]
        mine = [b for part in parts for b in part.micro_batches]
        pairs = sorted(i for b in mine for i in b.group_index.tolist())
        assert pairs == sorted(i for b in step.micro_batches for i in b.group_index.tolist())
        for part in parts:
            assert part.global_pairs == step.global_pairs == len(pairs)
            assert part.global_targets == sum(b.num_targets for b in mine)
            assert part.global_chosen_targets == sum(recount(b)[2] for b in mine)
            assert part.global_groups == sum(b.num_groups for b in mine) == len(pairs)


def test_resume_continues_at_the_exact_next_row():
    dataset = ListDataset(random_pairs(25, seed=43), "preference")
    running = stream(dataset)
    for _ in range(4):
        running.next_step()
    state = running.state_dict()
    resumed = stream(dataset)
    resumed.load_state_dict(state)
    for _ in range(6):  # crosses into the next epoch
        a, b = running.next_step(), resumed.next_step()
        assert [batch_key(x) for x in a.micro_batches] == [batch_key(x) for x in b.micro_batches]
    with pytest.raises(UnitrainError, match="sequence_length"):
        stream(dataset, sequence_length=41).load_state_dict(state)


def test_blending_follows_the_weights_and_offsets_pair_indices():
    first = ListDataset(random_pairs(40, seed=44), "preference")
    second = ListDataset(random_pairs(40, seed=45), "preference")
    sources = [(first, np.arange(40), 3.0), (second, np.arange(40), 1.0)]
    blended = stream(first, sources=sources, mode="pair", micro_batch_size=1, accumulation_steps=1)
    seen = []
    while True:
        pairs = blended.next_step().micro_batches[0].group_index.tolist()
        if blended.epoch > 0:
            break
        seen += pairs
    # round(80 * 3/4) draws from the first source (each index at least once), round(80 * 1/4) from the second
    assert sum(i < 40 for i in seen) == 60 and set(range(40)) <= set(seen)
    assert sum(i >= 40 for i in seen) == 20 and len(set(seen) - set(range(40))) == 20


def test_iterate_batches_is_one_ordered_pass():
    dataset = ListDataset(random_pairs(17, seed=46), "preference")
    settings = dict(objective="dpo", mode="pair", share_prompt=False, sequence_length=64, micro_batch_size=5)
    batches = list(iterate_batches(dataset, range(17), **settings))
    assert [b.num_pairs for b in batches] == [5, 5, 5, 2]
    assert sorted(i for b in batches for i in b.group_index.tolist()) == list(range(17))
    again = list(iterate_batches(dataset, range(17), **settings))
    assert [batch_key(a) for a in batches] == [batch_key(b) for b in again]


def test_an_epoch_with_nothing_that_fits_is_refused():
    dataset = ListDataset(random_pairs(3, seed=47, prompt=(20, 20)), "preference")
    with pytest.raises(UnitrainError, match="no rows"):  # planned when first needed
        stream(dataset, sequence_length=10).next_step()
