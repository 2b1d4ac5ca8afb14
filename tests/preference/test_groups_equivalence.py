"""Groups of ranked responses: every layout (a group split over a wide row included) gives each response the
log-prob and the gradient of prompt+response run alone; `group_pairs: all` on a group equals the sum of today's
pair losses over the pairs it implies."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from unitrain.data.epoch.ranking import group_pairs
from unitrain.data.sample import GPTSample
from unitrain.losses.preference import PreferenceLossConfig, pair_view, preference_losses
from unitrain.train.step.reference import pair_logps_of, response_logps_of

from .conftest import VOCAB, build_tiny_model, packed_batch, random_groups, standalone_response_logps

LAYOUTS = list(itertools.product(("separate", "pair", "packed"), (True, False)))


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().clamp(min=1e-12)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(scale))


def gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(7)


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    from unitrain.data.memmap.reader import GPTMemmapDataset
    from unitrain.data.memmap.writer import write_dataset

    samples = random_groups(9, seed=21, prompt=(2, 8), response=(1, 9), responses=(2, 6))
    path = write_dataset(
        tmp_path_factory.mktemp("groups") / "groups", samples, "preference", vocab_size=VOCAB
    )
    return GPTMemmapDataset(path)


@pytest.fixture(scope="module")
def standalone(model, groups):
    """Every response's standalone log-prob, a fixed random weight per response, and the gradient of the
    weighted sum: the loss whose gradient reaches every response."""
    generator = torch.Generator().manual_seed(0)
    logps, weights, loss = {}, {}, 0.0
    for g in range(len(groups)):
        for n, value in enumerate(standalone_response_logps(model, groups[g])):
            logps[g, n], weights[g, n] = value.detach(), float(torch.randn(1, generator=generator))
            loss = loss + weights[g, n] * value
    return logps, weights, gradients(model, loss)


def batch_responses(batch) -> list[tuple[int, int]]:
    """(group, response number) of each response of `batch`, in the batch's response order."""
    return [
        (int(batch.group_index[group]), int(number))
        for group, number in zip(batch.response_group, batch.response_number)
    ]


CASES = [
    (mode, share, length)
    for mode, share in LAYOUTS
    for length in (96, 20)
    if (mode, length) != ("separate", 20)
]


@pytest.mark.parametrize("mode,share_prompt,sequence_length", CASES)
def test_every_layout_gives_each_response_its_standalone_logprob_and_gradient(
    mode, share_prompt, sequence_length, model, groups, standalone
):
    logps, weights, expected_grads = standalone
    batch = packed_batch(groups, mode, share_prompt, sequence_length)
    order = batch_responses(batch)
    assert sorted(order) == sorted(logps)
    if sequence_length == 20:
        assert batch.num_rows > batch.num_groups  # some groups were split over wide rows
    sums, counts = response_logps_of(model, batch)  # (Rb,)
    close(sums.detach(), torch.stack([logps[key] for key in order]))
    assert counts.tolist() == [len(groups[g].response_ids(n)) for g, n in order]
    packed_grads = gradients(model, (sums * torch.tensor([weights[key] for key in order])).sum())
    for name, grad in expected_grads.items():
        close(packed_grads[name], grad)


def test_a_split_group_equals_the_unsplit_one(model, groups):
    unsplit = packed_batch(groups, "packed", True, 200)
    split = packed_batch(groups, "packed", True, 18)
    assert split.num_rows > unsplit.num_rows == 1
    values = {}
    for name, batch in (("unsplit", unsplit), ("split", split)):
        sums, _ = response_logps_of(model, batch)
        values[name] = dict(zip(batch_responses(batch), sums.tolist()))
    assert values["split"].keys() == values["unsplit"].keys()
    np.testing.assert_allclose(
        [values["split"][k] for k in sorted(values["split"])],
        [values["unsplit"][k] for k in sorted(values["unsplit"])],
        rtol=1e-5,
    )


def test_group_pairs_all_equals_the_sum_of_the_pair_losses_through_the_pair_path(
    model, memmap_groups, memmap_pairs
):
    samples = random_groups(5, seed=22, responses=(3, 5))
    dataset = memmap_groups(samples, "ranked")
    reference = build_tiny_model(8)
    config = PreferenceLossConfig(["sigmoid", "ipo"], [1.0, 0.5], beta=0.3)
    batch = packed_batch(dataset, "packed", True, 200, group_pairs="all")
    sums, counts = response_logps_of(model, batch)
    with torch.no_grad():
        ref_sums, _ = response_logps_of(reference, batch)
    pairs = batch.pair_responses
    grouped = preference_losses(
        pair_view(sums, pairs), pair_view(ref_sums, pairs), pair_view(counts, pairs), config
    ).losses.sum()
    grouped_grads = gradients(model, grouped)
    pair_samples = []  # each implied pair written out as today's pair: prompt, preferred, other
    for sample in samples:
        for better, worse in group_pairs(sample.scores, "all"):
            prompt, a, b = sample.prompt_ids, sample.response_ids(better), sample.response_ids(worse)
            tokens = np.concatenate([prompt, a, b])
            spans = (len(prompt), len(prompt) + len(a))
            pair_samples.append(GPTSample(tokens, chosen_span=spans, rejected_span=(spans[1], len(tokens))))
    assert len(pair_samples) == batch.num_pairs > len(samples)
    pairs_dataset = memmap_pairs(pair_samples, "implied")
    pair_batch = packed_batch(pairs_dataset, "packed", True, 200)
    pair_sums, pair_counts = pair_logps_of(model, pair_batch)
    with torch.no_grad():
        pair_ref, _ = pair_logps_of(reference, pair_batch)
    one_by_one = preference_losses(pair_sums, pair_ref, pair_counts, config).losses.sum()
    close(grouped.detach(), one_by_one.detach())
    for name, grad in gradients(model, one_by_one).items():
        close(grouped_grads[name], grad)
