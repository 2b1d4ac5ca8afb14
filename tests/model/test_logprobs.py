"""Chunked target log-probs and their gradients against the naive full-logits log_softmax."""

from __future__ import annotations

import pytest
import torch

from unitrain.losses.logprobs import target_logprobs

ROWS, LENGTH, WIDTH, VOCAB, TARGETS = 3, 20, 24, 97, 50


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, LENGTH, WIDTH, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, WIDTH, generator=generator).mul_(0.5).requires_grad_()
    positions = torch.randperm(ROWS * LENGTH, generator=generator)[:TARGETS]
    targets = torch.randint(0, VOCAB, (TARGETS,), generator=generator)
    upstream = torch.randn(TARGETS, generator=generator)  # a non-uniform gradient from the loss
    return hidden, weight, positions, targets, upstream


def _naive(hidden, weight, positions, targets):
    logits = hidden.reshape(-1, WIDTH)[positions] @ weight.T  # (N, V): the full logits
    logps = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return logps, logits.argmax(-1) == targets


@pytest.mark.parametrize("chunk_size", [1, 7, 10, 49, 50, 64])  # 49: a last chunk of one target
def test_logprobs_and_gradients_equal_naive(chunk_size):
    hidden, weight, positions, targets, upstream = _inputs()
    expected, expected_correct = _naive(hidden, weight, positions, targets)
    grad_hidden, grad_weight = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    result = target_logprobs(hidden, weight, positions, targets, chunk_size=chunk_size, with_argmax=True)
    torch.testing.assert_close(result.logps, expected, atol=1e-5, rtol=0)
    assert torch.equal(result.correct, expected_correct)
    actual_hidden, actual_weight = torch.autograd.grad((result.logps * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(actual_hidden, grad_hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual_weight, grad_weight, atol=1e-5, rtol=0)


def test_argmax_is_exercised_and_optional():
    hidden, weight, positions, _, _ = _inputs(1)
    with torch.no_grad():
        predicted = (hidden.reshape(-1, WIDTH)[positions] @ weight.T).argmax(-1)  # (N,)
    targets = torch.where(torch.arange(TARGETS) % 2 == 0, predicted, (predicted + 1) % VOCAB)
    result = target_logprobs(hidden, weight, positions, targets, chunk_size=8, with_argmax=True)
    assert torch.equal(result.correct, torch.arange(TARGETS) % 2 == 0)
    assert target_logprobs(hidden, weight, positions, targets).correct is None


def test_frozen_head_gives_hidden_gradient_only():
    hidden, weight, positions, targets, upstream = _inputs(2)
    weight = weight.detach()
    expected = torch.autograd.grad((_naive(hidden, weight, positions, targets)[0] * upstream).sum(), hidden)[
        0
    ]
    result = target_logprobs(hidden, weight, positions, targets, chunk_size=16)
    actual = torch.autograd.grad((result.logps * upstream).sum(), hidden)[0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_bf16_autocast_runs_head_in_bf16():
    hidden, weight, positions, targets, _ = _inputs(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = target_logprobs(hidden, weight, positions, targets, chunk_size=16)
    result.logps.sum().backward()
    assert result.logps.dtype == torch.float32 and weight.grad.dtype == torch.float32
    logits = (hidden.reshape(-1, WIDTH)[positions].bfloat16() @ weight.bfloat16().T).float()  # (N, V)
    expected = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(result.logps, expected, atol=2e-2, rtol=0)
    exact = _naive(hidden, weight, positions, targets)[0]
    assert (result.logps - exact).abs().max() > 1e-6  # the matmul really ran in bf16


def test_bad_chunk_size_is_refused():
    hidden, weight, positions, targets, _ = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        target_logprobs(hidden, weight, positions, targets, chunk_size=0)
