"""prepare for preference groups: every input shape gives the prompt once and each response tokenized alone, with
its score; bad groups are counted skips; `--max-length` truncates responses as for pairs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tokenizers import Tokenizer

from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.prepare.pipeline import summary

from .test_conversation import MESSAGES, hf_render, template_file  # noqa: F401 (fixture)

EOS = "<|endoftext|>"
PROMPT = "Name a colour."
ANSWERS = [" Red.", " Blue, the colour of the sky.", " I like turtles.", " Green."]
SCORES = [8.5, 9.0, 2.0, 8.5]


def ultrafeedback_row(**change) -> dict:
    """UltraFeedback's shape: completions with a `response` and an `overall_score` (and fields we ignore)."""
    completions = [
        {"model": f"m{k}", "response": text, "overall_score": score, "annotations": {}}
        for k, (text, score) in enumerate(zip(ANSWERS, SCORES))
    ]
    return {"source": "x", "prompt": PROMPT, "completions": completions, **change}


def raw(gpt2_tokenizer_path, text: str) -> list[int]:
    return Tokenizer.from_file(str(gpt2_tokenizer_path)).encode(text, add_special_tokens=False).ids


def check_group(sample, gpt2_tokenizer_path, prompt: str, answers: list[str], scores: list[float]) -> None:
    assert sample.is_group and sample.prompt_ids.tolist() == raw(gpt2_tokenizer_path, prompt)
    got = [sample.response_ids(k).tolist() for k in range(len(sample.scores))]
    assert got == [raw(gpt2_tokenizer_path, answer) + [50256] for answer in answers]
    assert sample.scores.tolist() == scores


SHAPES = {
    "completions": ultrafeedback_row(),
    "responses": {"prompt": PROMPT, "responses": ANSWERS, "scores": SCORES},
    "rejected_list": {"prompt": PROMPT, "chosen": ANSWERS[1], "rejected": [ANSWERS[0], ANSWERS[2]]},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_text_shape_is_detected_and_stored_once(run_prepare, gpt2_tokenizer_path, shape):
    output, report = run_prepare([SHAPES[shape]] * 2)
    dataset = GPTMemmapDataset(output)
    assert report["schema"] == "groups" and dataset.kind == "preference" and len(dataset) == 2
    assert dataset.metadata["format_version"] == 2
    if shape == "rejected_list":
        check_group(dataset[0], gpt2_tokenizer_path, PROMPT, [ANSWERS[1], ANSWERS[0], ANSWERS[2]], [1, 0, 0])
    else:
        check_group(dataset[0], gpt2_tokenizer_path, PROMPT, ANSWERS, SCORES)


def test_field_names_of_completions_are_configurable(run_prepare, gpt2_tokenizer_path):
    row = {
        "question": PROMPT,
        "outputs": [{"text": a, "rating": s} for a, s in zip(ANSWERS[:2], (1, 3))],
    }
    fields = {
        "prompt": "question",
        "completions": "outputs",
        "completion_text": "text",
        "completion_score": "rating",
    }
    output, _ = run_prepare([row], fields=fields, mode="groups")
    check_group(GPTMemmapDataset(output)[0], gpt2_tokenizer_path, PROMPT, ANSWERS[:2], [1.0, 3.0])


def test_message_groups_render_the_shared_prompt_once(run_prepare, gpt2, template_file, gpt2_tokenizer_path):  # noqa: F811
    history = MESSAGES[:4]
    answers = [[{"role": "assistant", "content": text}] for text in ("4", "5", "four")]
    rows = [
        {"prompt": history, "responses": answers, "scores": [3, 1, 2]},
        {"chosen": history + answers[0], "rejected": [history + answers[1], history + answers[2]]},
    ]
    output, report = run_prepare(rows, chat_template=str(template_file))
    assert report["schema"] == "groups" and report["documents"] == 2
    prompt = hf_render(gpt2_tokenizer_path, history, True)
    for sample, scores in zip(GPTMemmapDataset(output), ([3, 1, 2], [1, 0, 0])):
        assert gpt2.decode(sample.prompt_ids) == prompt and sample.scores.tolist() == scores
        for k, answer in enumerate(answers):
            whole = hf_render(gpt2_tokenizer_path, history + answer, False)
            assert gpt2.decode(sample.response_ids(k)) == whole[len(prompt) :] + EOS


BAD_GROUPS = [
    ({"prompt": "p", "responses": [" a", " b"]}, "missing_field", "scores"),
    ({"prompt": "p", "responses": [" a", " b"], "scores": [1]}, "scores_mismatch", "scores"),
    ({"prompt": "p", "responses": [" a", " b"], "scores": [1, "2"]}, "bad_score", "scores"),
    ({"prompt": "p", "responses": [" a", " b"], "scores": [1, math.nan]}, "bad_score", "scores"),
    ({"prompt": "p", "responses": [" a", " b"], "scores": [1, True]}, "bad_score", "scores"),
    ({"prompt": "p", "responses": [" a", None, ""], "scores": [1, 2, 3]}, "too_few_responses", "responses"),
    ({"prompt": "p", "responses": [" a", " a"], "scores": [1, 2]}, "too_few_responses", "responses"),
    ({"prompt": "p", "responses": [" a", " b", " c"], "scores": [2, 2, 2]}, "equal_scores", "scores"),
    (
        {"prompt": "p", "responses": [" a", [{"role": "assistant", "content": "b"}]], "scores": [1, 2]},
        "mixed_responses",
        "responses",
    ),  # fmt: skip
    (
        {"prompt": "p", "completions": [{"response": " a", "overall_score": 1}, "b"]},
        "bad_completions",
        "completions",
    ),  # fmt: skip
    # found only once tokenized: the skip names the field the row's responses and scores came from
    (
        {"prompt": "p", "completions": [{"response": " a", "overall_score": s} for s in (1, 2)]},
        "too_few_responses",
        "completions",
    ),  # fmt: skip
    (
        {"prompt": "p", "completions": [{"response": r, "overall_score": 3} for r in (" a", " b")]},
        "equal_scores",
        "completions",
    ),  # fmt: skip
    ({"prompt": "p", "chosen": " a", "rejected": [" a"]}, "too_few_responses", "rejected"),
]


@pytest.mark.parametrize(
    ("bad", "reason", "field"), BAD_GROUPS, ids=[f"{c[1]}-{k}" for k, c in enumerate(BAD_GROUPS)]
)
def test_bad_groups_are_counted_skips(run_prepare, bad, reason, field):
    good = {"prompt": "p", "responses": [" a", " b"], "scores": [1, 2]}
    output, report = run_prepare([good, bad, good], mode="groups")
    assert report["documents"] == 2 and report["dropped"] == {reason: 1}
    example = report["dropped_examples"][reason][0]
    assert (example["row"], example["field"]) == (1, field)
    assert f"dropped 1 × {reason} (field '{field}'; first rows: 1)" in summary(report, str(output))


def test_duplicates_and_empty_responses_are_left_out_and_counted(run_prepare, gpt2_tokenizer_path):
    row = {
        "prompt": PROMPT,
        "responses": [ANSWERS[0], "", ANSWERS[1], ANSWERS[0], None],
        "scores": [5, 1, 4, 9, 2],
    }
    output, report = run_prepare([row])
    check_group(GPTMemmapDataset(output)[0], gpt2_tokenizer_path, PROMPT, ANSWERS[:2], [5, 4])
    assert report["duplicate_responses"] == 1 and report["skipped_responses"] == 2
    text = summary(report, str(output))
    assert "left out 1 duplicate responses" in text and "left out 2 null or empty responses" in text


def test_max_length_truncates_every_response_to_the_room_left(run_prepare, gpt2_tokenizer_path):
    prompt = raw(gpt2_tokenizer_path, PROMPT)
    limit = len(prompt) + 4
    output, report = run_prepare([ultrafeedback_row()], max_length=limit)
    sample = GPTMemmapDataset(output)[0]
    full = [raw(gpt2_tokenizer_path, a) + [50256] for a in ANSWERS]
    assert [sample.response_ids(k).tolist() for k in range(4)] == [ids[:4] for ids in full]
    assert (
        report["truncated_groups"] == 1 and len(prompt) + int(np.diff(sample.response_spans).max()) <= limit
    )
    _, report = run_prepare([ultrafeedback_row(), ultrafeedback_row(prompt="long " * 50)], max_length=limit)
    assert report["dropped"] == {"prompt_too_long": 1}


def test_ultrafeedback_rows_as_written_by_json(run_prepare, tmp_path, gpt2_tokenizer_path):
    """A JSON-lines file as UltraFeedback ships it (nested objects), read with --mode auto."""
    lines = [json.dumps(ultrafeedback_row(prompt=f"Question {k}?")) for k in range(5)]
    output, report = run_prepare(lines)
    assert report["documents"] == 5 and report["dropped"] == {}
    assert GPTMemmapDataset(output)[4].scores.tolist() == SCORES


def test_inspect_shows_every_response_with_its_score(run_prepare, capsys):
    from unitrain.cli import main

    output, _ = run_prepare([SHAPES["responses"]])
    assert main(["inspect", str(output)]) == 0
    text = capsys.readouterr().out
    assert "--- prompt (4 tokens)\nName a colour." in text
    assert "--- response 2, score 2 (5 tokens)\n I like turtles.<|endoftext|>" in text
    assert main(["inspect", str(output), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["responses"][1] == ANSWERS[1] + EOS and record["scores"] == SCORES


def test_a_dropped_group_adds_nothing_to_the_counters_of_kept_groups(run_prepare):
    good = {"prompt": "p", "responses": [" a", " b"], "scores": [1, 2]}
    long = " a long answer"  # truncated by max_length, which the good rows fit
    dropped = {"prompt": "p", "responses": [long, long, None, long], "scores": [1, 2, 3, 4]}
    output, report = run_prepare([good, dropped, good], mode="groups", max_length=3)
    assert report["documents"] == 2 and report["dropped"] == {"too_few_responses": 1}
    assert report["duplicate_responses"] == 0 and report["skipped_responses"] == 0
    assert report["truncated_groups"] == 0
    assert "duplicate responses" not in summary(report, str(output))
