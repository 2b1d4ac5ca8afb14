"""Input rows → documents as text segments: parsing, detecting the schema, validating each row.

A `Document` is a list of text segments with a role each, before tokenization: `plain` (text), `masked` /
`trained` (SFT), `prompt` / `chosen` / `rejected` (preference). Trade-off: splitting into segments here, and
tokenizing every segment alone in `prepare/tokenize.py`, makes span boundaries exact at token boundaries and keeps the
prompt tokens identical for both responses, at the price of tokens that can differ from tokenizing the whole
text at once where a boundary falls inside a word.

Schemas (field names configurable): text `text`; sft `text` + `loss_masking_spans` (character ranges);
preference `prompt` (or `text`) + `chosen` + `rejected`, or implicit prompt from `chosen` + `rejected` alone;
conversation `messages`, or `chosen`/`rejected` (and optionally `prompt`) as message lists.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from unitrain.errors import UnitrainError

MODES = ("auto", "text", "sft", "preference", "conversation", "groups")
FIELDS = (
    "text",
    "prompt",
    "chosen",
    "rejected",
    "loss_masking_spans",
    "messages",
    "completions",
    "responses",
    "scores",
    "completion_text",
    "completion_score",
)
# the input column of each schema field unless renamed: its own name, but for the keys inside a completion
FIELD_DEFAULTS = {
    **{name: name for name in FIELDS},
    "completion_text": "response",
    "completion_score": "overall_score",
}
ASSISTANT_MARKER = "\n\nAssistant:"
ROLES = ("system", "user", "assistant")


class RowError(Exception):
    """A row that cannot become a document: `reason` is the counting key, `field` the offending field."""

    def __init__(self, reason: str, field: str | None, message: str) -> None:
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message

    def __reduce__(self):  # travels back from the worker processes
        return RowError, (self.reason, self.field, self.message)


@dataclass
class Document:
    row: int
    segments: list[str]
    roles: list[str]
    ignored_spans: bool = False  # the row had loss_masking_spans that this schema ignores
    scores: list[float] | None = None  # a group: one score per response segment
    skipped_responses: int = 0  # a group: null or empty responses left out
    group_fields: tuple[str, str] = (
        "responses",
        "scores",
    )  # a group: the fields its responses and scores came from


# ---------------------------------------------------------------- rows


def parse_row(raw: bytes | dict) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RowError("invalid_utf8", None, f"invalid UTF-8 at byte {error.start}") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise RowError(
            "unparsable_line", None, f"not valid JSON ({error.msg} at column {error.colno})"
        ) from None
    if not isinstance(row, dict):
        raise RowError("unparsable_line", None, f"a JSON {type(row).__name__}, not an object")
    return row


# ---------------------------------------------------------------- schemas


def detect_schema(row: dict, mode: str, fields: dict[str, str]) -> str:
    """The schema of a dataset from its first row: text | sft | preference | implicit | conversation | groups."""
    present = {name for name in FIELDS if fields[name] in row}
    lists = {name for name in present if isinstance(row[fields[name]], list)}
    prompt_present = "prompt" in present or "text" in present
    if mode == "auto":
        if group_shape(row, fields) is not None:
            mode = "groups"
        elif "messages" in present or {"chosen", "rejected"} & lists:
            mode = "conversation"
        elif {"chosen", "rejected"} <= present:
            mode = "preference"
        elif "text" in present:
            mode = "sft" if "loss_masking_spans" in present else "text"
        else:
            wanted = ", ".join(fields[name] for name in ("text", "chosen", "rejected", "messages"))
            raise UnitrainError(f"cannot detect the schema: the first row has none of the fields {wanted}")
    if mode == "preference":
        return "preference" if prompt_present else "implicit"
    if mode == "conversation" and "messages" not in present and not {"chosen", "rejected"} <= lists:
        found = [fields[name] for name in ("chosen", "rejected") if name in present and name not in lists]
        raise UnitrainError(
            f"conversation mode needs the field {fields['messages']!r} (a list of {{role, content}} messages) or "
            f"{fields['chosen']!r}/{fields['rejected']!r} as message lists; the first row has "
            + (
                f"{' and '.join(map(repr, found))} as text (use --mode preference)"
                if found
                else "none of them"
            )
        )
    if mode == "groups" and group_shape(row, fields) is None:
        wanted = [fields["completions"], fields["responses"], fields["rejected"]]
        raise UnitrainError(
            f"groups mode needs a list of responses in the field {wanted[0]!r} or {wanted[1]!r} (with "
            f"{fields['scores']!r}), or {wanted[2]!r} as a list; the first row has none of them"
        )
    return mode


def group_shape(row: dict, fields: dict[str, str]) -> str | None:
    """`completions`, `responses` or `rejected_list` when the row ranks several responses, else None."""
    if isinstance(row.get(fields["completions"]), list):
        return "completions"
    if isinstance(row.get(fields["responses"]), list):
        return "responses"
    rejected = row.get(fields["rejected"])
    if isinstance(rejected, list) and rejected and not isinstance(rejected[0], dict):
        return "rejected_list"  # a list of texts or of message lists (a list of dicts is one message list)
    return None


def string_field(row: dict, fields: dict[str, str], name: str, allow_empty: bool = True) -> str:
    key = fields[name]
    if key not in row:
        raise RowError("missing_field", key, "field is missing")
    value = row[key]
    if value is None:
        raise RowError("null_field", key, "field is null")
    if not isinstance(value, str):
        raise RowError("not_string", key, f"expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RowError("invalid_utf8", key, "contains an unpaired surrogate (not valid UTF-8)") from None
    if not value and not allow_empty:
        raise RowError(
            "empty_response" if name in ("chosen", "rejected") else "empty_text", key, "empty string"
        )
    return value


def implicit_prompt(chosen: str, rejected: str, marker: str = ASSISTANT_MARKER) -> int:
    """Length of the implicit prompt: the shared prefix of both texts, cut right after the last `marker` in it.

    Without the marker in the shared prefix, the cut falls before the last whitespace of the shared prefix, so each
    response keeps its leading space (" Paris" / " Lyon"). Returns 0 when there is no clean shared prefix.
    """
    shared, limit = 0, min(len(chosen), len(rejected))
    while shared < limit:  # binary search on C-level slice comparisons, not a Python loop per character
        middle = (shared + limit + 1) // 2
        if chosen[:middle] == rejected[:middle]:
            shared = middle
        else:
            limit = middle - 1
    prefix = chosen[:shared]
    found = prefix.rfind(marker)
    if found >= 0:
        return found + len(marker)
    return max(prefix.rfind(" "), prefix.rfind("\n"), 0)


def _char_spans(row: dict, fields: dict[str, str], length: int) -> list[tuple[int, int]]:
    key = fields["loss_masking_spans"]
    value = row.get(key)
    if value is None:
        return []
    try:
        spans = [(int(begin), int(end)) for begin, end in value]
    except (TypeError, ValueError):
        raise RowError("bad_spans", key, "expected a list of [begin, end] character pairs") from None
    spans.sort()
    for begin, end in spans:
        if begin < 0 or end > length:
            raise RowError(
                "span_out_of_range", key, f"span [{begin}, {end}) outside the text of {length} chars"
            )
        if begin >= end:
            raise RowError("span_reversed", key, f"span [{begin}, {end}) is empty or reversed")
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        if begin < end:
            raise RowError("span_overlap", key, f"spans overlap at character {begin}")
    return spans


def _sft_segments(text: str, spans: list[tuple[int, int]]) -> tuple[list[str], list[str]]:
    segments, roles, cursor = [], [], 0
    for begin, end in spans:
        if begin > cursor:
            segments.append(text[cursor:begin])
            roles.append("trained")
        segments.append(text[begin:end])
        roles.append("masked")
        cursor = end
    if cursor < len(text) or not segments:
        segments.append(text[cursor:])
        roles.append("trained")
    return segments, roles


def message_list(row: dict, key: str) -> list[dict]:
    value = row.get(key)
    if value is None:
        raise RowError("missing_field" if key not in row else "null_field", key, "field is missing or null")
    return checked_messages(value, key)


def checked_messages(value, key: str) -> list[dict]:
    """`value` as a validated list of {role, content} messages; `key` names it in errors."""
    if not isinstance(value, list) or not value:
        raise RowError("bad_messages", key, "expected a non-empty list of {role, content} messages")
    for number, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RowError("bad_messages", key, f"message {number} has no string 'content'")
        if message.get("role") not in ROLES:
            raise RowError("unknown_role", key, f"message {number} has unknown role {message.get('role')!r}")
    for number, (before, after) in enumerate(zip(value, value[1:]), start=1):
        if before["role"] == after["role"] or (after["role"] == "system"):
            raise RowError(
                "bad_role_order", key, f"message {number} ({after['role']}) follows {before['role']}"
            )
    return value


def row_render(render: Callable[..., str], field: str) -> Callable[..., str]:
    """`render` whose template errors on this row's messages (e.g. a template that refuses system turns)
    become a counted row error instead of ending the whole run."""

    def safe_render(messages: list[dict], add_generation_prompt: bool) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return render(messages, add_generation_prompt=add_generation_prompt)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError) as error:
            raise RowError("template_error", field, f"the chat template failed: {error}") from None

    return safe_render


def _conversation(
    row: dict, fields: dict[str, str], render: Callable[..., str]
) -> tuple[list[str], list[str]]:
    render = row_render(render, fields["messages"] if fields["messages"] in row else fields["chosen"])
    if fields["messages"] in row:
        messages = message_list(row, fields["messages"])
        if messages[-1]["role"] != "assistant" or not any(m["role"] == "assistant" for m in messages):
            raise RowError(
                "bad_role_order", fields["messages"], "the conversation must end with an assistant turn"
            )
        full = render(messages, add_generation_prompt=False)
        segments, roles, cursor = [], [], 0
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            begin = len(render(messages[:turn], add_generation_prompt=True))
            end = len(render(messages[: turn + 1], add_generation_prompt=False))
            if not cursor <= begin < end <= len(full):
                raise RowError("template_not_prefix_stable", fields["messages"], f"cannot locate turn {turn}")
            segments += [full[cursor:begin], full[begin:end]]
            roles += ["masked", "trained"]
            cursor = end
        if cursor < len(full):
            segments.append(full[cursor:])
            roles.append("masked")
        return segments, roles
    conversations = [message_list(row, fields["chosen"]), message_list(row, fields["rejected"])]
    segments = split_conversations(row, fields, render, conversations, fields["chosen"])
    return segments, ["prompt", "chosen", "rejected"]


def split_conversations(
    row: dict, fields: dict[str, str], render: Callable[..., str], conversations: list[list[dict]], field: str
) -> list[str]:
    """[prompt text, response text, ...] of message lists that share their leading messages (the prompt): the
    prompt is rendered with the generation prompt, each response is the rest of its rendered conversation."""
    prompt = row.get(fields["prompt"])
    if isinstance(prompt, str):
        # A text prompt beside message lists: the user turn before responses-only lists, or a copy of the first
        # user turn of whole conversations (as in UltraFeedback-style data), which then already hold it.
        if any(conversation[0]["role"] == "assistant" for conversation in conversations):
            user = [{"role": "user", "content": prompt}]
            conversations = [user + conversation for conversation in conversations]
    elif fields["prompt"] in row:
        prompt = message_list(row, fields["prompt"])
        conversations = [prompt + conversation for conversation in conversations]
    first, shortest = conversations[0], min(len(conversation) for conversation in conversations)
    shared = 0
    while shared < shortest - 1 and all(c[shared] == first[shared] for c in conversations[1:]):
        shared += 1
    while shared > 0 and first[shared - 1]["role"] != "user":  # the prompt ends with a user turn
        shared -= 1
    if shared == 0:
        raise RowError("no_shared_prompt", field, "no shared prompt messages ending in a user turn")
    prompt_text = render(first[:shared], add_generation_prompt=True)
    texts = [render(conversation, add_generation_prompt=False) for conversation in conversations]
    if not all(text.startswith(prompt_text) for text in texts):
        raise RowError("template_not_prefix_stable", field, "the rendered prompt is not a prefix")
    return [prompt_text] + [text[len(prompt_text) :] for text in texts]


def extract_document(schema: str, row_index: int, row: dict, fields: dict[str, str], render=None) -> Document:
    """One validated row of any schema but `groups` (see `groups.py`) → a Document of text segments; raises
    RowError."""
    if schema == "text":
        # spans on a row of a dataset detected as plain text (from its first row) are counted, not lost silently
        ignored = row.get(fields["loss_masking_spans"]) is not None
        return Document(row_index, [string_field(row, fields, "text", allow_empty=False)], ["plain"], ignored)
    if schema == "sft":
        text = string_field(row, fields, "text", allow_empty=False)
        segments, roles = _sft_segments(text, _char_spans(row, fields, len(text)))
        return Document(row_index, segments, roles)
    if schema == "conversation":
        segments, roles = _conversation(row, fields, render)
        return Document(row_index, segments, roles)
    chosen = string_field(row, fields, "chosen", allow_empty=False)
    rejected = string_field(row, fields, "rejected", allow_empty=False)
    if schema == "preference":
        name = "text" if fields["text"] in row and fields["prompt"] not in row else "prompt"
        prompt = string_field(row, fields, name)
    else:
        if chosen == rejected:
            raise RowError("identical_responses", fields["rejected"], "chosen and rejected are the same text")
        cut = implicit_prompt(chosen, rejected)
        if cut == 0:
            raise RowError("no_shared_prompt", fields["chosen"], "chosen and rejected share no prompt")
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
        if not chosen or not rejected:
            field = fields["chosen"] if not chosen else fields["rejected"]
            raise RowError("empty_response", field, "the response after the shared prompt is empty")
    ignored = row.get(fields["loss_masking_spans"]) is not None
    return Document(row_index, [prompt, chosen, rejected], ["prompt", "chosen", "rejected"], ignored)
