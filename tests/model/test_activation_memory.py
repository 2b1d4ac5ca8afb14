"""What a decoder layer keeps for the backward pass: the norm and SwiGLU recompute their cheap intermediates, with
exact gradients (checked against autograd through the plain formulas, in float64)."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from unitrain.model.attention import build_attention, causal_attention
from unitrain.model.config import ModelConfig
from unitrain.model.llama import (
    Block,
    RMSNorm,
    SwiGLU,
    _RMSNormFunction,
    _SiluMul,
    rope_inverse_frequencies,
    rope_tables,
)


def test_rms_norm_gradients_match_the_plain_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 8, dtype=torch.float64)
    plain = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    expected = torch.autograd.grad(plain, (x, weight), grad)
    fused = _RMSNormFunction.apply(x, weight, 1e-6)
    torch.testing.assert_close(fused, plain)
    for got, want in zip(torch.autograd.grad(fused, (x, weight), grad), expected):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormFunction.apply(a, w, 1e-6), (x, weight))


def test_silu_mul_gradients_match_the_plain_formula():
    torch.manual_seed(0)
    gate_up = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    gate, up = gate_up.chunk(2, dim=-1)
    plain = F.silu(gate) * up
    grad = torch.randn_like(plain)
    fused = _SiluMul.apply(gate_up)
    torch.testing.assert_close(fused, plain)
    expected = torch.autograd.grad(plain, gate_up, grad)[0]
    torch.testing.assert_close(torch.autograd.grad(fused, gate_up, grad)[0], expected)
    assert torch.autograd.gradcheck(_SiluMul.apply, (gate_up,))


def _saved_floats(module, *inputs) -> int:
    """Elements of the tensors autograd saves for the backward of `module(*inputs)`, each storage counted once."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = (
            tensor.untyped_storage().nbytes() // tensor.element_size()
        )
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(*inputs)
    return sum(storages.values())


def test_norm_and_mlp_keep_only_their_inputs_and_the_projection():
    """Per token, RMSNorm keeps its input (D) and one reciprocal rms; SwiGLU keeps its input (D), the gate/up
    projection (2F) and the down projection's input (F): nothing else (no normalized copy, no silu(gate))."""
    config = ModelConfig.from_hf(
        {"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 1, "num_attention_heads": 4},
        source="test",
    )  # fmt: skip
    tokens, width, inner = 10, 32, 48
    x = torch.randn(1, tokens, width, requires_grad=True)
    norm = RMSNorm(width, 1e-6)
    assert _saved_floats(norm, x) == tokens * width + tokens + width  # x, rstd, the weight
    mlp = SwiGLU(config)
    weights = sum(p.numel() for p in mlp.parameters())
    assert _saved_floats(mlp, x) == tokens * (width + 3 * inner) + weights
    assert isinstance(Block(config).mlp, SwiGLU)


def _block_and_inputs(make_batch, backend: str, seed: int = 0):
    config = ModelConfig.from_hf(
        {"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2},
        source="test",
    )  # fmt: skip
    torch.manual_seed(seed)
    block = Block(config)
    for parameter in block.parameters():  # norms away from 1, so a wrong recomputation shows
        torch.nn.init.normal_(parameter, std=0.3)
    if backend == "causal":
        positions, attention = torch.arange(12).expand(2, 12), causal_attention()
    else:  # a shared-prompt pair and a plain document in one row, a plain one in the other
        batch = make_batch([[([1] * 9, "pair:4:3"), ([2] * 3, "plain")], [([3] * 12, "plain")]])
        positions, attention = batch.position_ids, build_attention(batch, backend)
        assert attention.backend == backend
    x = torch.randn(2, 12, 32, requires_grad=True)
    cos, sin = rope_tables(rope_inverse_frequencies(config), positions, torch.float32)
    return block, (x, cos, sin, attention)


class _HeldBytes(TorchDispatchMode):
    """Records the memory of every tensor an op makes; `held()` is the part still alive (what the graph keeps)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                self.storages[storage.data_ptr()] = (weakref.ref(storage), storage.nbytes())
        return out

    def held(self) -> int:
        gc.collect()
        return sum(size for ref, size in self.storages.values() if ref() is not None)


@pytest.mark.parametrize("backend", ["causal", "dense", "blocks"])
def test_block_keeps_no_normed_input_no_mlp_product_and_one_attention_output(make_batch, backend):
    """Per token, the graph of a layer holds 2 D + F numbers less than with every intermediate kept: the two norms'
    outputs and silu(gate) * up are rebuilt in backward from what it keeps anyway (the norms' inputs, the gate/up
    projection). The blocks backend also drops its merged copy of the attention output (H * Dh), rebuilt from the
    kernel's own outputs; the causal and dense kernels' output is already the projection's input."""
    held = []
    for keep_all in (False, True):
        block, inputs = _block_and_inputs(make_batch, backend)
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with hooks if keep_all else contextlib.nullcontext(), _HeldBytes() as recorder:
            out = block(*inputs)
        held.append(recorder.held() - out.untyped_storage().nbytes())
    tokens, width, inner, attention_width = 2 * 12, 32, 48, 32
    dropped = 2 * width + inner + (attention_width if backend == "blocks" else 0)
    assert held[1] - held[0] == tokens * dropped * 4
    out.sum().backward()  # and the backward still runs


@pytest.mark.parametrize("backend", ["causal", "dense", "blocks"])
def test_recomputed_tensors_give_the_same_gradients_bit_for_bit(make_batch, backend):
    """Against the same block with every intermediate kept (any outer saved-tensor hook switches the recipes off,
    as activation checkpointing's does)."""
    grads = []
    for keep_all in (False, True):
        block, (x, *rest) = _block_and_inputs(make_batch, backend, seed=3)
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with hooks if keep_all else contextlib.nullcontext():
            out = block(x, *rest)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        grads.append([x.grad] + [p.grad for p in block.parameters()])
    for recomputed, kept in zip(*grads, strict=True):
        assert torch.equal(recomputed, kept)
