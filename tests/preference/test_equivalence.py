"""Every packing layout gives the log-probs, losses and gradients of each prompt+response run alone (fp32)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from unitrain.data.batches.stream import BatchStream
from unitrain.losses.preference import PreferenceLossConfig, preference_losses
from unitrain.train.step.reference import pair_logps_of

from .conftest import ListDataset, build_tiny_model, packed_batch, random_pairs, standalone_pair_logps

LAYOUTS = list(itertools.product(("separate", "pair", "packed"), (True, False)))
CONFIG = PreferenceLossConfig(["sigmoid"], beta=0.5)


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().clamp(min=1e-12)  # relative to the tensor's scale: some entries are near 0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(scale))


def packed_loss(model, dataset, mode, share_prompt, reference=None, sequence_length=48):
    batch = packed_batch(dataset, mode, share_prompt, sequence_length)
    sums, counts = pair_logps_of(model, batch)  # (P, 2) in batch order
    order = batch.group_index.argsort()
    sums, counts = sums[order], counts[order]  # dataset order
    ref = None if reference is None else reference[batch.group_index][order]
    out = preference_losses(sums, ref, counts, CONFIG)
    return sums, out.losses


def standalone_loss(model, dataset, reference=None):
    sums = torch.stack([standalone_pair_logps(model, dataset[i]) for i in range(len(dataset))])  # (P, 2)
    counts = torch.tensor([[len(s.chosen_ids), len(s.rejected_ids)] for s in dataset.samples])
    return sums, preference_losses(sums, reference, counts, CONFIG).losses


def gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def standalone():
    """The model, its data and a fixed reference, with the log-probs, losses and gradients of standalone runs."""
    model = build_tiny_model(0)
    dataset = ListDataset(random_pairs(9, seed=11), "preference")
    reference = (
        torch.randn(9, 2, generator=torch.Generator().manual_seed(0)) * 3 - 20
    )  # fixed reference log-probs
    sums, losses = standalone_loss(model, dataset, reference)
    return model, dataset, reference, sums.detach(), losses.detach(), gradients(model, losses.mean())


@pytest.mark.parametrize("mode,share_prompt", LAYOUTS)
def test_layout_matches_standalone_logps_losses_and_gradients(mode, share_prompt, standalone):
    model, dataset, reference, expected_sums, expected_losses, expected_grads = standalone
    sums, losses = packed_loss(model, dataset, mode, share_prompt, reference)
    close(sums, expected_sums)
    close(losses, expected_losses)
    grads = gradients(model, losses.sum() / len(dataset))
    for name, grad in grads.items():
        close(grad, expected_grads[name])


def test_reference_equal_to_policy_gives_ln2_and_identical_responses_give_zero_gradient(tiny_model):
    model = tiny_model(1)
    samples = random_pairs(6, seed=12)
    same = samples[0]
    prompt, chosen = same.prompt_ids, same.chosen_ids
    twin = type(same)(
        token_ids=torch.cat(
            [torch.as_tensor(prompt), torch.as_tensor(chosen), torch.as_tensor(chosen)]
        ).numpy(),
        chosen_span=(len(prompt), len(prompt) + len(chosen)),
        rejected_span=(len(prompt) + len(chosen), len(prompt) + 2 * len(chosen)),
    )
    dataset = ListDataset([twin, *samples[1:]], "preference")
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    for mode, share_prompt in LAYOUTS:
        batch = packed_batch(dataset, mode, share_prompt, sequence_length=48)
        with torch.no_grad():
            reference = pair_logps_of(frozen, batch)[0]
        sums, counts = pair_logps_of(model, batch)
        losses = preference_losses(sums, reference, counts, CONFIG).losses
        close(losses.detach(), torch.full((6,), math.log(2)))
        twin_loss = losses[batch.group_index.tolist().index(0)]
        for name, grad in gradients(model, twin_loss).items():
            assert grad.abs().max() < 1e-6, (
                f"{mode}/{share_prompt}: {name} gets gradient from chosen == rejected"
            )
    # Against a different policy only the twin (chosen == rejected) stays at ln 2: in every layout its two
    # responses must see exactly the same context.
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    for mode, share_prompt in LAYOUTS:
        batch = packed_batch(dataset, mode, share_prompt, sequence_length=48)
        with torch.no_grad():
            reference = pair_logps_of(frozen, batch)[0]
            sums, counts = pair_logps_of(policy, batch)
        losses = preference_losses(sums, reference, counts, CONFIG).losses
        twin = batch.group_index.tolist().index(0)
        close(losses[twin], torch.tensor(math.log(2)))
        others = torch.cat([losses[:twin], losses[twin + 1 :]])
        assert ((others - math.log(2)).abs() > 1e-4).all(), (mode, share_prompt, others)


def test_sigmoid_over_a_sum_of_pairs_would_fail(tiny_model):
    reference_model = tiny_model(2)
    policy = copy.deepcopy(reference_model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    dataset = ListDataset(random_pairs(8, seed=13), "preference")
    ref_sums = torch.stack([standalone_pair_logps(reference_model, s) for s in dataset.samples]).detach()
    pol_sums = torch.stack([standalone_pair_logps(policy, s) for s in dataset.samples]).detach()
    delta = (pol_sums[:, 0] - ref_sums[:, 0]) - (pol_sums[:, 1] - ref_sums[:, 1])
    beta = 8.0 / float(delta.abs().max())  # the largest margin is ±8
    config = PreferenceLossConfig(["sigmoid"], beta=beta)
    margins = beta * delta
    assert (margins > 1).any() and (margins < -1).any(), margins
    one_pair = [
        preference_losses(pol_sums[k : k + 1], ref_sums[k : k + 1], torch.ones(1, 2), config).losses
        for k in range(8)
    ]
    expected = torch.cat(one_pair).mean()
    batch = packed_batch(dataset, "packed", share_prompt=True, sequence_length=200)
    assert batch.num_rows == 1  # every pair in one row
    with torch.no_grad():
        sums, counts = pair_logps_of(policy, batch)
    ref = ref_sums[batch.group_index]
    packed = preference_losses(sums, ref, counts, config).losses.mean()
    close(packed, expected)
    summed_delta = (sums[:, 0] - ref[:, 0] - sums[:, 1] + ref[:, 1]).sum()
    wrong = -torch.nn.functional.logsigmoid(beta * summed_delta)
    assert abs(float(wrong) - float(expected)) > 0.1, "the test would not catch a sigmoid over summed pairs"


def test_gradient_accumulation_one_batch_of_b_pairs_equals_b_batches_of_one(tiny_model):
    model = tiny_model(3)
    dataset = ListDataset(random_pairs(5, seed=14), "preference")
    config = PreferenceLossConfig(["sigmoid", "sft"], [1.0, 0.3], beta=0.4)

    def accumulated(mode, micro_batch_size, accumulation_steps, sequence_length):
        stream = BatchStream(
            [(dataset, range(5), 1.0)],
            objective="dpo",
            mode=mode,
            share_prompt=True,
            sequence_length=sequence_length,
            micro_batch_size=micro_batch_size,
            accumulation_steps=accumulation_steps,
            seed=0,
        )
        step = stream.next_step()
        assert step.global_pairs == 5 and len(step.micro_batches) == accumulation_steps
        model.zero_grad()
        for batch in step.micro_batches:
            sums, counts = pair_logps_of(model, batch)
            out = preference_losses(
                sums,
                None,
                counts,
                config,
                chosen_tokens_per_pair=step.global_chosen_targets / step.global_pairs,
            )
            (out.losses.sum() / step.global_pairs).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    together = accumulated("packed", 1, 1, 200)
    apart = accumulated("pair", 1, 5, 48)
    for name, grad in apart.items():
        close(grad, together[name])
