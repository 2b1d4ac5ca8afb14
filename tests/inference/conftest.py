"""A tiny random Llama over the GPT-2 vocabulary, saved with its tokenizer, and transformers' own greedy decoding."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

EOS = 50256


def save_tiny_checkpoint(directory, gpt2_tokenizer_path, seed: int = 0) -> None:
    """Weights drawn with std 0.1 (not 0.02) so that greedy choices are not near-ties that rounding could flip."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    shutil.copyfile(gpt2_tokenizer_path, directory / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, gpt2_tokenizer_path):
    directory = tmp_path_factory.mktemp("generate") / "base"
    save_tiny_checkpoint(directory, gpt2_tokenizer_path)
    return directory


def transformers_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Each prompt decoded alone (no padding) by `model.generate`, up to and including the first EOS."""
    completions = []
    for ids in prompts:
        with torch.no_grad():
            output = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=EOS,
                pad_token_id=EOS, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )  # fmt: skip
        completions.append(output[0, len(ids) :].tolist())
    return completions
