"""The command line itself: version, argument checks that no subcommand module owns."""

from __future__ import annotations

import json

import pytest

import unitrain
from unitrain.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"unitrain {unitrain.__version__}\n"


def test_train_without_arguments_needs_only_the_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: config\n" in err
    assert "[key=value ...]" in err  # overrides are optional


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, gpt2_tokenizer_path):
    root = tmp_path_factory.mktemp("cli")
    rows = [{"prompt": "Hi", "chosen": " yes", "rejected": " no"}] * 3
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["prepare", "--input", str(root / "pairs.jsonl"), "--tokenizer", str(gpt2_tokenizer_path)]
    assert main([*argv, "--output", str(root / "pairs"), "--no-progress"]) == 0
    return root / "pairs"


@pytest.mark.parametrize("flag, value", [("--count", "-1"), ("--index", "-1"), ("--index", "3")])
def test_inspect_refuses_a_negative_count_or_an_index_out_of_range(prepared, capsys, flag, value):
    assert main(["inspect", str(prepared), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} {value}") and err.count("\n") == 1


def test_inspect_count_zero_prints_the_summary_only(prepared, capsys):
    assert main(["inspect", str(prepared), "--count", "0"]) == 0
    out = capsys.readouterr().out
    assert "preference dataset" in out and "=== document" not in out


def test_inspect_counts_in_words(tmp_path, gpt2_tokenizer_path, capsys):
    (tmp_path / "one.jsonl").write_text(
        json.dumps({"prompt": "Hi", "chosen": " yes", "rejected": " no"}) + "\n"
    )
    argv = ["prepare", "--input", str(tmp_path / "one.jsonl"), "--tokenizer", str(gpt2_tokenizer_path)]
    assert main([*argv, "--output", str(tmp_path / "one"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "one"), "--count", "0"]) == 0
    assert ", 1 document, " in capsys.readouterr().out
