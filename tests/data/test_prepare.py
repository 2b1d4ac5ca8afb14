"""prepare, schema by schema: decoding the stored spans gives back the source text (+ EOS), and the tokens are
those of raw `tokenizers` on each segment alone."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.prepare.pipeline import PrepareConfig, prepare, summary
from unitrain.data.prepare.tokenize import TextTokenizer
from unitrain.errors import UnitrainError

EOS = "<|endoftext|>"
MARKER = "\n\nAssistant:"


def raw_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def hh_rows(hh_rlhf_path) -> list[dict]:
    with gzip.open(hh_rlhf_path, "rt") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def hh_dataset(tmp_path_factory, hh_rlhf_path, gpt2_tokenizer_path) -> Path:
    output = tmp_path_factory.mktemp("hh") / "hh"
    config = PrepareConfig(input=str(hh_rlhf_path), tokenizer=str(gpt2_tokenizer_path), output=str(output))
    prepare(config, progress=False)
    return output


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tmp_path_factory, gpt2_tokenizer_path) -> Path:
    """GPT-2 plus a `<s>` special token, which the wrapper takes as BOS."""
    directory = tmp_path_factory.mktemp("bos_tokenizer")
    tokenizer = Tokenizer.from_file(str(gpt2_tokenizer_path))
    tokenizer.add_special_tokens(["<s>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def test_hh_rlhf_implicit_prompt_round_trip(hh_rows, hh_dataset, gpt2_tokenizer_path):
    dataset = GPTMemmapDataset(hh_dataset)
    raw = Tokenizer.from_file(str(gpt2_tokenizer_path))
    decode = TextTokenizer(dataset.tokenizer_path).decode
    assert dataset.kind == "preference" and len(dataset) == len(hh_rows) == 2312
    assert dataset.bos_id is None and dataset.eos_id == 50256
    assert dataset.metadata["schema"] == "implicit" and dataset.metadata["report"]["dropped"] == {}
    whole_history = 0
    for index, row in enumerate(hh_rows):
        sample = dataset[index]
        prompt = decode(sample.prompt_ids)
        assert prompt.endswith(MARKER)
        assert prompt + decode(sample.chosen_ids) == row["chosen"] + EOS
        assert prompt + decode(sample.rejected_ids) == row["rejected"] + EOS
        assert sample.prompt_ids.tolist() == raw_ids(raw, prompt)
        assert sample.chosen_ids.tolist() == raw_ids(raw, row["chosen"][len(prompt) :]) + [50256]
        # Independent rule check: no marker in what both responses still share after the prompt.
        chosen_rest, rejected_rest = row["chosen"][len(prompt) :], row["rejected"][len(prompt) :]
        shared = next((i for i, (a, b) in enumerate(zip(chosen_rest, rejected_rest)) if a != b), None)
        assert MARKER not in chosen_rest[:shared]
        if row["chosen"].rsplit(MARKER, 1)[0] == row["rejected"].rsplit(MARKER, 1)[0]:
            whole_history += 1
            assert prompt == row["chosen"].rsplit(MARKER, 1)[0] + MARKER
    assert whole_history > 2000
    from transformers import AutoTokenizer

    copied = AutoTokenizer.from_pretrained(dataset.tokenizer_path)
    assert copied.eos_token_id == 50256 and copied.bos_token is None


def test_worker_count_gives_identical_bytes(hh_dataset, hh_rlhf_path, gpt2_tokenizer_path, tmp_path):
    config = PrepareConfig(
        input=str(hh_rlhf_path), tokenizer=str(gpt2_tokenizer_path), output=str(tmp_path / "w2"), workers=2
    )
    prepare(config, progress=False)
    names = sorted(p.name for p in hh_dataset.iterdir() if p.is_file() and p.suffix in (".tokens", ".index"))
    assert names == ["shard-00000.index", "shard-00000.tokens"]
    for name in names + ["tokenizer/tokenizer.json"]:
        assert (tmp_path / "w2" / name).read_bytes() == (hh_dataset / name).read_bytes(), name
    assert GPTMemmapDataset(tmp_path / "w2").fingerprint == GPTMemmapDataset(hh_dataset).fingerprint


def test_text_schema(run_prepare, gpt2):
    texts = ["Hello world.", " leading space and unicode: café ✓", "line\nbreaks\n\n"]
    output, report = run_prepare([{"text": t} for t in texts])
    dataset = GPTMemmapDataset(output)
    assert dataset.kind == "pretraining" and report["documents"] == 3
    for index, text in enumerate(texts):
        assert gpt2.decode(dataset[index].token_ids) == text + EOS
        assert dataset[index].loss_masking_spans is None


def test_text_with_bos_and_split(run_prepare, bos_tokenizer_dir):
    text = "one two three four five six seven eight nine ten"
    output, report = run_prepare([{"text": text}], tokenizer=str(bos_tokenizer_dir), max_length=4)
    dataset = GPTMemmapDataset(output)
    tokenizer = TextTokenizer(dataset.tokenizer_path)
    whole = np.concatenate([dataset[i].token_ids for i in range(len(dataset))])
    assert dataset.bos_id == tokenizer.bos_id is not None and whole[0] == dataset.bos_id
    assert tokenizer.decode(whole) == "<s>" + text + EOS
    assert dataset.document_lengths.max() == 4 and report["split_documents"] == 1
    assert report["split_extra_pieces"] == len(dataset) - 1


def test_sft_spans_exact(run_prepare, gpt2):
    text = "User: what is 2+2?\nAssistant: 4.\nUser: thanks!\nAssistant: You're welcome."
    spans = [[0, 19], [33, 47]]
    output, _ = run_prepare([{"text": text, "loss_masking_spans": spans}, {"text": "no spans at all"}])
    dataset = GPTMemmapDataset(output)
    assert dataset.kind == "sft"
    sample = dataset[0]
    masked = [gpt2.decode(sample.token_ids[b:e]) for b, e in sample.loss_masking_spans]
    assert masked == [text[0:19], text[33:47]]
    assert gpt2.decode(sample.token_ids) == text + EOS
    segments = [text[0:19], text[19:33], text[33:47], text[47:]]
    expected = [i for segment in segments for i in gpt2.encode([segment])[0]] + [50256]
    assert sample.token_ids.tolist() == expected
    assert dataset[1].loss_masking_spans.shape == (0, 2)


def test_sft_masked_ending_masks_eos_and_bos_shifts(run_prepare, bos_tokenizer_dir):
    text = "trained part, masked part"
    output, _ = run_prepare(
        [{"text": text, "loss_masking_spans": [[13, 25]]}], tokenizer=str(bos_tokenizer_dir)
    )
    dataset = GPTMemmapDataset(output)
    decode = TextTokenizer(dataset.tokenizer_path).decode
    sample = dataset[0]
    ((begin, end),) = sample.loss_masking_spans.tolist()
    assert decode(sample.token_ids[:begin]) == "<s>" + text[:13]
    assert decode(sample.token_ids[begin:end]) == text[13:] + EOS and end == len(sample.token_ids)


@pytest.mark.parametrize("prompt_field", ["prompt", "text"])
def test_explicit_preference(run_prepare, gpt2, prompt_field):
    rows = [
        {prompt_field: "Q: capital of France?\nA:", "chosen": " Paris.", "rejected": " Lyon."},
        {prompt_field: "Say hi", "chosen": " hi", "rejected": " bye", "loss_masking_spans": [[0, 2]]},
    ]
    output, report = run_prepare(rows, mode="preference")
    dataset = GPTMemmapDataset(output)
    for index, row in enumerate(rows):
        sample = dataset[index]
        assert gpt2.decode(sample.prompt_ids) == row[prompt_field]
        assert gpt2.decode(sample.chosen_ids) == row["chosen"] + EOS
        assert gpt2.decode(sample.rejected_ids) == row["rejected"] + EOS
    assert report["ignored_loss_masking_spans"] == 1 and report["ignored_loss_masking_spans_rows"] == [1]


def test_preference_prompt_gets_bos(run_prepare, bos_tokenizer_dir):
    output, _ = run_prepare(
        [{"prompt": "Hi", "chosen": " a", "rejected": " b"}], tokenizer=str(bos_tokenizer_dir)
    )
    dataset = GPTMemmapDataset(output)
    assert dataset[0].prompt_ids[0] == dataset.bos_id and len(dataset[0].prompt_ids) == 2


def test_implicit_prompt_without_marker_cuts_before_space(run_prepare, gpt2):
    output, _ = run_prepare(
        [{"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Lyon."}]
    )
    sample = GPTMemmapDataset(output)[0]
    assert gpt2.decode(sample.prompt_ids) == "The capital of France is"
    assert gpt2.decode(sample.chosen_ids) == " Paris." + EOS


def test_max_length_truncates_pairs_and_drops_long_prompts(run_prepare, gpt2):
    rows = [
        {"prompt": "short prompt", "chosen": " one two three four five six", "rejected": " seven eight"},
        {"prompt": "a much longer prompt that does not fit at all", "chosen": " x", "rejected": " y"},
    ]
    output, report = run_prepare(rows, max_length=5)
    dataset = GPTMemmapDataset(output)
    sample = dataset[0]
    prompt_length = len(gpt2.encode(["short prompt"])[0])
    assert len(sample.prompt_ids) == prompt_length
    assert len(sample.chosen_ids) == len(sample.rejected_ids) == 5 - prompt_length
    assert sample.chosen_ids.tolist() == gpt2.encode([rows[0]["chosen"]])[0][: 5 - prompt_length]
    assert report["truncated_pairs"] == 1 and report["dropped"] == {"prompt_too_long": 1}
    assert report["dropped_examples"]["prompt_too_long"][0]["row"] == 1


def test_max_length_drops_long_sft(run_prepare):
    _, report = run_prepare(
        [{"text": "word " * 20, "loss_masking_spans": []}, {"text": "ok", "loss_masking_spans": []}],
        max_length=8,
    )
    assert report["documents"] == 1 and report["dropped"] == {"too_long": 1}


def test_bos_not_doubled_when_text_starts_with_it(run_prepare, bos_tokenizer_dir):
    output, _ = run_prepare(
        [{"text": "<s>already there"}, {"text": "plain"}], tokenizer=str(bos_tokenizer_dir)
    )
    dataset = GPTMemmapDataset(output)
    for index in range(2):
        token_ids = dataset[index].token_ids.tolist()
        assert token_ids[0] == dataset.bos_id and token_ids[1:].count(dataset.bos_id) == 0


def test_workers_with_dropped_and_truncated_rows(run_prepare):
    rows = [{"prompt": "p " * 30, "chosen": " x", "rejected": " y"}, "not json"]
    rows += [{"prompt": f"q{i}", "chosen": " a b c d e f", "rejected": " g"} for i in range(600)]
    one, report_one = run_prepare(rows, max_length=8, workers=1)
    two, report_two = run_prepare(rows, max_length=8, workers=2)
    assert report_one["dropped"] == report_two["dropped"] == {"prompt_too_long": 1, "unparsable_line": 1}
    assert report_one["truncated_pairs"] == report_two["truncated_pairs"] == 600
    for name in ("shard-00000.tokens", "shard-00000.index"):
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_duplicate_pairs_and_documents_are_counted(run_prepare):
    """Counted over every unit against a naive count of repeated rows; the summary says what happens to them."""
    pairs = [{"prompt": f"Q{k}", "chosen": " yes", "rejected": " no"} for k in range(6)]
    rows = pairs + pairs[:4] + [pairs[0]]  # 5 copies
    _, report = run_prepare(rows)
    naive = len(rows) - len({json.dumps(row, sort_keys=True) for row in rows})
    assert report["duplicate_documents"] == naive == 5
    assert "  5 pairs or groups are copies of an earlier one (same tokens)" in summary(report, "out")
    texts = [{"text": f"document {k % 3}"} for k in range(7)]
    _, report = run_prepare(texts)
    assert report["duplicate_documents"] == 4
    assert "  4 documents are copies" in summary(report, "out")


@pytest.mark.parametrize(
    "mode, message",
    [
        ("conversation", "conversation mode needs the field 'messages' (a list of {role, content} messages) or "
         "'chosen'/'rejected' as message lists; the first row has 'chosen' and 'rejected' as text"),
        ("groups", "groups mode needs a list of responses in the field 'completions' or 'responses' (with 'scores'), "
         "or 'rejected' as a list; the first row has none of them"),
    ],
)  # fmt: skip
def test_a_mode_on_data_without_its_fields_names_them(run_prepare, mode, message):
    with pytest.raises(UnitrainError) as error:
        run_prepare([{"prompt": "Q", "chosen": " yes", "rejected": " no"}], mode=mode)
    assert message in str(error.value)


def test_all_rows_dropped_names_the_field(run_prepare):
    with pytest.raises(UnitrainError, match=r"all 2 rows were dropped: missing_field \(2; field 'text'\)"):
        run_prepare([{"txt": "a"}, {"txt": "b"}], mode="text")
