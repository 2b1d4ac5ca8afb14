"""Shared test paths and the one prepared dataset two areas use. Each area keeps its own fixtures in
tests/<area>/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2_TOKENIZER = SHARED_DATA / "tokenizers" / "gpt2" / "tokenizer.json"


@pytest.fixture(scope="session")
def hh_rlhf_path() -> Path:
    assert HH_RLHF.exists(), f"shared data missing: {HH_RLHF}"
    return HH_RLHF


@pytest.fixture(scope="session")
def gpt2_tokenizer_path() -> Path:
    assert GPT2_TOKENIZER.exists(), f"shared tokenizer missing: {GPT2_TOKENIZER}"
    return GPT2_TOKENIZER


@pytest.fixture(scope="session")
def hh_pairs(hh_rlhf_path, gpt2_tokenizer_path, tmp_path_factory) -> Path:
    """The first 16 HH-RLHF pairs prepared with the GPT-2 tokenizer within 96 tokens (`unitrain prepare`)."""
    import gzip

    from unitrain.cli import main

    root = tmp_path_factory.mktemp("hh-pairs")
    with gzip.open(hh_rlhf_path, "rt") as source:
        (root / "slice.jsonl").write_text("".join(next(source) for _ in range(16)))
    prepare = ["prepare", "--input", str(root / "slice.jsonl"), "--tokenizer", str(gpt2_tokenizer_path)]
    prepare += ["--max-length", "96", "--workers", "1", "--no-progress", "--output", str(root / "pairs")]
    assert main(prepare) == 0
    return root / "pairs"
