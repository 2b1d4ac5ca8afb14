"""Inputs for real corpora: several paths, glob patterns and directories, resolved in a documented order, and
every format streamed (Parquet row group by row group, never through a `datasets` cache)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.prepare.pipeline import PrepareConfig, prepare, summary
from unitrain.data.rows.inputs import read_unit, resolve_units
from unitrain.data.rows.schemas import parse_row
from unitrain.errors import UnitrainError

from .conftest import write_jsonl


def texts(start: int, count: int) -> list[dict]:
    return [{"text": f"document number {k} says {'hello ' * (k % 7)}"} for k in range(start, start + count)]


def write_parquet(path: Path, rows: list[dict], row_group_size: int) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A directory of inputs in three formats: 40 documents in all, numbered in path order."""
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    write_jsonl(root / "a-00.jsonl", texts(0, 10))
    write_parquet(root / "a-01.parquet", texts(10, 15), row_group_size=4)  # 4 row groups
    (root / "b" / "c-02.csv").write_text("text\n" + "".join(f'"{row["text"]}"\n' for row in texts(25, 10)))
    write_jsonl(root / "b" / "d-03.jsonl", texts(35, 5))
    (root / "notes.txt").write_text("not an input")
    return root


def run(tmp_path: Path, inputs, name: str, tokenizer: Path, **settings) -> tuple[GPTMemmapDataset, dict]:
    config = PrepareConfig(input=inputs, tokenizer=str(tokenizer), output=str(tmp_path / name), **settings)
    report = prepare(config, progress=False)
    return GPTMemmapDataset(tmp_path / name), report


def decoded(dataset: GPTMemmapDataset, gpt2) -> list[str]:
    return [gpt2.decode(dataset[k].token_ids).removesuffix("<|endoftext|>") for k in range(len(dataset))]


def test_directory_patterns_and_files_resolve_in_order(corpus):
    units = resolve_units([str(corpus)])
    assert [(Path(u.source).name, u.kind, u.part, u.first_row) for u in units] == [
        ("a-00.jsonl", "json", 0, 0),
        ("a-01.parquet", "parquet", 0, 0),
        ("a-01.parquet", "parquet", 1, 4),
        ("a-01.parquet", "parquet", 2, 8),
        ("a-01.parquet", "parquet", 3, 12),
        ("c-02.csv", "csv", 0, 0),
        ("d-03.jsonl", "json", 0, 0),
    ]
    given = resolve_units([str(corpus / "b" / "*"), str(corpus / "a-00.jsonl")])
    assert [Path(u.source).name for u in given] == ["c-02.csv", "d-03.jsonl", "a-00.jsonl"]
    rows = [row for unit in units if unit.kind == "parquet" for row in read_unit(unit)]
    assert [index for index, _ in rows] == list(range(15))  # row numbers of the file, not of the group


def test_every_input_shape_gives_the_same_documents(corpus, tmp_path, gpt2, gpt2_tokenizer_path):
    expected = [row["text"] for row in texts(0, 40)]
    whole, report = run(tmp_path, str(corpus), "whole", gpt2_tokenizer_path)
    assert decoded(whole, gpt2) == expected and report["rows"] == 40 and report["inputs"] == 4
    parts = [str(corpus / "a-*"), str(corpus / "b")]
    listed, _ = run(tmp_path, parts, "listed", gpt2_tokenizer_path, max_shard_tokens=64, workers=2)
    assert decoded(listed, gpt2) == expected
    assert whole.fingerprint != listed.fingerprint  # other shard boundaries, same documents
    names = ["a-00.jsonl", "a-01.parquet", "b/c-02.csv", "b/d-03.jsonl"]
    assert whole.metadata["source"]["files"] == [str(corpus / name) for name in names]
    concatenated = write_jsonl(tmp_path / "all.jsonl", texts(0, 40))
    single, _ = run(tmp_path, str(concatenated), "single", gpt2_tokenizer_path)
    assert [s.token_ids.tolist() for s in map(single.__getitem__, range(40))] == [
        s.token_ids.tolist() for s in map(whole.__getitem__, range(40))
    ]


def test_input_errors_are_one_line(corpus, tmp_path, gpt2_tokenizer_path):
    cases = [
        ([str(tmp_path / "nope.jsonl")], r"nope\.jsonl: not found"),
        ([str(tmp_path / "nope" / "*.parquet")], "no .jsonl/.json/.parquet/.csv/.arrow file matches"),
        ([str(corpus / "notes.txt")], "not a readable input"),
        ([str(corpus / "a-00.jsonl"), str(corpus / "a-*.jsonl")], "listed twice"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(([str(empty)], "a directory without .jsonl"))
    for inputs, message in cases:
        with pytest.raises(UnitrainError, match=message):
            run(tmp_path, inputs, "out", gpt2_tokenizer_path)
    broken = write_parquet(tmp_path / "broken.parquet", texts(0, 3), 3)
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(UnitrainError, match=r"broken\.parquet: cannot be read as Parquet"):
        run(tmp_path, [str(broken)], "out", gpt2_tokenizer_path)


def test_bad_rows_name_their_file_row_and_field(corpus, tmp_path, gpt2_tokenizer_path):
    write_jsonl(corpus / "b" / "e-04.jsonl", [{"text": "fine"}, {"body": "no text field"}])
    _, report = run(tmp_path, str(corpus), "out", gpt2_tokenizer_path)
    assert report["dropped"] == {"missing_field": 1}
    assert report["dropped_examples"]["missing_field"] == [
        {"input": str(corpus / "b" / "e-04.jsonl"), "row": 1, "field": "text", "message": "field is missing"}
    ]
    assert "dropped 1 × missing_field (field 'text'; first rows: e-04.jsonl:1)" in summary(report, "out")
    with pytest.raises(UnitrainError, match=r"e-04\.jsonl: row 1, field 'text': field is missing"):
        run(tmp_path, str(corpus), "failed", gpt2_tokenizer_path, on_error="fail")


def test_parquet_and_jsonl_are_streamed_without_datasets(corpus, tmp_path, gpt2_tokenizer_path):
    """No `datasets` import (so no Arrow cache copy of the corpus), and rows are read a batch at a time."""
    code = f"""
import sys
from unitrain.data.prepare.pipeline import PrepareConfig, prepare
from unitrain.data.rows import inputs
batches = []
original = inputs._batches_to_rows
def counting(batches_iter, unit):
    for batch in batches_iter:
        batches.append(batch.num_rows)
        yield from original([batch], unit)
inputs._batches_to_rows = counting
prepare(PrepareConfig(input={str(corpus)!r}, tokenizer={str(gpt2_tokenizer_path)!r},
                      output={str(tmp_path / "streamed")!r}), progress=False)
print(batches, "datasets" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("]")[-1].strip() == "False"
    assert json.loads(out.split("]")[0] + "]")[:4] == [4, 4, 4, 3]


def test_json_array_elements_that_are_not_objects_are_reported_as_such(tmp_path, gpt2_tokenizer_path):
    source = tmp_path / "rows.json"
    source.write_text(json.dumps([{"text": "fine"}, 5, [1, 2], {"text": "also fine"}]))
    _, report = run(tmp_path, str(source), "out", gpt2_tokenizer_path)
    assert report["documents"] == 2 and report["dropped"] == {"unparsable_line": 2}
    messages = [example["message"] for example in report["dropped_examples"]["unparsable_line"]]
    assert messages == ["a JSON int, not an object", "a JSON list, not an object"]


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz", "array.json", "rows.csv"])
def test_a_utf8_byte_order_mark_is_read_not_taken_for_the_first_row(tmp_path, name):
    import codecs
    import gzip

    rows = [{"text": "première"}, {"text": "second"}]
    if name.endswith(".csv"):
        body = "text\n" + "".join(f"{row['text']}\n" for row in rows)
    elif name.startswith("array"):
        body = json.dumps(rows)
    else:
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    data = codecs.BOM_UTF8 + body.encode()
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    read = [row for _, row in read_unit(resolve_units([str(tmp_path / name)])[0])]
    assert [parse_row(row) for row in read] == rows  # how prepare parses a JSON line
