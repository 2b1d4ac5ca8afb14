"""What a decoder layer keeps for the backward pass: the norm and SwiGLU recompute their cheap intermediates, with
exact gradients (checked against autograd through the plain formulas, in float64)."""

from __future__ import annotations

import contextlib
import gc
import weakref

import torch
import torch.nn.functional as F

from unitrain.model.attention import causal_attention
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


def _block_and_inputs(seed: int = 0):
    config = ModelConfig.from_hf(
        {"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2},
        source="test",
    )  # fmt: skip
    torch.manual_seed(seed)
    block = Block(config)
    for parameter in block.parameters():  # norms away from 1, so a wrong recomputation shows
        torch.nn.init.normal_(parameter, std=0.3)
    x = torch.randn(2, 10, 32, requires_grad=True)
    positions = torch.arange(10).expand(2, 10)
    cos, sin = rope_tables(rope_inverse_frequencies(config), positions, torch.float32)
    return block, (x, cos, sin, causal_attention())


def test_block_keeps_neither_normed_inputs_nor_the_mlp_product():
    """The two norms' outputs and silu(gate) * up are recomputed in backward from what the graph keeps anyway (the
    norm's input, the gate/up projection): their memory is free once the forward returns."""
    block, inputs = _block_and_inputs()
    storages = {}

    def keep(name):
        def hook(module, args, output):
            storages[name] = weakref.ref(output.untyped_storage())

        return hook

    for name in ("attention_norm", "mlp_norm", "attention.qkv", "mlp.gate_up"):
        block.get_submodule(name).register_forward_hook(keep(name))
    block.mlp.down.register_forward_pre_hook(
        lambda module, args: storages.__setitem__("mlp product", weakref.ref(args[0].untyped_storage()))
    )
    out = block(*inputs)
    gc.collect()
    alive = {name: ref() is not None for name, ref in storages.items()}
    assert alive == {
        "attention_norm": False, "mlp_norm": False, "mlp product": False,
        "attention.qkv": True, "mlp.gate_up": True,  # kept: the attention and _SiluMul need them
    }  # fmt: skip
    out.sum().backward()  # and the backward still runs


def test_recomputed_tensors_give_the_same_gradients_bit_for_bit():
    """Against the same block with every intermediate kept (any outer saved-tensor hook switches the recipes off,
    as activation checkpointing's does)."""
    grads = []
    for keep_all in (False, True):
        block, (x, *rest) = _block_and_inputs(seed=3)
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with hooks if keep_all else contextlib.nullcontext():
            out = block(x, *rest)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        grads.append([x.grad] + [p.grad for p in block.parameters()])
    for recomputed, kept in zip(*grads, strict=True):
        assert torch.equal(recomputed, kept)
