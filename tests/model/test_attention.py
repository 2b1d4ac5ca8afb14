"""Attention backends: the dense mask against a literal reading of the rule, blocks == dense (values and
gradients), backend selection, activation checkpointing and bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from unitrain.data.batch import SEGMENT_PROMPT
from unitrain.model import ModelConfig, build_model
from unitrain.model.attention import build_attention, dense_mask

LAYOUT = [
    [(40, "plain"), (15, "pair:5:4"), (3, "plain"), (1, "plain")],
    [(22, "pair:9:3"), (17, "plain"), (24, "group:4:6:2:9")],
    [(6, "plain")],
]


def _batch(make_batch, layout=LAYOUT):
    generator = torch.Generator().manual_seed(0)
    rows = [
        [(torch.randint(0, 50, (n,), generator=generator).tolist(), kind) for n, kind in row]
        for row in layout
    ]
    return make_batch(rows)


def _literal_mask(batch, window):
    """The rule of data/batch.py, one (q, k) pair at a time."""
    rows, length = batch.input_ids.shape
    mask = torch.zeros(rows, 1, length, length, dtype=torch.bool)
    doc, seg, pos = batch.document_id.tolist(), batch.segment.tolist(), batch.position_ids.tolist()
    for r in range(rows):
        for q in range(length):
            for k in range(length):
                same = doc[r][q] == doc[r][k] != -1 and k <= q
                cross = seg[r][k] > SEGMENT_PROMPT and seg[r][k] != seg[r][q]  # another response's token
                inside = window is None or pos[r][q] - pos[r][k] < window
                mask[r, 0, q, k] = (same and not cross and inside) or (q == k)
    return mask


@pytest.mark.parametrize("window", [None, 6])
def test_dense_mask_is_the_rule(make_batch, window):
    batch = _batch(make_batch)
    assert torch.equal(dense_mask(batch, window), _literal_mask(batch, window))


def _qkv(batch, heads=4, kv_heads=2, head_dim=8):
    generator = torch.Generator().manual_seed(1)
    shape = (batch.num_rows, batch.row_length)
    return (
        torch.randn(*shape, heads, head_dim, generator=generator, requires_grad=True),
        torch.randn(*shape, kv_heads, head_dim, generator=generator, requires_grad=True),
        torch.randn(*shape, kv_heads, head_dim, generator=generator, requires_grad=True),
    )


@pytest.mark.parametrize("window", [None, 6])
def test_blocks_equal_dense_with_gradients(make_batch, window):
    batch = _batch(make_batch)
    q, k, v = _qkv(batch)
    upstream = torch.randn(batch.num_rows, batch.row_length, 4, 8)
    outputs = {}
    for backend in ("dense", "blocks"):
        attention = build_attention(batch, backend, window)
        assert attention.backend == backend
        out = attention(q, k, v)  # (R, T, H, Dh)
        outputs[backend] = (out, *torch.autograd.grad((out * upstream).sum(), (q, k, v)))
    real = (batch.document_id >= 0)[..., None, None]
    for dense, blocks in zip(outputs["dense"], outputs["blocks"]):
        assert torch.isfinite(blocks).all()
        torch.testing.assert_close(blocks * real, dense * real, atol=1e-5, rtol=0)


def test_split_document_falls_back_to_dense(make_batch):
    batch = _batch(make_batch)
    batch.document_id[2, 3:] = 7  # row 2 now holds a second document after the first one's tail
    batch.document_id[2, 5] = batch.document_id[2, 0]  # ...and the first document reappears: not contiguous
    q, k, v = _qkv(batch)
    dense = build_attention(batch, "dense")(q, k, v)
    blocks = build_attention(batch, "blocks")(q, k, v)
    torch.testing.assert_close(blocks, dense, atol=1e-5, rtol=0)


def test_auto_backend_choice(make_batch):
    assert build_attention(_batch(make_batch), "auto").backend == "blocks"
    plain = _batch(make_batch, [[(12, "plain")], [(12, "plain")]])
    assert build_attention(plain, "auto").backend == "causal"
    assert build_attention(plain, "auto", sliding_window=4).backend == "blocks"
    with pytest.raises(ValueError, match="causal backend"):
        build_attention(_batch(make_batch), "causal")


def _tiny_model(**overrides):
    config = ModelConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        initializer_range=0.2, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return build_model(config)


def test_gradient_checkpointing_gives_same_values_and_gradients(make_batch):
    batch = _batch(make_batch)
    # a random projection: mean(hidden ** 2) would be constant after the final RMSNorm, its gradient pure noise
    projection = torch.randn(batch.num_rows, batch.row_length, 32, generator=torch.Generator().manual_seed(5))
    results = []
    for checkpointing in (False, True):
        model = _tiny_model()
        model.gradient_checkpointing = checkpointing
        hidden = model.hidden_states(batch)  # (R, T, D)
        (hidden * projection).sum().backward()
        results.append((hidden.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=0, rtol=0)
    for with_checkpoint, without in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(with_checkpoint, without, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_is_close_to_fp32(make_batch):
    batch = _batch(make_batch)
    model = _tiny_model()
    exact = model.hidden_states(batch)  # (R, T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approximate = model.hidden_states(batch)
    approximate.float().sum().backward()
    real = batch.document_id >= 0
    difference = (approximate.float() - exact)[real].abs().max()
    assert 1e-4 < difference < 0.1  # bf16 really ran, and stayed close
    assert all(
        torch.isfinite(p.grad).all() for name, p in model.named_parameters() if name != "lm_head.weight"
    )
