"""What tokenizing checks beyond a row's fields: where a chat template ends a turn, and three signs of tokens that
differ from what the model will see (counted in the prepare report; `--on-error fail` stops at the first).

- The end of a turn: the special token a chat template renders right after a message's content (`<|im_end|>`,
  `<|eot_id|>`, `<end_of_turn>`), found once by rendering a probe conversation. A response ends with exactly one
  end token: what the template renders after it (ChatML's newline) is neither a target nor kept, and no EOS is
  appended behind it (ChatML responses ended `<|im_end|>`, newline, `<|im_end|>`: ids 2, 198, 2 for SmolLM2).
- `boundary_merge`: a response whose tokens differ when tokenized together with its prompt (a BPE merge across
  the boundary, e.g. a prompt ending in a space). Checked on WINDOW characters either side of each boundary,
  three short encodes per boundary in one batch call, rather than a second tokenization of every whole row.
- `doubled_bos`: a sample starting with BOS twice (a template's BOS and the text's own).
- `response_without_end_token`: a response (or SFT document) left without an end token, by `--max-length`.
Trade-off: such rows are kept (segment-wise tokens are the documented behaviour) and counted with their first
rows, not dropped, so a dataset with a few is still usable and the user decides (`--on-error fail` refuses it).
"""

from __future__ import annotations

PROBE = "\u2063unitrain-probe\u2063"  # a response text no template adds anything to
TAIL_TOKENS = 4  # the most tokens a template renders after the end of a turn that are cut
WINDOW = 16  # characters either side of a prompt/response boundary that the merge check tokenizes
WARNINGS = {
    "boundary_merge": "tokens differ when the response is tokenized together with the text before it (a merge "
    "across the boundary); end the prompt without a trailing space",
    "doubled_bos": "the tokens start with BOS twice (the chat template's and the text's)",
    "response_without_end_token": "the response has no end token (cut by max_length): the model never learns to "
    "stop there",
}


def turn_end_id(tokenizer) -> int | None:
    """The special token the chat template renders right after an assistant message, or None."""
    if tokenizer.chat_template is None:
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.render(messages, add_generation_prompt=False)
    except Exception:  # a template that refuses the probe (roles, system turn): EOS alone ends a response
        return None
    at = text.rfind(PROBE)
    ids = tokenizer.encode([text[at + len(PROBE) :]])[0] if at >= 0 else []
    special = ids[0] in tokenizer.special_ids and ids[0] != tokenizer.bos_id if ids else False
    return ids[0] if special else None


def turn_length(ids: list[int], tokenizer) -> int:
    """How many of `ids` to keep: up to the last end token when only whitespace follows it (what a template
    renders after a turn), else all."""
    for back in range(1, min(len(ids), TAIL_TOKENS + 1) + 1):
        if ids[-back] in tokenizer.end_ids:
            keep = len(ids) - back + 1
            return keep if back == 1 or not tokenizer.decode(ids[keep:]).strip() else len(ids)
    return len(ids)


def boundaries(document, kind: str) -> list[tuple[int, int]]:
    """(segment before, segment after) pairs whose junction a merge must not cross: the prompt and each response
    of a pair or group, consecutive segments of an SFT document."""
    count = len(document.segments)
    if document.scores is not None or kind == "preference":
        return [(0, k) for k in range(1, count)]
    return [(k, k + 1) for k in range(count - 1)] if kind == "sft" else []


def merged_boundaries(documents, tokenizer, kind: str) -> list[tuple[int, int]]:
    """(document position, segment after the boundary) of every boundary a merge crosses, in document order.
    The windows of one batch are encoded in one call, each distinct text once (a pair's prompt window serves
    both responses)."""
    found, texts = [], {}
    for position, document in enumerate(documents):
        for before, after in boundaries(document, kind):
            left, right = document.segments[before][-WINDOW:], document.segments[after][:WINDOW]
            if left and right:
                found.append((position, after, texts.setdefault(left + right, len(texts)),
                              texts.setdefault(left, len(texts)), texts.setdefault(right, len(texts))))  # fmt: skip
    encoded = tokenizer.encode(list(texts)) if texts else []
    return [
        (position, after)
        for position, after, joint, left, right in found
        if encoded[joint] != encoded[left] + encoded[right]
    ]
