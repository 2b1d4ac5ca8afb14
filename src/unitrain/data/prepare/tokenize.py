"""Tokenizer + chat template wrapper, and text segments → GPTSample with token spans.

Every segment is tokenized alone without special tokens (one `encode_batch_fast` call per chunk of rows, the
raw `tokenizers` speed), so a character span boundary is always a token boundary and no merge crosses the
prompt/response boundary. BOS is prepended when the tokenizer defines one; EOS is appended to a document and to
each response, unless the tokens already end with it or with the chat template's end of turn, and what a template
renders after its end of turn is cut (`checks.py`: one end token per response). The trade-off is the one of
`rows/schemas.py`: tokens can differ from tokenizing the whole text where a boundary cuts a word; `checks.py`
counts where they do.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from unitrain.data.prepare.checks import WARNINGS, merged_boundaries, turn_end_id, turn_length
from unitrain.data.rows.schemas import Document, RowError
from unitrain.data.sample import GPTSample
from unitrain.errors import UnitrainError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
FIRST_ROWS_KEPT = 5  # example rows kept per reason in a report
TOKENIZE_RULES = 2  # bumped when the same rows tokenize differently (2: one end token per response)


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class TextTokenizer:
    """A `tokenizers.Tokenizer` loaded from a directory or a `tokenizer.json`, with BOS/EOS and a chat template.

    BOS/EOS come from `tokenizer_config.json` (or `special_tokens_map.json`); without one, from the tokenizer's
    special added tokens by their usual names (GPT-2: EOS `<|endoftext|>`, no BOS).
    """

    def __init__(self, path: str | Path, chat_template: str | Path | None = None) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        tokenizer_file = path / "tokenizer.json" if path.is_dir() else path
        if not tokenizer_file.is_file():
            raise UnitrainError(f"{path}: no tokenizer.json found")
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the Rust loader raises a plain Exception
            raise UnitrainError(f"{tokenizer_file}: cannot load tokenizer ({error})") from None
        self.files = [tokenizer_file]
        config: dict = {}
        if path.is_dir():
            self.files += [directory / name for name in TOKENIZER_FILES[1:] if (directory / name).is_file()]
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                if (directory / name).is_file():
                    config.update(json.loads((directory / name).read_text()))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        specials = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        self.eos_id = self._special_id(config.get("eos_token"), specials, EOS_CANDIDATES)
        self.bos_id = self._special_id(config.get("bos_token"), specials, BOS_CANDIDATES)
        if self.eos_id is None:
            raise UnitrainError(f"{path}: the tokenizer defines no EOS token")
        self.chat_template = self._chat_template(config, directory if path.is_dir() else None, chat_template)
        decoder = self.tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(token_id for token_id, token in decoder.items() if token.special)
        self.sha256 = hashlib.sha256(b"".join(f.read_bytes() for f in self.files)).hexdigest()
        self._template = None

    def _special_id(self, configured, specials: list[str], candidates: tuple[str, ...]) -> int | None:
        name = _token_name(configured)
        if name is None:
            name = next((c for c in candidates if c in specials), None)
        return None if name is None else self.tokenizer.token_to_id(name)

    @staticmethod
    def _chat_template(config: dict, directory: Path | None, override: str | Path | None) -> str | None:
        if override is not None:
            return Path(override).read_text()
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and directory is not None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        return template

    @functools.cached_property
    def end_ids(self) -> frozenset[int]:
        """Tokens that end a response: EOS, and the chat template's end of turn (`checks.turn_end_id`)."""
        turn_end = turn_end_id(self)
        return frozenset({self.eos_id} if turn_end is None else {self.eos_id, turn_end})

    @property
    def chat_template_sha256(self) -> str | None:
        return None if self.chat_template is None else hashlib.sha256(self.chat_template.encode()).hexdigest()

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat template applied to `messages`, as text (Hugging Face's Jinja conventions)."""
        if self.chat_template is None:
            raise UnitrainError(
                "conversation data needs a chat template: the tokenizer has none, use --chat-template"
            )
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = lambda value, indent=None: json.dumps(
                value, ensure_ascii=False, indent=indent
            )
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        special = {
            "bos_token": "" if self.bos_id is None else self.tokenizer.id_to_token(self.bos_id),
            "eos_token": self.tokenizer.id_to_token(self.eos_id),
        }
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, tokenized alone and without special tokens."""
        return [
            encoding.ids for encoding in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_template": None}


@dataclass
class Counters:
    """What `to_samples` cut, split or ignored (dropped rows are reported separately, by reason)."""

    truncated_pairs: int = 0
    split_documents: int = 0
    extra_pieces: int = 0
    truncated_groups: int = 0
    duplicate_responses: int = 0  # dropped from their group (as tokens; the first occurrence is kept)
    skipped_responses: int = 0  # null, empty or token-less responses left out of their group
    ignored_spans: int = 0  # rows whose loss_masking_spans the schema ignores
    ignored_span_rows: list[int] = field(default_factory=list)  # the first few of them
    warnings: dict[str, int] = field(default_factory=dict)  # `checks.WARNINGS` by reason: rows kept, counted
    warning_rows: list[dict] = field(
        default_factory=list
    )  # the first few of them: row, field, reason, message

    def warn(self, reason: str, row: int, name: str) -> None:
        self.warnings[reason] = self.warnings.get(reason, 0) + 1
        if len(self.warning_rows) < FIRST_ROWS_KEPT:
            self.warning_rows.append(
                {"row": row, "field": name, "reason": reason, "message": WARNINGS[reason]}
            )

    def ignore_spans(self, row: int) -> None:
        self.ignored_spans += 1
        if len(self.ignored_span_rows) < FIRST_ROWS_KEPT:
            self.ignored_span_rows.append(row)

    def merge(self, other: Counters) -> None:
        for counter in fields(self):
            if counter.type in (int, "int"):
                setattr(self, counter.name, getattr(self, counter.name) + getattr(other, counter.name))
        self.ignored_span_rows = (self.ignored_span_rows + other.ignored_span_rows)[:FIRST_ROWS_KEPT]
        for reason, count in other.warnings.items():
            self.warnings[reason] = self.warnings.get(reason, 0) + count
        self.warning_rows = (self.warning_rows + other.warning_rows)[:FIRST_ROWS_KEPT]


def to_samples(
    documents: list[Document], tokenizer: TextTokenizer, kind: str, max_length: int | None, counters: Counters
) -> list[tuple[int, GPTSample | RowError]]:
    """Tokenize a chunk of documents in one batch call; each row gives samples or a RowError, in order."""
    texts = [segment for document in documents for segment in document.segments]
    encoded = tokenizer.encode(texts)
    results, cursor = [], 0
    for position, after in merged_boundaries(documents, tokenizer, kind):
        document = documents[position]
        counters.warn("boundary_merge", document.row, _segment_field(document, after, kind))
    for document in documents:
        pieces = encoded[cursor : cursor + len(document.segments)]
        cursor += len(document.segments)
        if document.ignored_spans:
            counters.ignore_spans(document.row)
        try:
            if document.scores is not None:
                sample = _group(
                    pieces, document.scores, document.group_fields, tokenizer, max_length, counters
                )
                counters.skipped_responses += document.skipped_responses  # only for a row that is kept
                results.append((document.row, sample))
            elif kind == "preference":
                results.append((document.row, _preference(pieces, tokenizer, max_length, counters)))
            else:
                results += [
                    (document.row, s)
                    for s in _document(pieces, document.roles, tokenizer, kind, max_length, counters)
                ]
        except RowError as error:
            results.append((document.row, error))
    for row, sample in results:
        if not isinstance(sample, RowError):
            _check_sample(row, sample, tokenizer, kind, counters)
    return results


def _segment_field(document: Document, segment: int, kind: str) -> str:
    if document.scores is not None:
        return document.group_fields[0]
    return ("prompt", "chosen", "rejected")[min(segment, 2)] if kind == "preference" else "text"


def _check_sample(
    row: int, sample: GPTSample, tokenizer: TextTokenizer, kind: str, counters: Counters
) -> None:
    """Count a doubled BOS and responses (SFT documents) left without an end token."""
    ids = sample.token_ids
    if tokenizer.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == tokenizer.bos_id:
        counters.warn("doubled_bos", row, "prompt" if kind == "preference" else "text")
    if sample.response_spans is not None:
        ends = [("responses", int(end)) for end in sample.response_spans[:, 1]]
    elif sample.chosen_span is not None:
        ends = [("chosen", sample.chosen_span[1]), ("rejected", sample.rejected_span[1])]
    else:
        ends = [("text", len(ids))] if kind == "sft" else []
    for name, end in ends:
        if int(ids[end - 1]) not in tokenizer.end_ids:
            counters.warn("response_without_end_token", row, name)
            return


def _with_eos(ids: list[int], tokenizer: TextTokenizer) -> list[int]:
    """A response ended by exactly one end token: cut what a chat template renders after its end of turn, and
    append EOS unless it already ends with an end token (EOS or the template's end of turn)."""
    ids = ids[: turn_length(ids, tokenizer)]
    return ids if ids and ids[-1] in tokenizer.end_ids else ids + [tokenizer.eos_id]


def _prompt_ids(prompt: list[int], tokenizer: TextTokenizer) -> list[int]:
    bos = tokenizer.bos_id
    if bos is not None and prompt[:1] != [bos]:
        prompt = [bos] + prompt
    if not prompt:
        raise RowError("empty_prompt", "prompt", "the prompt has no tokens (and the tokenizer has no BOS)")
    return prompt


def _room(prompt: list[int], longest: int, max_length) -> int | None:
    """Tokens left for each response when prompt + the longest response exceed `max_length`, else None."""
    if max_length is None or len(prompt) + longest <= max_length:
        return None
    if max_length - len(prompt) < 1:
        raise RowError(
            "prompt_too_long", "prompt", f"{len(prompt)} prompt tokens leave no room in {max_length}"
        )
    return max_length - len(prompt)


def _preference(
    pieces: list[list[int]], tokenizer: TextTokenizer, max_length, counters: Counters
) -> GPTSample:
    prompt, chosen, rejected = pieces
    prompt = _prompt_ids(prompt, tokenizer)
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if not ids:
            raise RowError("empty_response", name, "the response has no tokens")
    chosen, rejected = _with_eos(chosen, tokenizer), _with_eos(rejected, tokenizer)
    room = _room(prompt, max(len(chosen), len(rejected)), max_length)
    if room is not None:
        chosen, rejected = chosen[:room], rejected[:room]
        counters.truncated_pairs += 1
    if chosen == rejected:
        raise RowError("identical_responses", "rejected", "chosen and rejected are identical as tokens")
    token_ids = np.array(prompt + chosen + rejected, np.int64)  # (P + C + R,)
    split = len(prompt) + len(chosen)
    return GPTSample(token_ids, chosen_span=(len(prompt), split), rejected_span=(split, len(token_ids)))


def _group(
    pieces: list[list[int]],
    scores: list[float],
    group_fields: tuple[str, str],
    tokenizer: TextTokenizer,
    max_length,
    counters: Counters,
) -> GPTSample:
    """prompt + N responses → a group sample; responses without tokens are skipped, duplicates (as tokens, after
    truncation) keep their first occurrence, and a group needs ≥ 2 responses and two different scores. The
    counters count only a row that is kept."""
    prompt = _prompt_ids(pieces[0], tokenizer)
    responses = [(_with_eos(ids, tokenizer), score) for ids, score in zip(pieces[1:], scores) if ids]
    room = _room(prompt, max((len(ids) for ids, _ in responses), default=0), max_length)
    if room is not None:
        responses = [(ids[:room], score) for ids, score in responses]
    unique: dict[tuple[int, ...], float] = {}
    for ids, score in responses:
        unique.setdefault(tuple(ids), score)
    if len(unique) < 2:
        raise RowError("too_few_responses", group_fields[0], f"{len(unique)} distinct responses with tokens")
    if len(set(unique.values())) < 2:
        raise RowError(
            "equal_scores", group_fields[1], "every response has the same score: no preference to learn"
        )
    counters.skipped_responses += len(scores) - len(responses)
    counters.truncated_groups += int(room is not None)
    counters.duplicate_responses += len(responses) - len(unique)
    lengths = [len(prompt)] + [len(ids) for ids in unique]
    bounds = np.cumsum(lengths)  # (N + 1,) prompt end, then each response's end
    return GPTSample(
        np.array(prompt + [token for ids in unique for token in ids], np.int64),  # (P + ΣR,)
        response_spans=np.stack([bounds[:-1], bounds[1:]], axis=1),  # (N, 2)
        scores=np.array(list(unique.values()), np.float32),  # (N,)
    )


def _document(
    pieces, roles, tokenizer: TextTokenizer, kind: str, max_length, counters: Counters
) -> list[GPTSample]:
    bos = tokenizer.bos_id
    conversation = "trained" in roles
    if conversation:  # what the template renders after each turn's end token is context, not a target
        pieces, roles = _turns_ended(pieces, roles, tokenizer)
    ids: list[int] = [] if bos is None or next((p[:1] for p in pieces if p), None) == [bos] else [bos]
    masked: list[list[int]] = []
    for piece, role in zip(pieces, roles):
        if role == "masked" and piece:
            if masked and masked[-1][1] == len(ids):
                masked[-1][1] += len(piece)
            else:
                masked.append([len(ids), len(ids) + len(piece)])
        ids += piece
    if not any(pieces):
        raise RowError("empty_text", "text", "the text has no tokens")
    ended = len(ids)
    if conversation:  # ... and after the last turn it is not kept: one end token ends the document
        ended = turn_length(ids, tokenizer)
        ids, masked = ids[:ended], [[begin, min(end, ended)] for begin, end in masked if begin < ended]
        ids = ids if ids[-1] in tokenizer.end_ids else ids + [tokenizer.eos_id]
    else:
        ids = ids if ids[-1] == tokenizer.eos_id else ids + [tokenizer.eos_id]
    if masked and masked[-1][1] == ended:  # EOS joins the last segment: masked if the text ends masked
        masked[-1][1] = len(ids)
    if kind == "sft":
        if max_length is not None and len(ids) > max_length:
            raise RowError("too_long", "text", f"{len(ids)} tokens > max_length {max_length}")
        spans = np.array(masked, np.int64).reshape(-1, 2)  # (n, 2)
        return [GPTSample(np.array(ids, np.int64), loss_masking_spans=spans)]
    if max_length is None or len(ids) <= max_length:
        return [GPTSample(np.array(ids, np.int64))]
    counters.split_documents += 1
    starts = range(0, len(ids), max_length)
    counters.extra_pieces += len(starts) - 1
    return [GPTSample(np.array(ids[start : start + max_length], np.int64)) for start in starts]


def _turns_ended(pieces: list[list[int]], roles: list[str], tokenizer: TextTokenizer):
    """Each trained turn cut after its end token; the tail (ChatML's newline) becomes masked context."""
    ended_pieces, ended_roles = [], []
    for piece, role in zip(pieces, roles):
        keep = turn_length(piece, tokenizer) if role == "trained" else len(piece)
        ended_pieces.append(piece[:keep])
        ended_roles.append(role)
        if keep < len(piece):
            ended_pieces.append(piece[keep:])
            ended_roles.append("masked")
    return ended_pieces, ended_roles
