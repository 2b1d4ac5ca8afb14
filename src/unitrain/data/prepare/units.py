"""One unit of `prepare`'s work: raw rows → tokenizer worker processes → a small dataset of its own.

Rows travel to the workers in fixed-size chunks and come back in order (`imap`), so a unit's bytes do not depend
on the number of workers. A unit is written with `DatasetWriter` into `WORK/unit-NNNNNN/` and renamed into place
only when complete, so a unit directory with its metadata and every shard at its recorded size is done, and
anything else is written again. Trade-off: reading and writing stay in the calling process (simple, ordered);
parsing, schema checks and tokenization, the costly parts, run in the workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from pathlib import Path

from unitrain.data.memmap.writer import DatasetWriter
from unitrain.data.prepare.tokenize import FIRST_ROWS_KEPT, Counters, TextTokenizer, to_samples
from unitrain.data.rows.chat import chat_row
from unitrain.data.rows.extract import extract
from unitrain.data.rows.inputs import Unit, read_unit
from unitrain.data.rows.schemas import RowError, parse_row
from unitrain.errors import UnitrainError

CHUNK_ROWS = 256

_WORKER: dict = {}


def _init_pool_worker(*init) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    _init_worker(*init)


def _init_worker(
    tokenizer: TextTokenizer,
    schema: str,
    kind: str,
    fields: dict,
    max_length: int | None,
    chat: str | None = None,
) -> None:
    """`chat`: the plain-text schema whose rows `--chat` turns into messages (None: rows are taken as they are)."""
    _WORKER.update(
        tokenizer=tokenizer, schema=schema, kind=kind, fields=fields, max_length=max_length, chat=chat
    )


def _process_chunk(chunk: list[tuple[int, bytes | dict]]):
    """Raw rows → [(row, GPTSample | RowError)] in row order, plus counters. Runs in a worker."""
    tokenizer, fields = _WORKER["tokenizer"], _WORKER["fields"]
    documents, failures = [], []
    for row_index, raw in chunk:
        try:
            row = parse_row(raw)
            if _WORKER["chat"]:
                row = chat_row(row, _WORKER["chat"], fields)
            documents.append(extract(_WORKER["schema"], row_index, row, fields, tokenizer.render))
        except RowError as error:
            failures.append((row_index, error))
    counters = Counters()
    results = to_samples(documents, tokenizer, _WORKER["kind"], _WORKER["max_length"], counters)
    for _, error in results:
        if isinstance(error, RowError) and error.field in fields:
            error.field = fields[error.field]
    return sorted(failures + results, key=lambda item: item[0]), counters


def _chunks(rows):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Tokenizers:
    """`run(chunks)` → results in order: a process pool when `workers > 1`, else this process."""

    def __init__(self, workers: int, init: tuple) -> None:
        self.pool = None
        if workers > 1:
            # fork starts workers in milliseconds (spawn re-imports everything and re-sends the tokenizer)
            fork = "fork" in multiprocessing.get_all_start_methods()
            self.pool = multiprocessing.get_context("fork" if fork else "spawn").Pool(
                workers, _init_pool_worker, init
            )
        else:
            _init_worker(*init)

    def run(self, chunks):
        return self.pool.imap(_process_chunk, chunks) if self.pool else map(_process_chunk, chunks)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


class UnitReport:
    """Rows read, documents and tokens written, and drops by reason (first rows kept) of one unit or a whole run."""

    def __init__(self, state: dict | None = None) -> None:
        state = state or {}
        self.rows, self.documents, self.tokens = (state.get(k, 0) for k in ("rows", "documents", "tokens"))
        self.dropped = Counter(state.get("dropped", {}))
        self.examples: dict[str, list] = {k: list(v) for k, v in state.get("examples", {}).items()}
        self.counters = Counters(**state.get("counters", {}))

    def drop(self, source: str, row: int, error: RowError) -> None:
        self.dropped[error.reason] += 1
        examples = self.examples.setdefault(error.reason, [])
        if len(examples) < FIRST_ROWS_KEPT:
            examples.append({"input": source, "row": row, "field": error.field, "message": error.message})

    def merge(self, other: UnitReport) -> None:
        self.rows += other.rows
        self.documents += other.documents
        self.tokens += other.tokens
        self.dropped.update(other.dropped)
        for reason, examples in other.examples.items():
            self.examples[reason] = (self.examples.get(reason, []) + examples)[:FIRST_ROWS_KEPT]
        self.counters.merge(other.counters)

    def state(self) -> dict:
        return {
            "rows": self.rows,
            "documents": self.documents,
            "tokens": self.tokens,
            "dropped": dict(self.dropped),
            "examples": self.examples,
            "counters": vars(self.counters),
        }


def unit_dir(work: Path, number: int) -> Path:
    return work / f"unit-{number:06d}"


def complete_unit(work: Path, number: int) -> dict | None:
    """The metadata of unit `number` when it is complete (metadata written, every shard file present at its
    recorded size), else None."""
    directory = unit_dir(work, number)
    try:
        metadata = json.loads((directory / "metadata.json").read_text())
        for shard in metadata["shards"]:
            for suffix, size in ((".tokens", shard["tokens_bytes"]), (".index", shard["index_bytes"])):
                if (directory / f"{shard['name']}{suffix}").stat().st_size != size:
                    return None
    except (OSError, ValueError, KeyError):
        return None
    return metadata


def write_unit(work: Path, number: int, unit: Unit, run: dict, tokenizers: Tokenizers, bar) -> None:
    """Tokenize one unit into `work/unit-NNNNNN/` (a small dataset, renamed into place when complete).
    `run` holds the PrepareConfig (`config`), the TextTokenizer, the dataset `kind` and the work `key`."""
    config = run["config"]
    tokenizer: TextTokenizer = run["tokenizer"]
    report = UnitReport()
    with DatasetWriter(
        unit_dir(work, number),
        run["kind"],
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        bos_id=tokenizer.bos_id,
        max_shard_tokens=config.max_shard_tokens,
        overwrite=True,
    ) as writer:
        for chunk_results, chunk_counters in tokenizers.run(_chunks(read_unit(unit, config.split))):
            report.counters.merge(chunk_counters)
            rows_in_chunk = len({row for row, _ in chunk_results})
            report.rows += rows_in_chunk
            warnings = chunk_counters.warning_rows if config.on_error == "fail" else []
            warned = warnings[0] if warnings else None
            for row, result in chunk_results:
                if warned is not None and warned["row"] <= row:  # a kept row with a tokenization warning
                    raise UnitrainError(
                        f"{unit.label}: row {warned['row']}, field {warned['field']!r}: {warned['message']} "
                        f"({warned['reason']})"
                    )
                if isinstance(result, RowError):
                    if config.on_error == "fail":
                        field = f", field {result.field!r}" if result.field else ""
                        raise UnitrainError(
                            f"{unit.label}: row {row}{field}: {result.message} ({result.reason})"
                        )
                    report.drop(unit.source, row, result)
                    continue
                writer.add(result)
                report.documents += 1
                report.tokens += len(result.token_ids)
            if bar is not None:
                bar.update(rows_in_chunk)
        writer.close({"unit": {"key": run["key"], "source": unit.label, "report": report.state()}})
