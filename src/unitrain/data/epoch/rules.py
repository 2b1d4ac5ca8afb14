"""The rules of what fits where: objectives and packing modes, the tokens SFT trains on, how a group too long
for one row is split into parts. The planner (`epoch/plan.py`, `epoch/plan_items.py`) and the collation
(`batches/collate.py`) both call these functions, so they agree on every item and every part.

Item lengths (slots used in a row):
  pretrain    a document split into pieces of at most `sequence_length` tokens; each piece is its own document
  sft         prompt+chosen for preference data, else the whole document; longer than a row → dropped, counted
  dpo         a group (a pair is a group of two responses): share_prompt: prompt + its responses; otherwise
              one prompt copy per response; mode `separate` puts each prompt+response in a batch row of its own
              (as TRL), so a planned row holds one group and becomes one batch row per response
A group longer than a row (not in `separate`) is split by `split_group` into parts, each with its own copy of the
prompt, that fill a *wide row* of their own: one batch row per part, all in the same batch. A group is dropped and
counted, whole, when one of its responses does not fit a row even with the prompt alone, or in `separate` when
prompt + its longest response does not (truncate in `unitrain prepare --max-length`, which sees the text).
Trade-off: numpy only (no torch), so an epoch is planned without importing torch; the price is that these rules
live apart from the collation that applies them.
"""

from __future__ import annotations

import numpy as np

from unitrain.data.sample import GPTSample
from unitrain.errors import UnitrainError

OBJECTIVES = ("pretrain", "sft", "dpo")
MODES = ("separate", "pair", "packed")


def check_options(objective: str, mode: str, sequence_length: int) -> None:
    if objective not in OBJECTIVES:
        raise UnitrainError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if mode not in MODES:
        raise UnitrainError(f"packing mode must be one of {', '.join(MODES)}, got {mode!r}")
    if sequence_length < 2:
        raise UnitrainError(f"sequence_length must be at least 2, got {sequence_length}")


def check_kind(dataset, objective: str) -> None:
    kind = dataset.kind
    if objective == "dpo" and kind != "preference":
        raise UnitrainError(f"objective dpo needs a preference dataset, got a {kind} dataset")
    if objective == "pretrain" and kind == "preference":
        raise UnitrainError("objective pretrain needs a pretraining or sft dataset, got a preference dataset")


def best_response(scores: np.ndarray) -> int:
    """The response SFT trains on in a group: the first of the top-scored ones."""
    return int(np.argmax(scores))


def sft_document(sample: GPTSample) -> np.ndarray:
    """The tokens SFT trains on: the document; for preference data, prompt + chosen (a group's best response)."""
    if sample.is_group:
        best = sample.response_ids(best_response(sample.scores))
        return np.concatenate([sample.prompt_ids, best])
    if sample.is_preference:
        return sample.token_ids[: sample.chosen_span[1]]
    return sample.token_ids


def sft_targets(sample: GPTSample) -> tuple[np.ndarray, int]:
    """Indices (in `sft_document(sample)`) of the tokens trained on, and that document's length."""
    if sample.is_preference:
        prompt_length, length = len(sample.prompt_ids), len(sft_document(sample))
        return np.arange(max(prompt_length, 1), length), length
    length = len(sample.token_ids)
    keep = np.ones(length, dtype=bool)
    keep[0] = False  # the first token has no context to predict it from
    if sample.loss_masking_spans is not None:
        for begin, end in sample.loss_masking_spans:
            keep[begin:end] = False
    return np.flatnonzero(keep), length


def split_group(
    prompt_length: int, response_lengths, sequence_length: int, share_prompt: bool
) -> list[int] | None:
    """Where the parts of a group start (response numbers) when it is laid out in rows of `sequence_length`:
    `[0]` when it fits one row, more when it must be split (each part with its own copy of the prompt), None when
    one response does not fit a row even with the prompt alone. Greedy, in response order: the planner and
    `collate` call this same function, so they agree on every part."""
    starts, used = [0], prompt_length if share_prompt else 0
    for number, length in enumerate(response_lengths):
        need = int(length) if share_prompt else prompt_length + int(length)
        if used + need <= sequence_length:
            used += need
            continue
        if prompt_length + int(length) > sequence_length:
            return None
        starts.append(number)
        used = prompt_length + int(length)
    return starts
