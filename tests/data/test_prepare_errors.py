"""Bad rows, unreadable inputs, interrupted runs, the CLI and YAML config, and the other input formats."""

from __future__ import annotations

import gzip
import json

import pytest

from unitrain.cli import main
from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.prepare import pipeline as prepare_module
from unitrain.data.prepare.pipeline import PrepareConfig, prepare
from unitrain.errors import UnitrainError

GOOD_PAIR = {"prompt": "Hello", "chosen": " there", "rejected": " you"}
GOOD_SFT = {"text": "Hello there", "loss_masking_spans": [[0, 5]]}

BAD_ROWS = [
    ({"chosen": " x", "rejected": " y"}, "missing_field", "prompt", GOOD_PAIR),
    ({"prompt": None, "chosen": " x", "rejected": " y"}, "null_field", "prompt", GOOD_PAIR),
    ({"prompt": "p", "chosen": 5, "rejected": " y"}, "not_string", "chosen", GOOD_PAIR),
    ({"prompt": "p", "chosen": "", "rejected": " y"}, "empty_response", "chosen", GOOD_PAIR),
    ({"prompt": "p", "chosen": " same", "rejected": " same"}, "identical_responses", "rejected", GOOD_PAIR),
    (
        {"chosen": "same", "rejected": "same"},
        "identical_responses",
        "rejected",
        {"chosen": "a b", "rejected": "a c"},
    ),
    (
        {"chosen": "abc", "rejected": "xyz"},
        "no_shared_prompt",
        "chosen",
        {"chosen": "a b", "rejected": "a c"},
    ),
    (
        {"chosen": "\n\nHuman: x\n\nAssistant:", "rejected": "\n\nHuman: x\n\nAssistant: y"},
        "empty_response",
        "chosen",
        {"chosen": "a b", "rejected": "a c"},
    ),
    ({"prompt": "p\ud800", "chosen": " x", "rejected": " y"}, "invalid_utf8", "prompt", GOOD_PAIR),
    ('{"prompt": "p", "chosen": ', "unparsable_line", None, GOOD_PAIR),
    ("[1, 2]", "unparsable_line", None, GOOD_PAIR),
    ({"text": "Hello", "loss_masking_spans": [[0, 9]]}, "span_out_of_range", "loss_masking_spans", GOOD_SFT),
    ({"text": "Hello", "loss_masking_spans": [[3, 1]]}, "span_reversed", "loss_masking_spans", GOOD_SFT),
    (
        {"text": "Hello", "loss_masking_spans": [[0, 3], [2, 4]]},
        "span_overlap",
        "loss_masking_spans",
        GOOD_SFT,
    ),
    ({"text": "Hello", "loss_masking_spans": "oops"}, "bad_spans", "loss_masking_spans", GOOD_SFT),
    ({"text": "", "loss_masking_spans": []}, "empty_text", "text", GOOD_SFT),
]


@pytest.mark.parametrize(("bad", "reason", "field", "good"), BAD_ROWS, ids=[case[1] for case in BAD_ROWS])
def test_bad_row_is_skipped_and_counted(run_prepare, bad, reason, field, good):
    output, report = run_prepare([good, bad, good, bad])
    assert report["dropped"] == {reason: 2} and report["documents"] == 2 and report["rows"] == 4
    assert [e["row"] for e in report["dropped_examples"][reason]] == [1, 3]
    assert report["dropped_examples"][reason][0]["field"] == field
    assert json.loads((output / "report.json").read_text())["dropped"] == {reason: 2}
    assert GPTMemmapDataset(output).metadata["report"]["dropped"] == {reason: 2}


@pytest.mark.parametrize(("bad", "reason", "field", "good"), BAD_ROWS, ids=[case[1] for case in BAD_ROWS])
def test_bad_row_fails_with_one_line(run_prepare, tmp_path, bad, reason, field, good):
    with pytest.raises(UnitrainError) as caught:
        run_prepare([good, bad], on_error="fail")
    message = str(caught.value)
    assert "\n" not in message and "row 1" in message and reason in message and "input" in message
    assert field is None or repr(field) in message
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


def test_invalid_utf8_bytes(run_prepare, tmp_path):
    source = tmp_path / "bytes.jsonl"
    source.write_bytes(
        json.dumps(GOOD_PAIR).encode() + b'\n{"prompt": "\xff\xfe", "chosen": " a", "rejected": " b"}\n'
    )
    _, report = run_prepare([], input=str(source))
    assert (
        report["dropped"] == {"invalid_utf8": 1} and report["dropped_examples"]["invalid_utf8"][0]["row"] == 1
    )


def test_unreadable_inputs(run_prepare, tmp_path):
    with pytest.raises(UnitrainError, match=r"missing\.jsonl: not found"):
        run_prepare([], input=str(tmp_path / "missing.jsonl"))
    odd = tmp_path / "rows.txt"
    odd.write_text("x")
    with pytest.raises(UnitrainError, match="not a readable input"):
        run_prepare([], input=str(odd))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(UnitrainError, match=r"broken\.jsonl\.gz: cannot be read"):
        run_prepare([], input=str(broken))
    with pytest.raises(UnitrainError, match="no readable rows"):
        run_prepare(["not json"])
    with pytest.raises(UnitrainError, match="cannot detect the schema"):
        run_prepare([{"body": "x"}])


def test_interrupted_prepare_leaves_nothing(run_prepare, tmp_path, monkeypatch):
    calls = []
    original = prepare_module.DatasetWriter.add

    def add_then_interrupt(self, sample):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(self, sample)

    monkeypatch.setattr(prepare_module.DatasetWriter, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_prepare([GOOD_PAIR] * 5)
    assert len(calls) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


def test_existing_output_needs_overwrite(run_prepare, tmp_path):
    output, _ = run_prepare([GOOD_PAIR])
    with pytest.raises(UnitrainError, match="already exists"):
        run_prepare([GOOD_PAIR], output=str(output))
    run_prepare([GOOD_PAIR, GOOD_PAIR], output=str(output), overwrite=True)
    assert len(GPTMemmapDataset(output)) == 2


def test_cli_with_yaml_config_and_field_names(tmp_path, gpt2_tokenizer_path, capsys):
    source = tmp_path / "renamed.jsonl.gz"
    with gzip.open(source, "wt") as handle:
        handle.write(json.dumps({"question": "Hi", "good": " yes", "bad": " no"}) + "\n")
    config = tmp_path / "prep.yaml"
    config.write_text(
        f"input: {source}\ntokenizer: {gpt2_tokenizer_path}\noutput: {tmp_path / 'from_yaml'}\n"
        "mode: preference\nfields: {chosen: good, rejected: bad}\n"
    )
    assert main(["prepare", "--config", str(config), "--field", "prompt=question", "--no-progress"]) == 0
    assert "1 documents" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "from_yaml"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["index"], record["prompt"], record["chosen"]) == (0, "Hi", " yes<|endoftext|>")
    assert main(["inspect", str(tmp_path / "from_yaml")]) == 0
    assert "--- rejected" in capsys.readouterr().out
    assert main(["prepare", "--config", str(config), "--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err
    assert main(["prepare", "--config", str(config), "--field", "nonsense=x"]) == 2


def test_inspect_sft_marks_masked_text(run_prepare, capsys):
    output, _ = run_prepare([GOOD_SFT])
    assert main(["inspect", str(output)]) == 0
    assert "[masked]Hello[/masked] there<|endoftext|>" in capsys.readouterr().out
    assert main(["inspect", str(output), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["masked"] == ["Hello"]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "disk", "json_array"])
def test_other_input_formats(tmp_path, gpt2_tokenizer_path, fmt):
    import datasets

    rows = [{"text": "first document"}, {"text": "second one"}]
    table = datasets.Dataset.from_list(rows)
    source = (
        tmp_path / {"parquet": "in.parquet", "csv": "in.csv", "disk": "in_dir", "json_array": "in.json"}[fmt]
    )
    if fmt == "parquet":
        table.to_parquet(str(source))
    elif fmt == "csv":
        table.to_csv(str(source), index=False)
    elif fmt == "disk":
        table.save_to_disk(str(source))
    else:
        source.write_text(json.dumps(rows))
    config = PrepareConfig(
        input=str(source), tokenizer=str(gpt2_tokenizer_path), output=str(tmp_path / "out")
    )
    report = prepare(config, progress=False)
    dataset = GPTMemmapDataset(tmp_path / "out")
    assert report["documents"] == 2 and dataset.kind == "pretraining"
    assert dataset.document_lengths.tolist() == [3, 3]  # "first document" / "second one" + EOS


def test_a_prepare_that_keeps_no_row_fails_and_writes_nothing(run_prepare, tmp_path):
    from unitrain.errors import UnitrainError

    rows = [{"chosen": "same text", "rejected": "same text"}, {"chosen": None, "rejected": "x"}]
    with pytest.raises(
        UnitrainError, match=r"all 2 rows were dropped: .*identical_responses \(1; field 'rejected'\)"
    ):
        run_prepare(rows, mode="preference", output=str(tmp_path / "empty"))
    assert not (tmp_path / "empty").exists()
    assert not list(tmp_path.glob(".empty.tmp-*"))


def test_spans_on_rows_of_a_text_dataset_are_counted_not_lost_silently(run_prepare, capsys):
    from unitrain.data.prepare.pipeline import summary

    rows = [{"text": "hello world"}, {"text": "Q: a A: b", "loss_masking_spans": [[0, 5]]}]
    output, report = run_prepare(rows)
    assert report["schema"] == "text" and report["documents"] == 2
    assert report["ignored_loss_masking_spans"] == 1 and report["ignored_loss_masking_spans_rows"] == [1]
    assert "ignored loss_masking_spans in 1 rows: the schema (text)" in summary(report, str(output))
