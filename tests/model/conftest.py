"""Tiny random Hugging Face configs of each supported architecture and a hand-built PackedBatch helper."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from unitrain.data.batch import SEGMENT_PLAIN, SEGMENT_PROMPT, SEGMENT_RESPONSE, PackedBatch

TINY = dict(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

HF_CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "llama3-scaled-tied-bias": lambda: LlamaConfig(
        **TINY,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral-window": lambda: MistralConfig(**TINY, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**TINY),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=16),
}


def _random_hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny transformers model with random weights, biases and norm scales (so every tensor matters)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(HF_CONFIGS[name]())
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name:
                param.add_(torch.randn_like(param) * 0.1)
            else:
                param.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(params=list(HF_CONFIGS))
def architecture(request: pytest.FixtureRequest) -> str:
    return request.param


def _make_batch(rows: list[list[tuple[list[int], str]]], row_length: int | None = None) -> PackedBatch:
    """Build a PackedBatch by hand. Each row is a list of documents; a document is (tokens, kind) with kind
    "plain", "pair:P:C" (a shared-prompt pair with a prompt of P tokens and a chosen response of C tokens, the
    rest rejected) or "group:P:L1:...:Lk" (a prompt of P tokens and responses of L1, ..., Lk tokens, the last one
    taking the rest). Targets are not filled in: tests compute them from the layout themselves."""
    length = row_length or max(sum(len(tokens) for tokens, _ in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    document_id = torch.full(shape, -1, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        slot = 0
        for doc, (tokens, kind) in enumerate(row):
            n = len(tokens)
            input_ids[r, slot : slot + n] = torch.tensor(tokens)
            document_id[r, slot : slot + n] = doc
            position_ids[r, slot : slot + n] = torch.arange(n)
            segment[r, slot : slot + n] = SEGMENT_PLAIN
            if kind.startswith(("pair", "group")):
                prompt, *lengths = (int(v) for v in kind.split(":")[1:])
                lengths.append(n - prompt - sum(lengths))
                segment[r, slot : slot + prompt] = SEGMENT_PROMPT
                begin = slot + prompt
                for number, length in enumerate(lengths):  # every response continues from the prompt
                    segment[r, begin : begin + length] = SEGMENT_RESPONSE + number
                    position_ids[r, begin : begin + length] = torch.arange(prompt, prompt + length)
                    begin += length
            slot += n
    return PackedBatch.layout_only(input_ids, position_ids, document_id, segment)


@pytest.fixture(scope="session")
def random_hf_model():
    return _random_hf_model


@pytest.fixture
def make_batch():
    return _make_batch
