"""Completions from our `Transformer` through transformers' `generate`: the same weights handed to a transformers
causal LM (`to_transformers`), prompts in left-padded batches with an attention mask.

`generate` brings the KV cache, greedy decoding, temperature and top-p sampling, and stopping at any of several
EOS ids; nothing here samples by hand. Trade-offs: the transformers copy holds the weights a second time while
it exists; a batch runs until its longest completion ends, so very uneven completions waste some compute; sampling
draws from one seeded generator in prompt order, so a seed reproduces a run only with the same prompts and batch
size.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unitrain.errors import UnitrainError


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UnitrainError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UnitrainError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UnitrainError(f"--top-p must be in (0, 1], got {self.top_p}")


def complete(
    model, prompts: list[list[int]], sampling: Sampling, batch_size: int
) -> list[tuple[list[int], str]]:
    """(new token ids up to and including the first EOS, "eos" or "length") for each prompt, in order, from a
    `transformers` model's `generate`."""
    from transformers import GenerationConfig

    sample = sampling.temperature > 0
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sample,
        temperature=sampling.temperature if sample else None,
        top_p=sampling.top_p if sample else None,
        top_k=None,
        eos_token_id=sampling.eos_ids or None,
        pad_token_id=sampling.pad_id,
    )
    device = next(model.parameters()).device
    # a generator of its own: the caller's random state (a training run's, say) is left as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _standard_attention(model):
        torch.manual_seed(sampling.seed)
        return [
            result
            for start in range(0, len(prompts), batch_size)
            for result in _complete_batch(
                model, prompts[start : start + batch_size], config, sampling, device
            )
        ]


@contextlib.contextmanager
def _standard_attention(model) -> Iterator[None]:
    """A transformers-backend module attends through unitrain's packed attention, which needs a packed batch;
    `generate` (left padding, a KV cache) runs transformers' own SDPA attention instead, switched back after."""
    from unitrain.model.hf_backend.attention import ATTENTION_NAME

    packed = getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME
    if packed:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if packed:
            model.set_attn_implementation(ATTENTION_NAME)


def _complete_batch(
    model, batch: list[list[int]], config, sampling: Sampling, device
) -> list[tuple[list[int], str]]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), sampling.pad_id, dtype=torch.long)  # (B, W), left-padded
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config
        )  # (B, W + new)
    results = []
    for row in output[:, width:].tolist():
        stop = next((i for i, token in enumerate(row) if token in sampling.eos_ids), None)
        results.append((row, "length") if stop is None else (row[: stop + 1], "eos"))
    return results


def eos_ids(tokenizer, generation_config: Path | None) -> list[int]:
    """Every id that ends a completion: the generation config's EOS ids (an instruct model may stop at several)
    and the tokenizer's EOS."""
    ids = []
    if generation_config is not None:
        value = json.loads(generation_config.read_text()).get("eos_token_id")
        ids = value if isinstance(value, list) else [] if value is None else [value]
    if tokenizer is not None and tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return sorted(set(int(i) for i in ids))


def plain_state_dict(model) -> dict[str, torch.Tensor]:
    """`model`'s weights under our names with every LoRA adapter folded into its base weight (the model itself is
    left as it is: training goes on after a validation's samples)."""
    from unitrain.model.lora import lora_linears

    state = {name: tensor.detach() for name, tensor in model.state_dict().items() if ".lora_" not in name}
    for name, module in lora_linears(model).items():
        state[f"{name}.weight"] = module.merged_weight()
    return state


def to_transformers(model) -> torch.nn.Module:
    """A `transformers` causal LM holding `model`'s weights (adapters folded in) under their Hugging Face names,
    in eval mode, on `model`'s device and in its dtype; on the transformers backend the model's own transformers
    module (not a copy: its mode is the caller's to set)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from unitrain.model.hf import SPLIT_SIZES, hf_names

    hf_model = getattr(model, "hf", None)
    if isinstance(hf_model, torch.nn.Module):  # the transformers backend: already one, adapters live in it
        return hf_model

    hf = model.config.to_hf()
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    dtype = model.lm_head_weight.dtype
    device = model.lm_head_weight.device
    # its random init, overwritten below, draws from a forked generator: the caller's random state is kept
    with torch.random.fork_rng(devices=[]):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = {}
    for name, tensor in plain_state_dict(model).items():
        template, names = hf_names(name)
        parts = tensor.split(SPLIT_SIZES[template](model.config)) if len(names) > 1 else [tensor]
        tensors.update(zip(names, parts, strict=True))
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
    if unexpected or [
        name for name in missing if not (name == "lm_head.weight" and config.tie_word_embeddings)
    ]:
        raise UnitrainError(
            f"cannot hand the weights to transformers: missing {missing}, unexpected {unexpected}"
        )
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    return hf_model.to(device).eval()
