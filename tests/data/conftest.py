"""Helpers of the data tests: write input rows to a file and run prepare on them with the GPT-2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unitrain.data.prepare.pipeline import PrepareConfig, prepare
from unitrain.data.prepare.tokenize import TextTokenizer


@pytest.fixture(scope="session")
def gpt2(gpt2_tokenizer_path: Path) -> TextTokenizer:
    return TextTokenizer(gpt2_tokenizer_path)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def run_prepare(tmp_path: Path, gpt2_tokenizer_path: Path):
    """run_prepare(rows, **settings) -> (output dir, report); rows are dicts or raw lines of a JSONL file."""
    counter = iter(range(1000))

    def run(rows: list, **settings):
        number = next(counter)
        source = write_jsonl(tmp_path / f"input{number}.jsonl", rows)
        settings = {
            "tokenizer": str(gpt2_tokenizer_path),
            "output": str(tmp_path / f"out{number}"),
            **settings,
        }
        config = PrepareConfig(input=str(settings.pop("input", source)), **settings)
        return Path(config.output), prepare(config, progress=False)

    return run
