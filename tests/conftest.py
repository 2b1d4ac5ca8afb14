"""Shared test paths. Each area keeps its own fixtures in tests/<area>/conftest.py."""

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
