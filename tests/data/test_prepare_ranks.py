"""Multi-rank prepare: any number of ranks writes the same dataset, byte for byte, as one rank; an interrupted
rank leaves nothing that loads, and running the same command again completes the dataset from the units done."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.prepare import pipeline as prepare_module
from unitrain.data.prepare.pipeline import PrepareConfig, prepare
from unitrain.errors import UnitrainError

from .conftest import write_jsonl
from .test_inputs import write_parquet

PAIR = {"prompt": "Question {k}:", "chosen": " answer {k} is right", "rejected": " answer {k} is {w}"}


def rows(start: int, count: int) -> list[dict]:
    return [
        {key: value.format(k=k, w="wrong " * (k % 5)) for key, value in PAIR.items()}
        for k in range(start, start + count)
    ]


@pytest.fixture
def inputs(tmp_path) -> list[str]:
    """Seven units: three JSON-lines files and a Parquet file of four row groups, with a bad row."""
    root = tmp_path / "in"
    root.mkdir()
    write_jsonl(root / "part-0.jsonl", rows(0, 12))
    write_jsonl(
        root / "part-1.jsonl", rows(12, 3) + [{"prompt": "p", "chosen": " same", "rejected": " same"}]
    )
    write_parquet(root / "part-2.parquet", rows(15, 14), row_group_size=4)
    write_jsonl(root / "part-3.jsonl", rows(29, 7))
    return [str(root / "part-*")]


def config(tmp_path: Path, inputs: list[str], name: str, tokenizer: Path) -> PrepareConfig:
    return PrepareConfig(
        input=inputs, tokenizer=str(tokenizer), output=str(tmp_path / name), max_shard_tokens=100
    )


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != "report.json"  # report.json holds the wall time
    }


def work_dirs(tmp_path: Path) -> list[Path]:
    return list(tmp_path.glob(".*.prepare-*"))


@pytest.fixture
def one_rank(tmp_path, inputs, gpt2_tokenizer_path) -> Path:
    report = prepare(config(tmp_path, inputs, "one", gpt2_tokenizer_path), progress=False)
    assert report["documents"] == 36 and report["dropped"] == {"identical_responses": 1}
    return tmp_path / "one"


def test_ranks_started_by_hand_write_the_same_bytes(one_rank, tmp_path, inputs, gpt2_tokenizer_path):
    settings = config(tmp_path, inputs, "three", gpt2_tokenizer_path)
    assert prepare(settings, progress=False, rank=2, world_size=3) is None
    assert prepare(settings, progress=False, rank=1, world_size=3) is None
    assert not (tmp_path / "three").exists()  # nothing loads before rank 0 assembles
    report = prepare(settings, progress=False, rank=0, world_size=3)
    assert report["documents"] == 36 and report["dropped_examples"]["identical_responses"][0]["row"] == 3
    assert files_of(tmp_path / "three") == files_of(one_rank)
    assert GPTMemmapDataset(tmp_path / "three").fingerprint == GPTMemmapDataset(one_rank).fingerprint
    assert not work_dirs(tmp_path)


def test_torchrun_two_ranks_write_the_same_bytes(one_rank, tmp_path, inputs, gpt2_tokenizer_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
        "-m", "unitrain", "prepare", "--input", *inputs, "--tokenizer", str(gpt2_tokenizer_path),
        "--output", str(tmp_path / "two"), "--no-progress", "--workers", "2",
    ]  # fmt: skip
    (tmp_path / "prep.yaml").write_text("max_shard_tokens: 100\n")
    command += ["--config", str(tmp_path / "prep.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 1 of 2: its inputs are tokenized" in done.stdout
    assert "wrote " in done.stdout and "36 documents" in done.stdout
    assert files_of(tmp_path / "two") == files_of(one_rank)


def test_an_interrupted_rank_leaves_nothing_that_loads_and_a_rerun_completes(
    one_rank, tmp_path, inputs, gpt2_tokenizer_path, monkeypatch
):
    settings = config(tmp_path, inputs, "resumed", gpt2_tokenizer_path)
    written = []
    original = prepare_module.write_unit

    def write_then_stop(work, number, *args):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(number)
        original(work, number, *args)

    monkeypatch.setattr(prepare_module, "write_unit", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(settings, progress=False, rank=1, world_size=2)
    assert written == [1, 3]
    with pytest.raises(UnitrainError, match="not a prepared dataset"):
        GPTMemmapDataset(tmp_path / "resumed")
    (work,) = work_dirs(tmp_path)
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".")) == [
        "unit-000001",
        "unit-000003",
    ]
    written.clear()
    monkeypatch.setattr(prepare_module, "write_unit", lambda work, number, *args: (
        written.append(number), original(work, number, *args)))  # fmt: skip
    prepare(settings, progress=False)
    assert written == [0, 2, 4, 5, 6]  # the units already complete are not tokenized again
    assert files_of(tmp_path / "resumed") == files_of(one_rank) and not work_dirs(tmp_path)


def test_a_unit_whose_files_went_missing_is_written_again(tmp_path, inputs, gpt2_tokenizer_path, one_rank):
    settings = config(tmp_path, inputs, "again", gpt2_tokenizer_path)
    assert prepare(settings, progress=False, rank=1, world_size=2) is None
    (work,) = work_dirs(tmp_path)
    next((work / "unit-000001").glob("*.tokens")).unlink()  # e.g. an assembly killed half way
    prepare(settings, progress=False)
    assert files_of(tmp_path / "again") == files_of(one_rank)


def test_rank_must_be_inside_the_world(tmp_path, inputs, gpt2_tokenizer_path):
    with pytest.raises(UnitrainError, match="rank 2 of 2"):
        prepare(config(tmp_path, inputs, "x", gpt2_tokenizer_path), rank=2, world_size=2)
