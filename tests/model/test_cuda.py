"""CUDA checks (skipped without a GPU): flex attention with a BlockMask equals the SDPA boolean-mask backend on a
packed shared-prompt batch, in fp32 and bf16, and the chunked log-probs match the naive ones on the GPU."""

from __future__ import annotations

import pytest
import torch

from unitrain.losses.logprobs import target_logprobs
from unitrain.model import ModelConfig, build_model
from unitrain.model.attention import build_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAYOUT = [
    [(140, "plain"), (90, "pair:30:25"), (33, "plain")],
    [(200, "pair:80:50"), (7, "plain")],
    [(64, "plain")],
]


def _model_and_batch(make_batch, dtype):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        initializer_range=0.2,
    )  # fmt: skip
    model = build_model(config).to("cuda", dtype)
    generator = torch.Generator().manual_seed(1)
    rows = [
        [(torch.randint(0, 256, (n,), generator=generator).tolist(), kind) for n, kind in row]
        for row in LAYOUT
    ]
    return model, make_batch(rows).to("cuda")


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_flex_equals_sdpa_mask(make_batch, dtype, tolerance):
    model, batch = _model_and_batch(make_batch, dtype)
    real = batch.document_id >= 0
    # a random projection: mean(hidden ** 2) would be constant after the final RMSNorm, its gradient pure noise
    projection = torch.randn(
        int(real.sum()), 64, device="cuda", generator=torch.Generator("cuda").manual_seed(2)
    )
    results = {}
    for backend in ("dense", "blocks", "flex"):
        model.zero_grad()
        model.attention_backend = backend
        hidden = model.hidden_states(batch)  # (R, T, D)
        (hidden[real].float() * projection).sum().backward()
        results[backend] = (hidden[real].float(), model.layers[0].attention.qkv.weight.grad.float())
    assert build_attention(batch, "auto").backend == "flex"
    for backend in ("blocks", "flex"):
        for actual, expected in zip(results[backend], results["dense"]):
            relative_error = (actual - expected).norm() / expected.norm()
            assert relative_error < tolerance, (backend, float(relative_error))


def test_chunked_logprobs_on_gpu():
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 300, 64, device="cuda", generator=generator, requires_grad=True)
    weight = torch.randn(5000, 64, device="cuda", generator=generator, requires_grad=True)
    positions = torch.randperm(600, device="cuda", generator=generator)[:500]
    targets = torch.randint(0, 5000, (500,), device="cuda", generator=generator)
    logits = hidden.reshape(-1, 64)[positions] @ weight.T  # (N, V)
    expected = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    expected_grads = torch.autograd.grad(expected.sum(), (hidden, weight))
    result = target_logprobs(hidden, weight, positions, targets, chunk_size=128)
    grads = torch.autograd.grad(result.logps.sum(), (hidden, weight))
    torch.testing.assert_close(result.logps, expected, atol=1e-4, rtol=1e-4)
    for actual, reference in zip(grads, expected_grads):
        torch.testing.assert_close(actual, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["gemma2", "mixtral"])
def test_flex_inside_a_transformers_model_equals_eager_transformers(architecture):
    """The transformers backend on CUDA (flex, with Gemma 2's soft-caps and windows) against eager transformers on
    each sequence alone, fp32."""
    from unitrain.train.step.reference import pair_logps_of

    from ..preference.conftest import ListDataset, packed_batch, random_pairs, standalone_pair_logps
    from .transformers_configs import build, twin_logits

    model, twin = build(architecture)
    model, twin = model.to("cuda"), twin.to("cuda")
    pairs = ListDataset(random_pairs(7, seed=21, prompt=(2, 9), response=(1, 7)), "preference")
    batch = packed_batch(pairs, "packed", True, sequence_length=40).to("cuda")
    forward = twin_logits(twin)
    with torch.no_grad():
        expected = torch.stack(
            [standalone_pair_logps(lambda ids: forward(ids.cuda()).cpu(), pairs[i]) for i in range(7)]
        )
        sums = pair_logps_of(model, batch)[0][batch.group_index.argsort()].cpu()
    torch.testing.assert_close(sums, expected, rtol=1e-4, atol=1e-4)
