"""Input paths → units of work → raw rows, streamed: what `unitrain prepare` reads, and in which order.

`--input` takes files, glob patterns, directories of files, a `save_to_disk` directory or a hub name, in any
number. They resolve to one ordered list of *units*: a JSON-lines, CSV or Arrow file is one unit, a Parquet file
one unit per row group, a `save_to_disk` directory or a hub dataset one unit. Units are what the ranks of a
multi-rank prepare divide between them, and the output lists documents in unit order, so the result does not
depend on how many ranks or workers wrote it. Trade-off: every format is streamed in batches of rows (pyarrow
for Parquet and Arrow, the `csv` module, line by line for JSON lines), so memory stays bounded whatever the input
size and no second copy of the corpus lands in a cache; a single large JSON-lines file cannot be divided between
ranks (split it into several files, or convert it to Parquet with several row groups).
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from unitrain.errors import UnitrainError

JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")
FILE_KINDS = {**dict.fromkeys(JSON_SUFFIXES, "json"), ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by `save_to_disk`
BATCH_ROWS = 1024
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class Unit:
    """One unit of work: a whole input, or one row group of a Parquet file. `first_row` numbers its first row
    within its input, so row numbers in reports are those of the input file."""

    source: str
    kind: str  # json | parquet | csv | arrow | disk | hub
    part: int = 0  # Parquet row group
    first_row: int = 0
    rows: int | None = None  # known for Parquet, else None

    @property
    def label(self) -> str:
        return self.source if self.kind != "parquet" else f"{self.source} (row group {self.part})"


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for suffix, kind in FILE_KINDS.items() if name.endswith(suffix)), None)


def _looks_local(text: str) -> bool:
    return text.startswith((".", "/", "~")) or _file_kind(Path(text)) is not None or text.endswith(".gz")


def _expand(entry: str) -> list[tuple[str, str]]:
    """One `--input` value → [(path or name, kind)]; every error is one line naming the entry."""
    path = Path(entry).expanduser()
    if any(character in entry for character in GLOB_CHARACTERS):
        matches = sorted(glob.glob(str(path), recursive=True))
        files = [(match, _file_kind(Path(match))) for match in matches if Path(match).is_file()]
        files = [(match, kind) for match, kind in files if kind is not None]
        if not files:
            raise UnitrainError(f"{entry}: no .jsonl/.json/.parquet/.csv/.arrow file matches this pattern")
        return files
    if path.is_dir():
        if any((path / marker).is_file() for marker in DISK_MARKERS):
            return [(str(path), "disk")]
        files = sorted(p for p in path.rglob("*") if p.is_file() and _file_kind(p) is not None)
        if not files:
            raise UnitrainError(
                f"{entry}: a directory without .jsonl/.json/.parquet/.csv/.arrow files (nor a save_to_disk dataset)"
            )
        return [(str(p), _file_kind(p)) for p in files]
    if path.is_file():
        kind = _file_kind(path)
        if kind is None:
            raise UnitrainError(
                f"{entry}: not a readable input (expected .jsonl[.gz], .json[.gz], .parquet, .csv or .arrow)"
            )
        return [(str(path), kind)]
    if path.exists() or _looks_local(entry):
        raise UnitrainError(f"{entry}: not found")
    return [(entry, "hub")]


def resolve_units(inputs: list[str]) -> list[Unit]:
    """The ordered units of all inputs: inputs in the given order, each pattern or directory sorted by path."""
    if not inputs:
        raise UnitrainError("no --input given")
    resolved: list[tuple[str, str]] = []
    for entry in inputs:
        resolved += _expand(str(entry))
    seen: set[str] = set()
    for source, _ in resolved:
        if source in seen:
            raise UnitrainError(f"{source}: listed twice in --input (each input is read once)")
        seen.add(source)
    units: list[Unit] = []
    for source, kind in resolved:
        units += _parquet_units(source) if kind == "parquet" else [Unit(source, kind)]
    return units


def _parquet_units(source: str) -> list[Unit]:
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(source).metadata
    except Exception as error:  # pyarrow raises several types; all mean "not a readable Parquet file"
        raise UnitrainError(f"{source}: cannot be read as Parquet ({error})") from None
    units, first = [], 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        units.append(Unit(source, "parquet", group, first, rows))
        first += rows
    return units or [Unit(source, "parquet", 0, 0, 0)]


def signature(unit: Unit) -> list:
    """What identifies a unit's content cheaply: its place, and for files their size and modification time."""
    path = Path(unit.source)
    if unit.kind in ("hub",) or not path.exists():
        return [unit.source, unit.kind, unit.part]
    stat = path.stat()
    return [str(path.resolve()), unit.kind, unit.part, stat.st_size, stat.st_mtime_ns]


def read_unit(unit: Unit, split: str = "train") -> Iterator[tuple[int, bytes | dict]]:
    """Yield (row number within the input, raw row): JSON lines stay bytes (parsed in the tokenizer workers),
    other formats give dicts. Unreadable data raises `UnitrainError` naming the input."""
    readers = {
        "json": _read_json,
        "parquet": _read_parquet,
        "csv": _read_csv,
        "arrow": _read_arrow,
        "disk": _read_datasets,
        "hub": _read_datasets,
    }
    yield from readers[unit.kind](unit, split)


def _read_json(unit: Unit, split: str) -> Iterator[tuple[int, bytes | dict]]:
    path = Path(unit.source)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            first = handle.read(1 << 16)
            bom = first.startswith(
                codecs.BOM_UTF8
            )  # written by some Windows editors: not part of the first row
            first = first[len(codecs.BOM_UTF8) :] if bom else first
            if first.lstrip()[:1] == b"[":  # one JSON array, not JSON lines: read whole (not streamable)
                try:
                    rows = json.loads(first + handle.read())
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise UnitrainError(f"{path}: not valid JSON ({error})") from None
                yield from enumerate(
                    row if isinstance(row, dict) else json.dumps(row).encode() for row in rows
                )
                return
            handle.seek(len(codecs.BOM_UTF8) if bom else 0)
            for index, line in enumerate(handle):
                if line.strip():
                    yield index, line
    except (OSError, EOFError) as error:
        raise UnitrainError(f"{path}: cannot be read ({error})") from None


def _batches_to_rows(batches, unit: Unit) -> Iterator[tuple[int, dict]]:
    index = unit.first_row
    for batch in batches:
        for row in batch.to_pylist():
            yield index, row
            index += 1


def _read_parquet(unit: Unit, split: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(unit.source).iter_batches(batch_size=BATCH_ROWS, row_groups=[unit.part])
        yield from _batches_to_rows(batches, unit)
    except (OSError, ValueError) as error:
        raise UnitrainError(f"{unit.label}: cannot be read as Parquet ({error})") from None


def _read_arrow(unit: Unit, split: str) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa

    try:
        source = pa.memory_map(unit.source)
        try:
            reader = pa.ipc.open_stream(source)  # what `datasets` writes
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            reader = (file_reader.get_batch(k) for k in range(file_reader.num_record_batches))
        yield from _batches_to_rows(reader, unit)
    except (OSError, pa.ArrowInvalid) as error:
        raise UnitrainError(f"{unit.source}: cannot be read as Arrow IPC ({error})") from None


def _read_csv(unit: Unit, split: str) -> Iterator[tuple[int, dict]]:
    csv.field_size_limit(sys.maxsize)  # documents can be longer than the module's 128 KiB default
    try:
        with open(unit.source, newline="", encoding="utf-8-sig") as handle:  # -sig: a leading BOM is dropped
            yield from enumerate(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UnitrainError(f"{unit.source}: cannot be read as CSV ({error})") from None


def _read_datasets(unit: Unit, split: str) -> Iterator[tuple[int, dict]]:
    """A `save_to_disk` directory (memory-mapped Arrow, no copy) or a hub dataset (streamed, no cache copy)."""
    import datasets

    try:
        if unit.kind == "disk":
            loaded = datasets.load_from_disk(unit.source)
        else:
            loaded = datasets.load_dataset(unit.source, split=split, streaming=True)
    except Exception as error:  # datasets raises many types; all mean "cannot read this input"
        raise UnitrainError(
            f"{unit.source}: cannot be read by datasets ({type(error).__name__}: {error})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UnitrainError(f"{unit.source}: no split {split!r} (has {', '.join(loaded)})")
        loaded = loaded[split]
    if unit.kind == "hub":
        yield from enumerate(loaded)
        return
    index = 0
    for batch in loaded.iter(batch_size=BATCH_ROWS):
        columns = list(batch)
        for values in zip(*(batch[column] for column in columns)):
            yield index, dict(zip(columns, values))
            index += 1
