"""Prompts for `generate`: read from a file or the command line and tokenized as `prepare` tokenizes (chat
template for messages, BOS when the tokenizer has one), or taken as token ids from the pairs a run held out.
Trade-off: a text file holds one prompt per line, so a multi-line prompt needs JSONL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unitrain.errors import UnitrainError


@dataclass
class Prompt:
    ids: list[int]  # what the model continues
    source: dict = field(default_factory=dict)  # where it came from, copied into the output row


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
