"""Rows that rank several responses to one prompt → group documents: prompt, N responses, N scores.

Shapes (every field name configurable with `--field`):
  completions     `prompt` + `completions`: [{`response`: text or messages, `overall_score`: number}, ...]
                  (UltraFeedback; the two inner names are the fields `completion_text` / `completion_score`)
  responses       `prompt` + `responses`: [text or messages, ...] + `scores`: [number, ...]
  rejected list   `prompt` + `chosen` + `rejected`: [text or messages, ...]; chosen scores 1, each rejected 0
Responses are all text (the prompt is then text too) or all message lists (rendered with the chat template; the
prompt is their shared leading messages, a text `prompt` becoming the user turn, as for pairs). A response that
is null or empty is skipped and counted; the row is dropped when fewer than two remain, or when a score is
missing, not a number, not finite, or the scores do not match the responses one to one. Trade-off: each
response is tokenized alone, as a pair's are, so the prompt's tokens are the same for every response.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from unitrain.data.rows.schemas import (
    Document,
    RowError,
    checked_messages,
    group_shape,
    row_render,
    split_conversations,
    string_field,
)

# per row shape: the schema fields its responses and its scores come from (what a group's skip names)
GROUP_FIELDS = {
    "completions": ("completions", "completions"),
    "responses": ("responses", "scores"),
    "rejected_list": ("rejected", "rejected"),
}


def _score(value, field: str, number: int) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError("bad_score", field, f"score {number} is {value!r}, not a number")
    if not math.isfinite(value):
        raise RowError("bad_score", field, f"score {number} is {value}, not finite")
    return float(value)


def _items(row: dict, fields: dict[str, str], shape: str | None) -> list[tuple[object, float, str]]:
    """[(response value, score, field name)] in the row's order, scores validated."""
    if shape == "completions":
        key, text_key, score_key = (
            fields["completions"],
            fields["completion_text"],
            fields["completion_score"],
        )
        items = []
        for number, completion in enumerate(row[key]):
            if not isinstance(completion, dict):
                raise RowError("bad_completions", key, f"completion {number} is not an object")
            items.append((completion.get(text_key), _score(completion.get(score_key), key, number), key))
        return items
    if shape == "responses":
        key, score_key = fields["responses"], fields["scores"]
        if score_key not in row:
            raise RowError("missing_field", score_key, "field is missing")
        scores = row[score_key]
        if not isinstance(scores, list) or len(scores) != len(row[key]):
            length = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise RowError("scores_mismatch", score_key, f"{length} scores for {len(row[key])} responses")
        return [
            (value, _score(score, score_key, n), key)
            for n, (value, score) in enumerate(zip(row[key], scores))
        ]
    if shape == "rejected_list":
        chosen, rejected = fields["chosen"], fields["rejected"]
        return [(row.get(chosen), 1.0, chosen)] + [(value, 0.0, rejected) for value in row[rejected]]
    raise RowError(
        "missing_field",
        fields["completions"],
        f"field is missing (a group row has {fields['completions']!r}, {fields['responses']!r} + "
        f"{fields['scores']!r}, or {fields['chosen']!r} + a list {fields['rejected']!r})",
    )


def extract_group(
    row_index: int, row: dict, fields: dict[str, str], render: Callable[..., str] | None
) -> Document:
    """One group-shaped row → a Document with roles prompt, response, ... and one score per response."""
    shape = group_shape(row, fields)
    items = _items(row, fields, shape)
    kept = [(value, score, key) for value, score, key in items if value not in (None, "", [])]
    skipped = len(items) - len(kept)
    if len(kept) < 2:
        raise RowError("too_few_responses", items[0][2] if items else None, f"{len(kept)} usable responses")
    texts = [isinstance(value, str) for value, _, _ in kept]
    if all(texts):
        name = "text" if fields["text"] in row and fields["prompt"] not in row else "prompt"
        segments = [string_field(row, fields, name)] + [value for value, _, _ in kept]
    elif not any(texts):
        conversations = [checked_messages(value, key) for value, _, key in kept]
        field = kept[0][2]
        segments = split_conversations(row, fields, row_render(render, field), conversations, field)
    else:
        raise RowError("mixed_responses", kept[0][2], "responses mix texts and message lists")
    for value, _, key in kept:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RowError(
                    "invalid_utf8", key, "contains an unpaired surrogate (not valid UTF-8)"
                ) from None
    roles = ["prompt"] + ["response"] * len(kept)
    ignored = row.get(fields["loss_masking_spans"]) is not None
    scores = [score for _, score, _ in kept]
    return Document(row_index, segments, roles, ignored, scores, skipped, GROUP_FIELDS[shape])
