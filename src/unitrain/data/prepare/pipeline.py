"""`unitrain prepare`: inputs → units → (per rank) validate and tokenize in worker processes → unit shards →
(rank 0) one dataset, renamed into place.

The inputs resolve to an ordered list of units (`rows/inputs.py`); rank r of a multi-rank prepare (torchrun, or
`--rank/--world-size`) writes units r, r + W, r + 2W, ... each as a small dataset of its own under a work directory
beside the output, keyed by everything that determines the result (`units.py` writes one). Rank 0 waits until
every unit is complete, then moves their shards, in unit order, into one dataset and renames it into place. So
the output is byte-identical for any number of ranks and workers, an interrupted prepare leaves nothing that loads, and running the same command
again reuses the units already complete. Trade-off: the ranks coordinate through files on a shared filesystem
(a complete unit is a renamed directory) rather than a process group: nothing to rendezvous, and the same code
serves torchrun and hand-started ranks, at the price of rank 0 polling for the others' units.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from unitrain.data.memmap.format import DEFAULT_SHARD_TOKENS, FORMAT_VERSION
from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.memmap.writer import DatasetWriter
from unitrain.data.prepare.checks import WARNINGS
from unitrain.data.prepare.tokenize import TOKENIZE_RULES, TextTokenizer
from unitrain.data.prepare.units import Tokenizers, UnitReport, complete_unit, unit_dir, write_unit
from unitrain.data.rows.chat import chat_row
from unitrain.data.rows.inputs import Unit, read_unit, resolve_units, signature
from unitrain.data.rows.schemas import FIELD_DEFAULTS, FIELDS, RowError, detect_schema, parse_row
from unitrain.errors import UnitrainError

KIND_OF_SCHEMA = {
    "text": "pretraining",
    "sft": "sft",
    "preference": "preference",
    "implicit": "preference",
    "groups": "preference",
}
POLL_SECONDS = 0.5
CHAT_SCHEMAS = ("text", "preference", "implicit")  # plain-text rows that --chat turns into messages


class PrepareConfig(BaseModel):
    """Settings of one `prepare` run (CLI flags or a YAML file with the same names)."""

    model_config = ConfigDict(extra="forbid")
    input: str | list[str] = Field(
        description="one or more inputs, read in the order given: files (.jsonl[.gz], .json, .parquet, .csv, "
        ".arrow), glob patterns, directories of such files (sorted by path), a save_to_disk directory, a hub name"
    )
    tokenizer: str = Field(description="tokenizer directory or tokenizer.json file")
    output: str = Field(description="dataset directory to create")
    mode: Literal["auto", "text", "sft", "preference", "conversation", "groups"] = Field(
        "auto", description="input schema; auto detects it from the first row's fields"
    )
    workers: int = Field(1, ge=1, description="tokenizer processes; the output is identical for any number")
    max_length: int | None = Field(
        None, ge=2, description="longest stored document / prompt + longer response"
    )
    on_error: Literal["skip", "fail"] = Field(
        "skip", description="drop and count bad rows, or stop at the first"
    )
    overwrite: bool = Field(False, description="replace an existing dataset at `output`")
    fields: dict[str, str] = Field(
        default_factory=dict, description="schema field → column name in the input"
    )
    chat_template: str | None = Field(None, description="Jinja chat template file (default: the tokenizer's)")
    chat: bool = Field(
        False,
        description="plain-text rows as chat messages rendered with the chat template: HH-style "
        '"Human:/Assistant:" turns, a plain prompt as a user turn, a plain response as an assistant turn',
    )
    split: str = Field("train", description="split to read from a save_to_disk dict or a hub dataset")
    max_shard_tokens: int = Field(DEFAULT_SHARD_TOKENS, ge=1, description="tokens per shard before a new one")

    def field_map(self) -> dict[str, str]:
        unknown = set(self.fields) - set(FIELDS)
        if unknown:
            raise UnitrainError(f"unknown field name(s) {sorted(unknown)}; known: {', '.join(FIELDS)}")
        return {name: self.fields.get(name, default) for name, default in FIELD_DEFAULTS.items()}

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): the flags when given, else torchrun's RANK / WORLD_SIZE, else a single rank."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise UnitrainError(f"need 0 ≤ rank < world size, got rank {rank} of {world_size}")
    return rank, world_size


# ---------------------------------------------------------------- the run


def _detect(units: list[Unit], config: PrepareConfig, fields: dict) -> tuple[str, str, str | None]:
    """(schema, dataset kind, the plain-text schema `--chat` converts from or None) from the first row that
    parses, searching the units in order."""
    for unit in units:
        for _, raw in read_unit(unit, config.split):
            try:
                first = parse_row(raw)
            except RowError:
                continue
            schema = detect_schema(first, config.mode, fields)
            plain = None
            if config.chat and schema != "conversation":
                if schema not in CHAT_SCHEMAS:
                    raise UnitrainError(
                        f"--chat turns text and preference rows into messages, not {schema} rows (mode "
                        f"{config.mode}); leave --chat out"
                    )
                plain, schema = schema, "conversation"
                try:
                    first = chat_row(first, plain, fields)
                except RowError:
                    continue
            if schema == "conversation":
                return schema, "preference" if fields["messages"] not in first else "sft", plain
            return schema, KIND_OF_SCHEMA[schema], None
    raise UnitrainError(f"{', '.join(config.inputs)}: no readable rows")


def _plain_text_warning(config: PrepareConfig, tokenizer: TextTokenizer, schema: str) -> str | None:
    """A chat model's tokenizer given plain-text rows: they are tokenized as they are, which is rarely what a
    chat model was trained on; said once, with the way out."""
    if tokenizer.chat_template is None or schema not in CHAT_SCHEMAS or config.chat:
        return None
    return (
        f"warning: {config.tokenizer} has a chat template but the rows are plain text ({schema}): they are "
        'tokenized as they are, not as chat turns; --chat renders HH-style "Human:/Assistant:" turns and plain '
        "prompts as messages with the template"
    )


def _work_key(config: PrepareConfig, units: list[Unit], tokenizer: TextTokenizer, schema: str) -> str:
    """Hash of everything the output depends on; names the work directory that ranks and reruns share."""
    settings = config.model_dump(exclude={"overwrite", "workers", "output"})
    identity = {
        "format": FORMAT_VERSION,
        "rules": TOKENIZE_RULES,  # units tokenized by older rules are not reused
        "settings": settings,
        "schema": schema,
        "tokenizer": tokenizer.sha256,
        "chat_template": tokenizer.chat_template_sha256,
        "units": [signature(unit) for unit in units],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _progress_bar(enabled: bool, units: list[Unit]):
    if not enabled:
        return None
    from tqdm import tqdm

    known = all(unit.rows is not None for unit in units)
    return tqdm(
        total=sum(u.rows for u in units) if known else None, unit=" rows", desc="prepare", disable=None
    )


def prepare(
    config: PrepareConfig, progress: bool = True, rank: int | None = None, world_size: int | None = None
) -> dict | None:
    """Run prepare (this rank's share of it); rank 0 returns the report (also in `<output>/report.json`),
    the other ranks None once their units are written."""
    started = time.perf_counter()
    rank, world_size = resolve_rank(rank, world_size)
    fields = config.field_map()
    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise UnitrainError(f"{output} already exists; pass --overwrite to replace it")
    tokenizer = TextTokenizer(config.tokenizer, config.chat_template)
    units = resolve_units(config.inputs)
    schema, kind, plain = _detect(units, config, fields)
    warning = _plain_text_warning(config, tokenizer, schema)
    if warning and rank == 0:
        print(warning, file=sys.stderr)
    key = _work_key(config, units, tokenizer, schema)
    work = output.parent / f".{output.name}.prepare-{key}"
    work.mkdir(parents=True, exist_ok=True)
    run = {"config": config, "tokenizer": tokenizer, "kind": kind, "key": key}
    mine = [n for n in range(rank, len(units), world_size) if complete_unit(work, n) is None]
    bar = _progress_bar(progress and rank == 0, [units[n] for n in mine])
    tokenizers = Tokenizers(
        config.workers if mine else 1, (tokenizer, schema, kind, fields, config.max_length, plain)
    )
    try:
        for number in mine:
            write_unit(work, number, units[number], run, tokenizers, bar)
    except BaseException:
        if world_size == 1 and not any(complete_unit(work, n) for n in range(len(units))):
            shutil.rmtree(work, ignore_errors=True)  # nothing worth keeping for a rerun
        raise
    finally:
        tokenizers.close()
        if bar is not None:
            bar.close()
    if rank != 0:
        return None
    metadata = _wait_for_units(work, len(units), progress)
    return _assemble(work, output, units, metadata, run, schema, fields, started)


def _wait_for_units(work: Path, count: int, progress: bool) -> list[dict]:
    """Rank 0: every unit's metadata, once all ranks have completed their units."""
    metadata: list[dict | None] = [complete_unit(work, n) for n in range(count)]
    pending = [n for n in range(count) if metadata[n] is None]
    bar = None
    if pending and progress:
        from tqdm import tqdm

        bar = tqdm(total=count, initial=count - len(pending), unit=" units", desc="waiting for other ranks")
    while pending:
        time.sleep(POLL_SECONDS)
        for number in list(pending):
            metadata[number] = complete_unit(work, number)
            if metadata[number] is not None:
                pending.remove(number)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return metadata


def _assemble(
    work: Path, output: Path, units: list[Unit], metadata: list[dict], run: dict, schema, fields, started
) -> dict:
    """Move every unit's shards, in unit order, into one dataset; write its report and metadata; clean up."""
    config, tokenizer = run["config"], run["tokenizer"]
    total = UnitReport()
    for unit_metadata in metadata:
        total.merge(UnitReport(unit_metadata["unit"]["report"]))
    if total.documents == 0:
        shutil.rmtree(work, ignore_errors=True)
        reasons = ", ".join(
            f"{reason} ({count}{_field_of(total.examples.get(reason, []))})"
            for reason, count in total.dropped.most_common(3)
        )
        raise UnitrainError(f"{', '.join(config.inputs)}: all {total.rows} rows were dropped: {reasons}")
    report = {
        "schema": schema,
        "kind": run["kind"],
        "inputs": len({unit.source for unit in units}),
        "rows": total.rows,
        "documents": total.documents,
        "tokens": total.tokens,
        "dropped": dict(sorted(total.dropped.items())),
        "dropped_examples": dict(sorted(total.examples.items())),
        "truncated_pairs": total.counters.truncated_pairs,
        "truncated_groups": total.counters.truncated_groups,
        "duplicate_responses": total.counters.duplicate_responses,
        "skipped_responses": total.counters.skipped_responses,
        "split_documents": total.counters.split_documents,
        "split_extra_pieces": total.counters.extra_pieces,
        "ignored_loss_masking_spans": total.counters.ignored_spans,
        "ignored_loss_masking_spans_rows": total.counters.ignored_span_rows,
        "duplicate_documents": _copies(work, len(metadata)),
        "tokenization_warnings": dict(sorted(total.counters.warnings.items())),
        "tokenization_warning_examples": total.counters.warning_rows,
        "seconds": round(time.perf_counter() - started, 3),
    }
    with DatasetWriter(
        output,
        run["kind"],
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        bos_id=tokenizer.bos_id,
        # the tokenizer's own template file gives way to --chat-template's, written below
        tokenizer_files=[
            f for f in tokenizer.files if config.chat_template is None or f.name != "chat_template.jinja"
        ],
        overwrite=config.overwrite,
    ) as writer:
        for number, unit_metadata in enumerate(metadata):
            for shard in unit_metadata["shards"]:
                if shard["num_documents"]:
                    writer.adopt_shard(unit_dir(work, number), shard)
        if not any(path.name == "tokenizer_config.json" for path in tokenizer.files):
            _write_tokenizer_config(writer.temp / "tokenizer", tokenizer)
        if config.chat_template is not None:  # the template the data was rendered with goes to every export
            (writer.temp / "tokenizer" / "chat_template.jinja").write_text(tokenizer.chat_template)
        (writer.temp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        settings = config.model_dump(exclude={"overwrite", "output", "workers"})
        writer.close(
            {
                "schema": schema,
                "source": {
                    "input": config.input,
                    "files": list(dict.fromkeys(unit.source for unit in units)),
                    "split": config.split,
                    "fields": fields,
                },
                "prepare": settings,
                "max_length": config.max_length,
                "chat_template_sha256": tokenizer.chat_template_sha256 if schema == "conversation" else None,
                "tokenizer_sha256": tokenizer.sha256,
                "report": {
                    key: value for key, value in report.items() if key not in ("dropped_examples", "seconds")
                },
            }
        )
    for leftover in [work, *output.parent.glob(f".{output.name}.prepare-*")]:
        shutil.rmtree(leftover, ignore_errors=True)  # this run's units, and those of interrupted earlier runs
    return report


def _field_of(examples: list[dict]) -> str:
    """`; field 'text'`: the field the first dropped rows of a reason name, if any."""
    named = sorted({example["field"] for example in examples if example.get("field")})
    return f"; field {', '.join(repr(name) for name in named)}" if named else ""


def _copies(work: Path, units: int) -> int:
    """Documents (pairs, groups) whose tokens an earlier one of the dataset already has, over every unit."""
    hashes = [GPTMemmapDataset(unit_dir(work, number)).content_hashes() for number in range(units)]
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    return int(len(hashes) - len(np.unique(hashes)))


def _write_tokenizer_config(directory: Path, tokenizer: TextTokenizer) -> None:
    """A bare tokenizer.json gets a tokenizer_config.json naming BOS/EOS, so transformers loads the copy."""
    names = {
        key: None if token_id is None else tokenizer.tokenizer.id_to_token(token_id)
        for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id))
    }
    directory.mkdir(exist_ok=True)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _rows_text(examples: list[dict], several_inputs: bool) -> str:
    return ", ".join(
        f"{Path(example['input']).name}:{example['row']}" if several_inputs else str(example["row"])
        for example in examples
    )


def summary(report: dict, output: str) -> str:
    """The end-of-run summary printed by the CLI."""
    inputs = report.get("inputs", 1)
    lines = [
        f"wrote {output}: {report['documents']:,} documents, {report['tokens']:,} tokens "
        f"from {report['rows']:,} rows{f' of {inputs:,} inputs' if inputs > 1 else ''} in {report['seconds']:.1f} s",
    ]
    for reason, count in report["dropped"].items():
        examples = report["dropped_examples"][reason]
        named = sorted({example["field"] for example in examples if example.get("field")})
        field = f"field {', '.join(repr(name) for name in named)}; " if named else ""
        lines.append(
            f"  dropped {count:,} × {reason} ({field}first rows: {_rows_text(examples, inputs > 1)})"
        )
    if report["truncated_pairs"]:
        lines.append(f"  truncated {report['truncated_pairs']:,} pairs to max_length")
    if report.get("truncated_groups"):
        lines.append(f"  truncated the responses of {report['truncated_groups']:,} groups to max_length")
    if report.get("duplicate_responses"):
        lines.append(
            f"  left out {report['duplicate_responses']:,} duplicate responses (same tokens; first kept)"
        )
    if report.get("skipped_responses"):
        lines.append(f"  left out {report['skipped_responses']:,} null or empty responses of groups")
    for reason, count in report.get("tokenization_warnings", {}).items():
        examples = [e for e in report["tokenization_warning_examples"] if e["reason"] == reason]
        rows = f"; first rows: {', '.join(str(e['row']) for e in examples)}" if examples else ""
        lines.append(f"  kept {count:,} × {reason} ({WARNINGS[reason]}{rows}; --on-error fail refuses them)")
    if report.get("duplicate_documents"):
        unit = "pairs or groups" if report.get("kind") == "preference" else "documents"
        lines.append(
            f"  {report['duplicate_documents']:,} {unit} are copies of an earlier one (same tokens): validation "
            "holds out all copies together; data.drop_duplicates trains on one of each"
        )
    if report["split_documents"]:
        lines.append(f"  split {report['split_documents']:,} documents longer than max_length")
    if report["ignored_loss_masking_spans"]:
        lines.append(
            f"  ignored loss_masking_spans in {report['ignored_loss_masking_spans']:,} rows: the schema "
            f"({report['schema']}) has no place for them (for SFT data use --mode sft)"
        )
    return "\n".join(lines)
