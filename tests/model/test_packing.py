"""Packing parity against `transformers` run on each sequence alone.

Documents packed into one row, and shared-prompt pairs (prompt, chosen, rejected stored once, rejected positions
continuing from the prompt end), must give the logits / log-probs of each sequence run separately."""

from __future__ import annotations

import pytest
import torch

from unitrain.losses.logprobs import target_logprobs
from unitrain.model import from_pretrained

# row 0: a plain document, a shared-prompt pair (prompt 5, chosen 4, rejected 6), a short plain document
# row 1: one pair (prompt 9, chosen 3, rejected 10) and two padding slots (row 0 is 26 long)
LAYOUT = [
    [(11, "plain"), (15, "pair:5:4"), (3, "plain")],
    [(22, "pair:9:3")],
]


@pytest.fixture(scope="module", params=["llama", "mistral-window", "qwen3"])
def models(request, random_hf_model, tmp_path_factory):
    reference = random_hf_model(request.param)
    tmp_path = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(tmp_path)
    return from_pretrained(tmp_path).eval(), reference


def _random_layout(vocab_size: int) -> list[list[tuple[list[int], str]]]:
    generator = torch.Generator().manual_seed(3)
    return [
        [(torch.randint(0, vocab_size, (n,), generator=generator).tolist(), kind) for n, kind in row]
        for row in LAYOUT
    ]


def _reference_logits(reference, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([tokens])).logits[0]  # (L, V)


@pytest.mark.parametrize("backend", ["dense", "blocks"])
def test_packed_rows_match_each_sequence_alone(models, make_batch, backend):
    model, reference = models
    rows = _random_layout(model.config.vocab_size)
    batch = make_batch(rows)
    model.attention_backend = backend
    with torch.no_grad():
        logits = model.hidden_states(batch) @ model.lm_head_weight.T  # (R, T, V)
    checked = 0
    for r, row in enumerate(rows):
        slot = 0
        for tokens, kind in row:
            n = len(tokens)
            if kind == "plain":
                expected = _reference_logits(reference, tokens)  # (n, V)
                torch.testing.assert_close(logits[r, slot : slot + n], expected, atol=1e-4, rtol=0)
            else:
                prompt, chosen = (int(x) for x in kind.split(":")[1:])
                with_chosen = _reference_logits(reference, tokens[: prompt + chosen])
                with_rejected = _reference_logits(reference, tokens[:prompt] + tokens[prompt + chosen :])
                torch.testing.assert_close(
                    logits[r, slot : slot + prompt + chosen], with_chosen, atol=1e-4, rtol=0
                )
                torch.testing.assert_close(
                    logits[r, slot + prompt + chosen : slot + n], with_rejected[prompt:], atol=1e-4, rtol=0
                )
            checked += n
            slot += n
    assert checked == batch.num_tokens


@pytest.mark.parametrize("backend", ["dense", "blocks"])
def test_shared_prompt_logprobs_match_separate_sequences(models, make_batch, backend):
    model, reference = models
    rows = _random_layout(model.config.vocab_size)
    batch = make_batch(rows)
    model.attention_backend = backend
    positions, targets, expected = [], [], []
    for r, row in enumerate(rows):
        slot = r * batch.row_length
        for tokens, kind in row:
            if kind.startswith("pair"):
                prompt, chosen = (int(x) for x in kind.split(":")[1:])
                for response_begin, response_end in (
                    (prompt, prompt + chosen),
                    (prompt + chosen, len(tokens)),
                ):
                    sequence = tokens[:prompt] + tokens[response_begin:response_end]
                    reference_logps = torch.log_softmax(_reference_logits(reference, sequence), dim=-1)
                    for j in range(response_end - response_begin):
                        # explicit predictor slot: the first token of either response is predicted by the prompt end
                        predictor = prompt - 1 if j == 0 else response_begin + j - 1
                        positions.append(slot + predictor)
                        targets.append(tokens[response_begin + j])
                        expected.append(reference_logps[prompt - 1 + j, tokens[response_begin + j]])
            slot += len(tokens)
    hidden = model.hidden_states(batch)  # (R, T, D)
    result = target_logprobs(hidden, model.lm_head_weight, torch.tensor(positions), torch.tensor(targets), 7)
    torch.testing.assert_close(result.logps.detach(), torch.stack(expected), atol=1e-5, rtol=0)
