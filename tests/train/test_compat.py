"""Model and data that do not belong together are refused in one line: a vocabulary too small for the dataset's
ids, a checkpoint whose tokenizer is not the one the data was prepared with (unless allowed), a CUDA device on a
machine without one."""

from __future__ import annotations

import json

import pytest
import torch

from unitrain.cli import main
from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.memmap.writer import DatasetWriter
from unitrain.errors import UnitrainError
from unitrain.model import ModelConfig, build_model, save_pretrained
from unitrain.train import train

from .conftest import VOCAB


def word_level(vocab: dict[str, int]) -> dict:
    """A real `tokenizers` tokenizer (as its tokenizer.json content) with the given token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return json.loads(Tokenizer(WordLevel(vocab, unk_token="a")).to_str())


TOKENIZER = word_level({"a": 0, "b": 1, "c": 2})
SWAPPED = word_level({"a": 0, "b": 2, "c": 1})


def _pairs_with_tokenizer(preference_data, root, file_name: str):
    """The trainer tests' preference pairs, recorded as prepared with TOKENIZER saved as `file_name`."""
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / file_name).write_text(json.dumps(TOKENIZER))
    source = GPTMemmapDataset(preference_data)
    writer = DatasetWriter(
        root / "pairs",
        "preference",
        vocab_size=VOCAB,
        eos_id=0,
        tokenizer_files=[root / "tokenizer" / file_name],
    )
    with writer:
        for index in range(len(source)):
            writer.add(source[index])
    return root / "pairs"


@pytest.fixture(scope="module")
def tokenized_pairs(preference_data, tmp_path_factory):
    return _pairs_with_tokenizer(preference_data, tmp_path_factory.mktemp("compat"), "tokenizer.json")


def checkpoint(directory, vocab_size=VOCAB, tokenizer=None):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4
    )
    save_pretrained(build_model(config), directory)
    if tokenizer is not None:
        (directory / "tokenizer.json").write_text(tokenizer)
    return directory


def score(model, data, tmp_path, *flags):
    return main(
        ["score", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "s.jsonl"), *flags]
    )


def test_score_refuses_a_vocabulary_smaller_than_the_dataset(tokenized_pairs, tmp_path, capsys):
    model = checkpoint(tmp_path / "small", vocab_size=VOCAB - 8)
    assert score(model, tokenized_pairs, tmp_path) == 2
    err = capsys.readouterr().err
    assert err == f"error: {model}: model vocab_size {VOCAB - 8} is smaller than the dataset's {VOCAB}\n"


def test_score_refuses_another_tokenizer_unless_allowed(tokenized_pairs, tmp_path, capsys):
    model = checkpoint(tmp_path / "other", tokenizer=json.dumps(SWAPPED))
    assert score(model, tokenized_pairs, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{model / 'tokenizer.json'}" in err and f"{tokenized_pairs}" in err
    assert "--allow-tokenizer-mismatch" in err
    assert score(model, tokenized_pairs, tmp_path, "--allow-tokenizer-mismatch") == 0


def test_a_tokenizer_file_of_another_name_is_checked_by_content(preference_data, tmp_path, capsys):
    """`prepare --tokenizer gpt2-tokenizer.json` records the file under its own name: still compared."""
    pairs = _pairs_with_tokenizer(preference_data, tmp_path, "gpt2-tokenizer.json")
    assert score(checkpoint(tmp_path / "other", tokenizer=json.dumps(SWAPPED)), pairs, tmp_path) == 2
    assert "is not the tokenizer" in capsys.readouterr().err
    resaved = json.dumps(TOKENIZER, indent=2, sort_keys=True)
    assert score(checkpoint(tmp_path / "same", tokenizer=resaved), pairs, tmp_path) == 0


def test_the_same_tokenizer_saved_differently_is_accepted(tokenized_pairs, tmp_path):
    model = checkpoint(tmp_path / "same", tokenizer=json.dumps(TOKENIZER, indent=2, sort_keys=True))
    assert score(model, tokenized_pairs, tmp_path) == 0


def test_training_from_a_checkpoint_refuses_another_tokenizer_unless_allowed(
    tokenized_pairs, tmp_path, tiny_config
):
    model = checkpoint(tmp_path / "other", tokenizer=json.dumps(SWAPPED))
    sections = {"model": {"path": str(model), "config": None}, "train": {"max_steps": 2}}
    with pytest.raises(
        UnitrainError, match=r"tokenizer.json .* is not the tokenizer .* was prepared with"
    ) as error:
        train(tiny_config("dpo", tokenized_pairs, tmp_path / "refused", **sections))
    assert "data.allow_tokenizer_mismatch" in str(error.value)
    data = {"train": str(tokenized_pairs), "validation": None, "allow_tokenizer_mismatch": True}
    allowed = tiny_config("dpo", tokenized_pairs, tmp_path / "allowed", **{**sections, "data": data})
    assert train(allowed).steps == 2


def test_cuda_on_a_machine_without_cuda_is_one_line(
    tokenized_pairs, tmp_path, tiny_config, monkeypatch, capsys
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnitrainError, match="train.device=cuda: .*; use train.device=auto"):
        train(tiny_config("dpo", tokenized_pairs, tmp_path / "run", train={"max_steps": 2, "device": "cuda"}))
    model = checkpoint(tmp_path / "model")
    assert score(model, tokenized_pairs, tmp_path, "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: ") and err.count("\n") == 1
    assert score(model, tokenized_pairs, tmp_path, "--device", "auto") == 0
