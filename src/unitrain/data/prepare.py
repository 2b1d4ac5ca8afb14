"""`unitrain prepare`: read rows → validate → tokenize in worker processes → write shards → rename into place.

Rows travel to the workers in fixed-size chunks and come back in order (`imap`), so the output is byte-identical
for every worker count; the writer is the one of `memmap.py`, writing into a temporary directory that is renamed
only after the last shard and the metadata are complete. Trade-off: the reading and the writing stay in the main
process (simple, ordered); parsing, schema checks and tokenization, the costly parts, run in the workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from unitrain.data.memmap import DEFAULT_SHARD_TOKENS, DatasetWriter
from unitrain.data.sources import FIELDS, RowError, detect_schema, extract, parse_row, read_rows
from unitrain.data.tokenize import Counters, TextTokenizer, to_samples
from unitrain.errors import UnitrainError

CHUNK_ROWS = 256
FIRST_ROWS_KEPT = 5
KIND_OF_SCHEMA = {"text": "pretraining", "sft": "sft", "preference": "preference", "implicit": "preference"}


class PrepareConfig(BaseModel):
    """Settings of one `prepare` run (CLI flags or a YAML file with the same names)."""

    model_config = ConfigDict(extra="forbid")
    input: str = Field(
        description="local file (.jsonl[.gz], .json, .parquet, .csv), save_to_disk dir or hub name"
    )
    tokenizer: str = Field(description="tokenizer directory or tokenizer.json file")
    output: str = Field(description="dataset directory to create")
    mode: Literal["auto", "text", "sft", "preference", "conversation"] = Field(
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
    split: str = Field("train", description="split to read from a save_to_disk dict or a hub dataset")
    max_shard_tokens: int = Field(DEFAULT_SHARD_TOKENS, ge=1, description="tokens per shard before a new one")

    def field_map(self) -> dict[str, str]:
        unknown = set(self.fields) - set(FIELDS)
        if unknown:
            raise UnitrainError(f"unknown field name(s) {sorted(unknown)}; known: {', '.join(FIELDS)}")
        return {name: self.fields.get(name, name) for name in FIELDS}


_WORKER: dict = {}


def _init_pool_worker(*init) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    _init_worker(*init)


def _init_worker(
    tokenizer: TextTokenizer, schema: str, kind: str, fields: dict, max_length: int | None
) -> None:
    _WORKER.update(tokenizer=tokenizer, schema=schema, kind=kind, fields=fields, max_length=max_length)


def _process_chunk(chunk: list[tuple[int, bytes | dict]]):
    """Raw rows → [(row, GPTSample | RowError)] in row order, plus counters. Runs in a worker."""
    tokenizer, fields = _WORKER["tokenizer"], _WORKER["fields"]
    documents, failures = [], []
    for row_index, raw in chunk:
        try:
            documents.append(extract(_WORKER["schema"], row_index, parse_row(raw), fields, tokenizer.render))
        except RowError as error:
            failures.append((row_index, error))
    counters = Counters()
    results = to_samples(documents, tokenizer, _WORKER["kind"], _WORKER["max_length"], counters)
    for _, error in results:
        if isinstance(error, RowError) and error.field in fields:
            error.field = fields[error.field]
    return sorted(failures + results, key=lambda item: item[0]), counters


def _chunks(rows, first: list):
    chunk = list(first)
    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _first_row(rows):
    """Read until the first row that parses (for schema detection); return it and the rows read so far."""
    seen = []
    for row_index, raw in rows:
        seen.append((row_index, raw))
        try:
            return parse_row(raw), seen
        except RowError:
            continue
    return None, seen


def prepare(config: PrepareConfig, progress: bool = True) -> dict:
    """Run prepare; returns the report (also written to `<output>/report.json`)."""
    started = time.perf_counter()
    fields = config.field_map()
    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise UnitrainError(f"{output} already exists; pass --overwrite to replace it")
    tokenizer = TextTokenizer(config.tokenizer, config.chat_template)
    rows = read_rows(config.input, config.split)
    first, seen = _first_row(rows)
    if first is None:
        raise UnitrainError(f"{config.input}: no readable rows")
    schema = detect_schema(first, config.mode, fields)
    if schema == "conversation":
        schema_kind = "preference" if fields["messages"] not in first else "sft"
    else:
        schema_kind = KIND_OF_SCHEMA[schema]
    init = (tokenizer, schema, schema_kind, fields, config.max_length)
    dropped: Counter = Counter()
    first_rows: dict[str, list] = {}
    counters = Counters()
    num_rows = num_documents = num_tokens = 0
    with DatasetWriter(
        output,
        schema_kind,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        bos_id=tokenizer.bos_id,
        tokenizer_files=tokenizer.files,
        max_shard_tokens=config.max_shard_tokens,
        overwrite=config.overwrite,
    ) as writer:
        pool = None
        if config.workers > 1:
            # fork starts workers in milliseconds (spawn re-imports everything and re-sends the tokenizer)
            fork = "fork" in multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if fork else "spawn")
            pool = context.Pool(config.workers, _init_pool_worker, init)
            results = pool.imap(_process_chunk, _chunks(rows, seen))
        else:
            _init_worker(*init)
            results = map(_process_chunk, _chunks(rows, seen))
        bar = _progress_bar(progress)
        try:
            for chunk_results, chunk_counters in results:
                counters.merge(chunk_counters)
                rows_in_chunk = {row for row, _ in chunk_results}
                num_rows += len(rows_in_chunk)
                for row, result in chunk_results:
                    if isinstance(result, RowError):
                        if config.on_error == "fail":
                            field = f", field {result.field!r}" if result.field else ""
                            raise UnitrainError(
                                f"{config.input}: row {row}{field}: {result.message} ({result.reason})"
                            )
                        dropped[result.reason] += 1
                        first_rows.setdefault(result.reason, [])
                        if len(first_rows[result.reason]) < FIRST_ROWS_KEPT:
                            first_rows[result.reason].append(
                                {"row": row, "field": result.field, "message": result.message}
                            )
                        continue
                    writer.add(result)
                    num_documents += 1
                    num_tokens += len(result.token_ids)
                if bar is not None:
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.update(len(rows_in_chunk))
                    bar.set_postfix_str(f"{num_tokens / elapsed:,.0f} tokens/s")
        finally:
            if bar is not None:
                bar.close()
            if pool is not None:
                pool.terminate()
        if num_documents == 0:  # raised inside the writer: nothing that looks like a dataset is left behind
            reasons = ", ".join(f"{reason} ({count})" for reason, count in dropped.most_common(3))
            raise UnitrainError(f"{config.input}: all {num_rows} rows were dropped: {reasons}")
        report = {
            "schema": schema,
            "rows": num_rows,
            "documents": num_documents,
            "tokens": num_tokens,
            "dropped": dict(sorted(dropped.items())),
            "dropped_examples": dict(sorted(first_rows.items())),
            "truncated_pairs": counters.truncated_pairs,
            "split_documents": counters.split_documents,
            "split_extra_pieces": counters.extra_pieces,
            "ignored_loss_masking_spans": len(counters.ignored_span_rows),
            "ignored_loss_masking_spans_rows": counters.ignored_span_rows[:FIRST_ROWS_KEPT],
            "seconds": round(time.perf_counter() - started, 3),
        }
        if not any(path.name == "tokenizer_config.json" for path in tokenizer.files):
            _write_tokenizer_config(writer.temp / "tokenizer", tokenizer)
        (writer.temp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        settings = config.model_dump(exclude={"overwrite", "output", "workers"})
        writer.close(
            {
                "schema": schema,
                "source": {"input": config.input, "split": config.split, "fields": fields},
                "prepare": settings,
                "max_length": config.max_length,
                "chat_template_sha256": tokenizer.chat_template_sha256 if schema == "conversation" else None,
                "tokenizer_sha256": tokenizer.sha256,
                "report": {
                    key: value for key, value in report.items() if key not in ("dropped_examples", "seconds")
                },
            }
        )
    return report


def _write_tokenizer_config(directory: Path, tokenizer: TextTokenizer) -> None:
    """A bare tokenizer.json gets a tokenizer_config.json naming BOS/EOS, so transformers loads the copy."""
    names = {
        key: None if token_id is None else tokenizer.tokenizer.id_to_token(token_id)
        for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id))
    }
    directory.mkdir(exist_ok=True)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=" rows", desc="prepare", disable=None)


def summary(report: dict, output: str) -> str:
    """The end-of-run summary printed by the CLI."""
    lines = [
        f"wrote {output}: {report['documents']:,} documents, {report['tokens']:,} tokens "
        f"from {report['rows']:,} rows in {report['seconds']:.1f} s",
    ]
    for reason, count in report["dropped"].items():
        rows = ", ".join(str(example["row"]) for example in report["dropped_examples"][reason])
        lines.append(f"  dropped {count:,} × {reason} (first rows: {rows})")
    if report["truncated_pairs"]:
        lines.append(f"  truncated {report['truncated_pairs']:,} pairs to max_length")
    if report["split_documents"]:
        lines.append(f"  split {report['split_documents']:,} documents longer than max_length")
    if report["ignored_loss_masking_spans"]:
        lines.append(
            f"  ignored loss_masking_spans in {report['ignored_loss_masking_spans']:,} rows: the schema "
            f"({report['schema']}) has no place for them (for SFT data use --mode sft)"
        )
    return "\n".join(lines)
