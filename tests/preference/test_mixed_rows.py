"""Mixed rows: pretraining pieces, SFT documents and preference groups planned into the same rows, each scored as
if alone (fp32), and the plan's per-objective counts equal to what the collated batches hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unitrain.data.batch import OBJECTIVE_CODES
from unitrain.data.batches.stream import BatchStream
from unitrain.data.epoch.mix import MIXED_COUNTS
from unitrain.data.epoch.rules import sft_document, sft_targets
from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.memmap.writer import write_dataset
from unitrain.data.sample import GPTSample
from unitrain.errors import UnitrainError
from unitrain.losses.logprobs import target_logprobs
from unitrain.losses.preference import response_logps

from .conftest import (
    VOCAB,
    ListDataset,
    build_tiny_model,
    random_documents,
    random_groups,
    random_pairs,
    recount,
)

S = 64
OBJECTIVES = ["pretrain", "sft", "dpo"]


def sft_documents(count: int, seed: int) -> list[GPTSample]:
    """A masked prompt, then an answer trained on."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        prompt, answer = int(rng.integers(1, 10)), int(rng.integers(2, 15))
        tokens = rng.integers(1, VOCAB, size=prompt + answer)
        samples.append(GPTSample(tokens, loss_masking_spans=np.array([[0, prompt]])))
    return samples


def mixed_stream(tmp_path, groups: bool, share_prompt: bool = True, **options) -> BatchStream:
    """Pretraining documents (some longer than a row), SFT documents with masked spans and pairs or groups."""
    preference = random_groups(10, seed=3) if groups else random_pairs(10, seed=3)
    data = [
        (random_documents(16, seed=1, length=(3, 90)), "pretraining"),
        (sft_documents(12, seed=2), "sft"),
        (preference, "preference"),
    ]
    sources = []
    for samples, kind in data:
        path = tmp_path / f"{kind}-{groups}-{share_prompt}"
        if not path.exists():
            write_dataset(path, samples, kind, vocab_size=VOCAB, eos_id=0)
        sources.append((GPTMemmapDataset(path), range(len(samples)), float(len(samples))))
    settings = dict(micro_batch_size=4, accumulation_steps=1, seed=0, sequence_length=S)
    return BatchStream(
        sources, objective=None, mode="packed", share_prompt=share_prompt, objectives=OBJECTIVES,
        **{**settings, **options},
    )  # fmt: skip


def all_rows(stream: BatchStream):
    plan = stream.plan
    return stream._collate([(plan, r) for r in range(len(plan))])


def alone(model, tokens: np.ndarray, keep: np.ndarray) -> torch.Tensor:
    """Sum of log-probs of tokens[keep] from a plain causal forward of `tokens` alone."""
    ids = torch.tensor(np.asarray(tokens), dtype=torch.int64)[None]
    logps = torch.log_softmax(model(ids)[0].float(), dim=-1)  # (L, V)
    keep = torch.as_tensor(keep, dtype=torch.int64)
    return logps[keep - 1].gather(1, ids[0, keep, None]).sum()


@pytest.mark.parametrize("groups", [False, True])
def test_a_mixed_row_scores_every_document_as_alone(groups, tmp_path):
    stream = mixed_stream(tmp_path, groups)
    plan, batch = stream.plan, all_rows(stream)
    kinds = [{stream._objective_of(d) for d, _ in plan.row(r)} for r in range(len(plan))]
    assert any(len(k) == 3 for k in kinds)  # rows holding all three kinds
    model = build_tiny_model(0)
    logps = target_logprobs(
        model.hidden_states(batch), model.lm_head_weight, batch.target_positions, batch.target_tokens
    ).logps  # (N,)
    # pretraining and SFT: per (row, document in row) sums; documents follow the row's items (shared prompts)
    row_of = batch.target_positions // batch.row_length
    document = batch.document_id.reshape(-1)[batch.target_positions]
    for r in range(len(plan)):
        for k, (doc, part) in enumerate(plan.row(r)):
            objective = stream._objective_of(doc)
            if objective == "dpo":
                continue
            sample = stream._sample(doc)
            if objective == "pretrain":
                tokens = sample.token_ids[part * S : (part + 1) * S]
                expected = alone(model, tokens, np.arange(1, len(tokens)))
            else:
                keep, _ = sft_targets(sample)
                expected = alone(model, sft_document(sample), keep)
            mine = (row_of == r) & (document == k)
            assert (batch.target_objective[mine] == OBJECTIVE_CODES[objective]).all()
            torch.testing.assert_close(logps[mine].sum(), expected, rtol=1e-5, atol=1e-5)
    # preference: every response's sum as the response run alone after its prompt
    sums, _ = response_logps(logps, batch.target_response, batch.num_responses)
    assert (batch.target_objective[batch.target_response >= 0] == OBJECTIVE_CODES["dpo"]).all()
    assert (batch.target_objective[batch.target_response < 0] != OBJECTIVE_CODES["dpo"]).all()
    for g, index in enumerate(batch.group_index.tolist()):
        expected = []
        sample = stream._sample(index)
        for number in range(len(sample.group_scores)):
            response = sample.response_ids(number)
            tokens = np.concatenate([sample.prompt_ids, response])
            expected.append(alone(model, tokens, np.arange(len(sample.prompt_ids), len(tokens))))
        mine = batch.response_group == g
        order = batch.response_number[mine].argsort()
        torch.testing.assert_close(sums[mine][order], torch.stack(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("share_prompt", [True, False])
def test_mixed_row_counts_match_the_batches(groups, share_prompt, tmp_path):
    stream = mixed_stream(tmp_path, groups, share_prompt)
    plan = stream.plan
    assert plan.row_counts.shape == (len(plan), len(MIXED_COUNTS))
    for r in range(len(plan)):
        batch = stream._collate([(plan, r)])
        codes = batch.target_objective
        lm, sft = int((codes == 0).sum()), int((codes == 1).sum())
        assert plan.row_counts[r].tolist() == recount(batch) + [lm, sft]
    # every document of every source is planned once (pretraining documents as all their pieces)
    documents = plan.item_document.tolist()
    assert sorted(set(documents)) == list(range(16 + 12 + 10))


def test_mixed_step_counts_and_resume(tmp_path):
    stream = mixed_stream(tmp_path, False, micro_batch_size=2, accumulation_steps=2)
    step = stream.next_step()
    codes = torch.cat([b.target_objective for b in step.micro_batches])
    assert step.global_lm_targets == int((codes == 0).sum())
    assert step.global_sft_targets == int((codes == 1).sum())
    assert step.global_pairs == sum(b.num_pairs for b in step.micro_batches)
    state = stream.state_dict()
    assert state["objectives"] == OBJECTIVES
    following = stream.next_step()
    again = mixed_stream(tmp_path, False, micro_batch_size=2, accumulation_steps=2)
    again.load_state_dict(state)
    resumed = again.next_step()
    for a, b in zip(following.micro_batches, resumed.micro_batches):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.target_objective, b.target_objective)
    single = BatchStream(
        [(ListDataset(random_pairs(4, seed=3), "preference"), range(4), 1.0)], objective="dpo", mode="packed",
        share_prompt=True, micro_batch_size=1, accumulation_steps=1, seed=0, sequence_length=S,
    )  # fmt: skip
    with pytest.raises(UnitrainError, match="cannot resume the data stream"):
        single.load_state_dict(state)


def test_a_mixed_plan_refuses_a_dataset_its_objective_cannot_use():
    sources = [(ListDataset(random_documents(4, seed=1), "pretraining"), range(4), 1.0)]
    stream = BatchStream(
        sources, objective=None, mode="packed", share_prompt=True, objectives=["dpo"],
        micro_batch_size=1, accumulation_steps=1, seed=0, sequence_length=S,
    )  # fmt: skip
    with pytest.raises(UnitrainError, match="objective dpo needs a preference dataset"):
        _ = stream.plan
