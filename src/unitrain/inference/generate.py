"""Completions of prompts: prompts read from a file, the command line or a run's held-out pairs, tokenized as the
data was (chat template for messages, BOS when the tokenizer has one), then decoded by `transformers`' `generate`.

`generate` brings the KV cache, greedy decoding, temperature and top-p sampling, and stopping at any of several
EOS ids; nothing here samples by hand. Prompts go in batches, left-padded with an attention mask. Trade-off: a
batch runs until its longest completion ends, so very uneven completions waste some compute; sampling draws from
one seeded generator in prompt order, so a seed reproduces a run only with the same prompts and batch size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unitrain.errors import UnitrainError


@dataclass
class Prompt:
    ids: list[int]  # what the model continues
    source: dict = field(default_factory=dict)  # where it came from, copied into the output row


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


def read_prompts(path: str | Path) -> list[str | list[dict]]:
    """A JSONL file (each line a string, or an object with `prompt` (text or messages) or `messages`), or a
    text file with one prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise UnitrainError(f"{path}: no such prompts file")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UnitrainError(f"{path}:{number}: invalid JSON ({error})") from None
        prompt = row.get("prompt", row.get("messages")) if isinstance(row, dict) else row
        valid_messages = isinstance(prompt, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )
        if not (isinstance(prompt, str) or (valid_messages and prompt)):
            raise UnitrainError(
                f"{path}:{number}: expected a string, or an object whose `prompt` or `messages` is text or a list "
                "of {role, content} messages"
            )
        prompts.append(prompt)
    return prompts


def encode_prompts(tokenizer, prompts: list[str | list[dict]], chat: bool) -> list[Prompt]:
    """Token ids of each prompt, as prepare tokenizes them: messages rendered with the chat template and a
    generation prompt (plain strings too with `chat`, as one user message), BOS first when the tokenizer has
    one and the text does not already start with it."""
    encoded = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if chat and isinstance(prompt, str) else prompt
        text = prompt if isinstance(messages, str) else tokenizer.render(messages, add_generation_prompt=True)
        (ids,) = tokenizer.encode([text])
        if tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
            ids = [tokenizer.bos_id, *ids]
        encoded.append(Prompt(ids, {"prompt": prompt}))
    return encoded


def held_out_prompts(
    run_dir: str | Path, data: str | Path | None, limit: int | None
) -> tuple[list[Prompt], object]:
    """The prompts of the pairs (or SFT documents) the run in `run_dir` held out, with their dataset: the one of
    `data`, else the first the run validated on. A pair's chosen response rides along for comparison."""
    from unitrain.data.memmap import GPTMemmapDataset
    from unitrain.train.data import VALIDATION_RECORD, held_out_indices

    if data is None:
        record = Path(run_dir) / VALIDATION_RECORD
        if not record.is_file():
            raise UnitrainError(
                f"{record} not found: {run_dir} is not the output directory of a training run"
            )
        entries = json.loads(record.read_text())["datasets"]
        if not entries:
            raise UnitrainError(f"{run_dir} held nothing out (its data.validation is not set)")
        data = entries[0]["path"]
    dataset = GPTMemmapDataset(data)
    indices = held_out_indices(run_dir, dataset)[:limit]
    prompts = []
    for index in indices.tolist():
        sample = dataset[index]
        if sample.is_preference:
            ids = sample.prompt_ids
            extra = {"chosen_ids": sample.response_ids(int(np.argmax(sample.group_scores))).tolist()}
        elif (
            sample.loss_masking_spans is not None
            and len(sample.loss_masking_spans)
            and sample.loss_masking_spans[0, 0] == 0
        ):
            ids, extra = sample.token_ids[: int(sample.loss_masking_spans[0, 1])], {}
        else:
            raise UnitrainError(
                f"{data}: document {index} has no prompt (a preference pair or an SFT document with a masked prompt)"
            )
        prompts.append(Prompt([int(i) for i in ids], {"index": index, **extra}))
    return prompts, dataset


def complete(
    model, prompts: list[Prompt], sampling: Sampling, batch_size: int
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
    torch.manual_seed(sampling.seed)
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = [prompt.ids for prompt in prompts[start : start + batch_size]]
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
