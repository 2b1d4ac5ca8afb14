"""Packing: every target sees exactly its standalone context, best-fit matches a naive packer, drops are counted."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from unitrain.data.batch import SEGMENT_PROMPT
from unitrain.data.batches.collate import collate
from unitrain.data.epoch.plan import plan_rows
from unitrain.errors import UnitrainError

from .conftest import recount

LAYOUTS = [(m, s) for m, s in itertools.product(("separate", "pair", "packed"), (True, False))]


def pieces(plan, dataset) -> list[np.ndarray]:
    """Each planned row as an (items, 3) array of (document, begin, end) token ranges."""
    S = plan.sequence_length
    return [
        np.array(
            [(d, p * S, min((p + 1) * S, int(dataset.document_lengths[d]))) for d, p in plan.row(r)], np.int64
        ).reshape(-1, 3)
        for r in range(len(plan))
    ]


def collate_all(dataset, plan, **layout):
    return collate(dataset, plan, range(len(plan)), **layout)


def visible(batch, flat_slot: int):
    """Tokens and positions a slot attends to, read off the documented attention rule by brute force."""
    row, q = divmod(flat_slot, batch.row_length)
    doc, seg = batch.document_id[row].tolist(), batch.segment[row].tolist()
    keys = [
        k for k in range(q + 1) if doc[k] == doc[q] != -1 and (seg[k] <= SEGMENT_PROMPT or seg[k] == seg[q])
    ]
    return batch.input_ids[row, keys].tolist(), batch.position_ids[row, keys].tolist()


@pytest.mark.parametrize("mode,share_prompt", LAYOUTS)
def test_each_target_sees_its_standalone_prompt_and_response_prefix(
    mode, share_prompt, pairs_factory, list_dataset
):
    dataset = list_dataset(pairs_factory(23, seed=1), "preference")
    plan = plan_rows(
        dataset, range(23), objective="dpo", mode=mode, share_prompt=share_prompt, sequence_length=40
    )
    assert plan.dropped == 0 and len({int(i) for row in pieces(plan, dataset) for i in row[:, 0]}) == 23
    batch = collate_all(dataset, plan, objective="dpo", mode=mode, share_prompt=share_prompt)
    assert sorted(batch.group_index.tolist()) == list(range(23))
    seen = {}
    for token, slot, response in zip(
        *(t.tolist() for t in (batch.target_tokens, batch.target_positions, batch.target_response))
    ):
        sample = dataset[int(batch.group_index[batch.response_group[response]])]
        answer = sample.response_ids(int(batch.response_number[response]))
        j = seen.setdefault(response, 0)
        seen[response] += 1
        context = sample.prompt_ids.tolist() + answer[:j].tolist()
        assert token == answer[j]
        assert visible(batch, slot) == (context, list(range(len(context))))
    for group, index in enumerate(batch.group_index.tolist()):
        chosen, rejected = batch.pair_responses[group].tolist()  # one pair per group, chosen first
        assert batch.response_group[chosen] == batch.response_group[rejected] == group
        assert seen[chosen] == len(dataset[index].chosen_ids) and seen[rejected] == len(
            dataset[index].rejected_ids
        )
    assert batch.num_tokens == plan.num_tokens
    chosen_targets = sum(len(sample.chosen_ids) for sample in dataset.samples)  # each pair's chosen wins once
    assert (
        plan.row_counts.sum(axis=0).tolist() == recount(batch) == [23, batch.num_targets, chosen_targets, 23]
    )


def naive_best_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Textbook BFD: largest first; each item to the fullest row it fits in (lowest row on ties), else a new row.
    Items larger than a row are left out."""
    rows, room = [], []
    for k in sorted((k for k in range(len(sizes)) if sizes[k] <= capacity), key=lambda k: (-sizes[k], k)):
        fitting = [r for r in range(len(rows)) if room[r] >= sizes[k]]
        if fitting:
            best = min(fitting, key=lambda r: (room[r], r))
            rows[best].append(k)
            room[best] -= sizes[k]
        else:
            rows.append([k])
            room.append(capacity - sizes[k])
    return rows


def test_packed_rows_match_a_naive_best_fit_decreasing(pairs_factory, list_dataset):
    dataset = list_dataset(pairs_factory(200, seed=2, prompt=(1, 30), response=(1, 30)), "preference")
    order = np.random.default_rng(0).permutation(200)
    plan = plan_rows(dataset, order, objective="dpo", mode="packed", share_prompt=True, sequence_length=64)
    expected = naive_best_fit_decreasing([int(dataset.document_lengths[i]) for i in order], 64)
    packed = [row for row in pieces(plan, dataset) if row[0, 1] == 0]  # then the wide rows of split pairs
    assert len(packed) == len(expected)
    assert [row[:, 0].tolist() for row in packed] == [[int(order[k]) for k in row] for row in expected]
    too_long = [int(i) for i in order if dataset.document_lengths[i] > 64]
    assert [int(row[0, 0]) for row in pieces(plan, dataset)[len(packed) :]] == too_long  # split, in order
    assert plan.dropped == 0 and len(too_long) > 0
    assert plan.num_tokens == int(dataset.document_lengths.sum()) + sum(
        len(dataset[i].prompt_ids) for i in too_long
    )  # a split pair's second part repeats the prompt
    assert plan.efficiency == pytest.approx(plan.num_tokens / ((len(plan) + len(too_long)) * 64))
    again = plan_rows(dataset, order, objective="dpo", mode="packed", share_prompt=True, sequence_length=64)
    assert all((a == b).all() for a, b in zip(pieces(plan, dataset), pieces(again, dataset)))


@pytest.mark.parametrize("mode,share_prompt", LAYOUTS)
def test_pairs_longer_than_a_row_are_split_and_only_unfit_responses_dropped(
    mode, share_prompt, pairs_factory, list_dataset
):
    samples = pairs_factory(30, seed=3, prompt=(1, 12), response=(1, 12))
    dataset = list_dataset(samples, "preference")

    def need(s):
        p, c, r = len(s.prompt_ids), len(s.chosen_ids), len(s.rejected_ids)
        return p + max(c, r) if mode == "separate" else p + c + r + (0 if share_prompt else p)

    def alone(s):  # each response with its prompt: what a split pair needs per batch row
        return len(s.prompt_ids) + max(len(s.chosen_ids), len(s.rejected_ids))

    over = [k for k, s in enumerate(samples) if need(s) > 20]
    dropped = [k for k in over if mode == "separate" or alone(samples[k]) > 20]
    plan = plan_rows(
        dataset, range(30), objective="dpo", mode=mode, share_prompt=share_prompt, sequence_length=20
    )
    assert 0 < plan.dropped == len(dropped) and (mode == "separate" or len(over) > len(dropped))
    planned = [document for r in range(len(plan)) for document, _ in plan.row(r)]
    assert sorted(set(planned)) == sorted(set(range(30)) - set(dropped))
    wide = [r for r in range(len(plan)) if plan.row(r)[0][1] > 0]
    assert sorted(plan.row(r)[0][0] for r in wide) == sorted(set(over) - set(dropped))
    assert all(plan.row(r) == [(plan.row(r)[0][0], 1), (plan.row(r)[0][0], 2)] for r in wide)
    batch = collate_all(dataset, plan, objective="dpo", mode=mode, share_prompt=share_prompt)
    per_row = 2 if mode == "separate" else 1
    assert batch.row_length <= 20 and batch.num_rows == (len(plan) - len(wide)) * per_row + 2 * len(wide)
    assert plan.num_slots == 20 * batch.num_rows
    if mode != "packed":
        assert all(len(row) == 1 for row in pieces(plan, dataset) if row[0, 1] == 0)


def test_pretrain_splits_long_documents_and_targets_every_token_after_each_piece_start(
    documents_factory, list_dataset
):
    dataset = list_dataset(documents_factory(15, seed=4, length=(1, 50)), "pretraining")
    plan = plan_rows(
        dataset, range(15), objective="pretrain", mode="packed", share_prompt=True, sequence_length=16
    )
    assert plan.dropped == 0 and plan.num_tokens == int(dataset.document_lengths.sum())
    batch = collate_all(dataset, plan, objective="pretrain", mode="packed", share_prompt=True)
    planned = sorted((int(i), int(b), int(e)) for row in pieces(plan, dataset) for i, b, e in row)
    expected_pieces = sorted(
        (i, b, min(b + 16, n))
        for i, n in enumerate(dataset.document_lengths.tolist())
        for b in range(0, n, 16)
    )
    assert planned == expected_pieces
    expected_targets = sorted(t for i, b, e in planned for t in dataset[i].token_ids[b + 1 : e].tolist())
    assert sorted(batch.target_tokens.tolist()) == expected_targets
    for token, slot in zip(batch.target_tokens.tolist(), batch.target_positions.tolist()):
        tokens, positions = visible(batch, slot)
        assert positions == list(range(len(tokens)))  # a piece restarts its positions
        row, q = divmod(slot, batch.row_length)
        assert batch.input_ids[row, q + 1] == token  # plain next-token targets within a piece
    assert (batch.target_response == -1).all() and batch.num_pairs == batch.num_responses == 0


def test_sft_excludes_masked_spans_and_drops_documents_longer_than_a_row(documents_factory, list_dataset):
    samples = documents_factory(25, seed=5, length=(2, 30), spans=True)
    dataset = list_dataset(samples, "sft")
    plan = plan_rows(
        dataset, range(25), objective="sft", mode="packed", share_prompt=True, sequence_length=24
    )
    assert plan.dropped == sum(len(s.token_ids) > 24 for s in samples)
    batch = collate_all(dataset, plan, objective="sft", mode="packed", share_prompt=True)
    expected = []
    for index in sorted(int(i) for row in pieces(plan, dataset) for i in row[:, 0]):
        tokens, (begin, end) = dataset[index].token_ids, dataset[index].loss_masking_spans[0]
        expected += [int(tokens[j]) for j in range(1, len(tokens)) if not begin <= j < end]
    assert sorted(batch.target_tokens.tolist()) == sorted(expected)
    for slot, token in zip(batch.target_positions.tolist(), batch.target_tokens.tolist()):
        row, q = divmod(slot, batch.row_length)
        assert (
            batch.input_ids[row, q + 1] == token
            and batch.document_id[row, q + 1] == batch.document_id[row, q]
        )


def test_preference_data_for_sft_trains_prompt_plus_chosen_with_loss_on_chosen(pairs_factory, list_dataset):
    dataset = list_dataset(pairs_factory(10, seed=6), "preference")
    plan = plan_rows(
        dataset, range(10), objective="sft", mode="packed", share_prompt=True, sequence_length=64
    )
    batch = collate_all(dataset, plan, objective="sft", mode="packed", share_prompt=True)
    assert batch.num_tokens == sum(len(s.prompt_ids) + len(s.chosen_ids) for s in dataset.samples)
    assert sorted(batch.target_tokens.tolist()) == sorted(
        t for s in dataset.samples for t in s.chosen_ids.tolist()
    )


def test_objective_and_dataset_kind_must_agree(pairs_factory, documents_factory, list_dataset):
    with pytest.raises(UnitrainError, match="preference dataset"):
        plan_rows(
            list_dataset(documents_factory(3, 0), "sft"),
            range(3),
            objective="dpo",
            mode="packed",
            share_prompt=True,
            sequence_length=8,
        )
    with pytest.raises(UnitrainError, match="packing mode"):
        plan_rows(
            list_dataset(pairs_factory(3, 0), "preference"),
            range(3),
            objective="dpo",
            mode="rows",
            share_prompt=True,
            sequence_length=8,
        )
    with pytest.raises(UnitrainError, match="group_pairs must be one of"):  # a user error, like the others
        plan_rows(
            list_dataset(pairs_factory(3, 0), "preference"),
            range(3),
            objective="dpo",
            mode="packed",
            share_prompt=True,
            sequence_length=8,
            group_pairs="best_vs_all",
        )


def test_memmap_dataset_packs_like_the_in_memory_one(pairs_factory, list_dataset, memmap_pairs):
    samples = pairs_factory(12, seed=7)
    on_disk, in_memory = memmap_pairs(samples), list_dataset(samples, "preference")
    kwargs = dict(objective="dpo", mode="packed", share_prompt=True, sequence_length=32)
    layout = dict(objective="dpo", mode="packed", share_prompt=True)
    a = collate_all(on_disk, plan_rows(on_disk, range(12), **kwargs), **layout)
    b = collate_all(in_memory, plan_rows(in_memory, range(12), **kwargs), **layout)
    assert all((getattr(a, f) == getattr(b, f)).all() for f in ("input_ids", "segment", "target_positions"))


def test_hh_rlhf_fills_at_least_99_percent_of_2048_and_4096_token_rows(
    hh_rlhf_path, gpt2_tokenizer_path, list_dataset
):
    import gzip
    import json

    from tokenizers import Tokenizer

    from unitrain.config import PackingSection
    from unitrain.data.sample import GPTSample

    tokenizer, eos = Tokenizer.from_file(str(gpt2_tokenizer_path)), 50256
    with gzip.open(hh_rlhf_path, "rt") as handle:
        rows = [json.loads(line) for line in handle]
    marker = "\n\nAssistant:"
    split = [
        row["chosen"].rfind(marker) + len(marker) for row in rows
    ]  # implicit prompt: up to the last turn
    texts = [row["chosen"][:k] for row, k in zip(rows, split)]
    texts += [row["chosen"][k:] for row, k in zip(rows, split)]
    texts += [row["rejected"][row["rejected"].rfind(marker) + len(marker) :] for row in rows]
    ids = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
    samples = []
    for prompt, chosen, rejected in zip(
        ids[: len(rows)], ids[len(rows) : 2 * len(rows)], ids[2 * len(rows) :]
    ):
        p, c, r = len(prompt), len(chosen) + 1, len(rejected) + 1
        tokens = np.array(prompt + chosen + [eos] + rejected + [eos])
        samples.append(GPTSample(tokens, chosen_span=(p, p + c), rejected_span=(p + c, p + c + r)))
    dataset = list_dataset(samples, "preference")
    order = np.random.default_rng(0).permutation(len(dataset))
    window = PackingSection.model_fields["window"].default
    for share_prompt in (True, False):
        for sequence_length in (2048, 4096):
            plan = plan_rows(
                dataset,
                order,
                objective="dpo",
                mode="packed",
                share_prompt=share_prompt,
                sequence_length=sequence_length,
                window=window,
            )
            assert plan.dropped == 0 and plan.efficiency >= 0.99, (
                share_prompt,
                sequence_length,
                plan.efficiency,
            )
