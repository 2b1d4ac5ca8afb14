"""`prepare --chat`: rows of plain text turned into chat messages, so a chat model's template renders them.

HH-RLHF-style text ("\\n\\nHuman: …\\n\\nAssistant: …") becomes alternating user/assistant messages; a plain
prompt string becomes one user message and a plain response one assistant message. A preference row's `chosen`
and `rejected` (and `prompt`) become message lists, which the conversation schema splits at their shared
messages; a text row's `text` becomes `messages`. Trade-off: a turn is cut only at a line-initial "Human:" or
"Assistant:" after a blank line (HH's own markers), so a response that quotes such a line is cut there too.
"""

from __future__ import annotations

import re

from unitrain.data.rows.schemas import RowError

TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
ROLE = {"Human": "user", "Assistant": "assistant"}


def hh_messages(text: str, plain_role: str) -> list[dict]:
    """The turns of HH-style text as messages (contents stripped of surrounding whitespace); text with no turn
    marker is one message of `plain_role`. Text before the first marker joins the first message."""
    parts = TURN.split(text)
    if len(parts) == 1:
        return [{"role": plain_role, "content": text.strip()}]
    leading, parts = parts[0].strip(), parts[1:]
    messages = [
        {"role": ROLE[marker], "content": content.strip()} for marker, content in zip(parts[::2], parts[1::2])
    ]
    if leading:
        messages[0]["content"] = f"{leading}\n\n{messages[0]['content']}".strip()
    return messages


def chat_row(row: dict, schema: str, fields: dict[str, str]) -> dict:
    """`row` with its text fields as message lists, for the conversation schema; `schema` is the one the row's
    plain-text shape has (text, preference or implicit). Fields that are not strings are left to the schema's
    own checks."""
    row = dict(row)
    if schema == "text":
        text = row.pop(fields["text"], None)
        if isinstance(text, str):
            messages = hh_messages(text, "user")
            if not any(message["role"] == "assistant" for message in messages):
                raise RowError("no_assistant_turn", fields["text"], 'no "Assistant:" turn to train on')
            row[fields["messages"]] = messages
        return row
    for name in ("chosen", "rejected"):
        if isinstance(row.get(fields[name]), str):
            row[fields[name]] = hh_messages(row[fields[name]], "assistant")
    prompt = fields["text"] if fields["text"] in row and fields["prompt"] not in row else fields["prompt"]
    if isinstance(row.get(prompt), str):
        messages = hh_messages(row.pop(prompt), "user")
        if len(messages) > 1 and messages[-1] == {"role": "assistant", "content": ""}:
            messages.pop()  # an HH prompt ends with the "Assistant:" the responses follow
        row[fields["prompt"]] = messages
    return row
