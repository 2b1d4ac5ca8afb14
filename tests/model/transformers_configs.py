"""Tiny `model.config` dicts of the architectures the transformers backend is tested on, and helpers that build the
backend's model and an independent eager `transformers` twin with the same random weights.

The values that make an architecture differ are set so that they bite on short sequences: windows of 4 positions,
strong soft-caps (Gemma 2), scalings away from 1 (Granite, Gemma's query scalar), partial rotary (GPT-NeoX,
StableLM), q/k norms (OLMo 2, StableLM, Qwen3), parallel residuals (StableLM), experts (Mixtral, Qwen2-MoE)."""

from __future__ import annotations

import copy

import torch

VOCAB = 61
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
NO_GQA = {key: value for key, value in BASE.items() if key != "num_key_value_heads"}

ARCHITECTURES = {
    "gpt2": dict(
        model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
        bos_token_id=None, eos_token_id=None,
    ),
    "gpt_neox": dict(model_type="gpt_neox", **NO_GQA, rotary_pct=0.5, use_parallel_residual=True),
    "gemma2": dict(
        model_type="gemma2", **BASE, head_dim=8, sliding_window=4, final_logit_softcapping=0.5,
        attn_logit_softcapping=1.0, query_pre_attn_scalar=3,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text", **BASE, head_dim=8, sliding_window=4, query_pre_attn_scalar=3,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi3": dict(model_type="phi3", **BASE),
    "olmo2": dict(model_type="olmo2", **BASE),
    "granite": dict(
        model_type="granite", **BASE, logits_scaling=4.0, attention_multiplier=0.3, embedding_multiplier=2.0,
        residual_multiplier=0.5,
    ),
    "stablelm": dict(model_type="stablelm", **BASE, qk_layernorm=True, use_parallel_residual=True),
    "mixtral": dict(model_type="mixtral", **BASE, num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
    "qwen2_moe": dict(
        model_type="qwen2_moe", **BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, use_sliding_window=True, sliding_window=4, max_window_layers=1,
        layer_types=["full_attention", "sliding_attention"],
    ),
    "qwen2_yarn": dict(  # a native family with a feature the native decoder lacks: auto picks transformers
        model_type="qwen2", **BASE,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "llama": dict(model_type="llama", **BASE),
    "qwen3": dict(model_type="qwen3", **BASE, head_dim=16),
}  # fmt: skip


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights, biases and norm scales, so that every tensor matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("bias") or "norm" in name:
                parameter.add_(noise * 0.1)
            else:
                parameter.copy_(noise * 0.1)


def build(name: str, seed: int = 0):
    """(the backend's model, an eager transformers twin with the same weights), both fp32."""
    from transformers import AutoModelForCausalLM

    from unitrain.model.hf_backend.build import build_hf_model

    torch.manual_seed(seed)
    model = build_hf_model(ARCHITECTURES[name])
    randomize(model, seed)
    twin = AutoModelForCausalLM.from_config(copy.deepcopy(model.hf.config), attn_implementation="eager")
    twin.load_state_dict(model.hf.state_dict())
    return model, twin.eval()


def twin_logits(twin):
    """The eager twin as `standalone_response_logps` wants it: input_ids (1, L) -> logits (1, L, V)."""
    return lambda ids: twin(ids).logits
