"""What a decoder layer keeps for the backward pass: the norm and SwiGLU recompute their cheap intermediates, with
exact gradients (checked against autograd through the plain formulas, in float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unitrain.model.config import ModelConfig
from unitrain.model.llama import Block, RMSNorm, SwiGLU, _RMSNormFunction, _SiluMul


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
