"""`prepare --chat`: HH-style "Human:/Assistant:" text and plain prompts become chat messages rendered with the
template (checked against transformers' apply_chat_template on the shared HH file); plain-text rows given with a
chat template are warned about once."""

from __future__ import annotations

import gzip
import json

import pytest

from unitrain.cli import main
from unitrain.data.memmap import GPTMemmapDataset

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
EOS = "<|endoftext|>"
ROWS = 24


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def hh_rows(hh_rlhf_path) -> list[dict]:
    with gzip.open(hh_rlhf_path, "rt") as source:
        return [json.loads(next(source)) for _ in range(ROWS)]


def hf_render(gpt2_tokenizer_path, messages, add_generation_prompt) -> str:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(gpt2_tokenizer_path), eos_token=EOS)
    return tokenizer.apply_chat_template(
        messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def test_hh_dialogues_become_chat_turns(run_prepare, gpt2, hh_rows, template_file, gpt2_tokenizer_path):
    output, report = run_prepare(hh_rows, chat_template=str(template_file), chat=True)
    dataset = GPTMemmapDataset(output)
    assert dataset.kind == "preference" and report["schema"] == "conversation"
    assert report["documents"] == ROWS - sum(report["dropped"].values()) and report["documents"] >= ROWS - 2
    first = [  # the first HH row, read by hand
        {"role": "user", "content": "what are some pranks with a pen i can do?"},
        {"role": "assistant", "content": "Are you looking for practical joke ideas?"},
        {"role": "user", "content": "yep"},
    ]
    prompt = gpt2.decode(dataset[0].prompt_ids)
    assert prompt.startswith(hf_render(gpt2_tokenizer_path, first, False))
    assert prompt.endswith("<|im_start|>user\nokay some of these do not have anything to do with pens<|im_end|>\n"
                           "<|im_start|>assistant\n")  # fmt: skip
    kept = [row for number, row in enumerate(hh_rows) if number not in _dropped_rows(report)]
    for index, row in enumerate(kept):
        sample = dataset[index]
        prompt = gpt2.decode(sample.prompt_ids)
        assert prompt.count("<|im_start|>user\n") == row["chosen"].count("\n\nHuman:")
        for ids, text in ((sample.chosen_ids, row["chosen"]), (sample.rejected_ids, row["rejected"])):
            last = text[text.rfind("\n\nAssistant:") + len("\n\nAssistant:") :].strip()
            assert gpt2.decode(ids) == f"{last}<|im_end|>\n{EOS}"


def _dropped_rows(report: dict) -> set[int]:
    return {example["row"] for examples in report["dropped_examples"].values() for example in examples}


def test_plain_prompts_and_hh_prompts_become_turns(run_prepare, gpt2, template_file, gpt2_tokenizer_path):
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "\n\nHuman: Hi!\n\nAssistant:", "chosen": " Hello.", "rejected": " Go away."},
    ]
    output, _ = run_prepare(rows, chat_template=str(template_file), chat=True)
    dataset = GPTMemmapDataset(output)
    for index, (user, chosen) in enumerate([("What is 2+2?", "4"), ("Hi!", "Hello.")]):
        sample = dataset[index]
        expected = hf_render(gpt2_tokenizer_path, [{"role": "user", "content": user}], True)
        assert gpt2.decode(sample.prompt_ids) == expected
        assert gpt2.decode(sample.chosen_ids) == f"{chosen}<|im_end|>\n{EOS}"


def test_hh_text_becomes_a_conversation_trained_on_assistant_turns(run_prepare, gpt2, template_file):
    rows = [
        {"text": "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: 2+2?\n\nAssistant: 4"},
        {"text": "no turns"},
    ]
    output, report = run_prepare(rows, chat_template=str(template_file), chat=True, mode="text")
    dataset = GPTMemmapDataset(output)
    assert dataset.kind == "sft" and report["dropped"] == {"no_assistant_turn": 1}
    sample = dataset[0]
    trained, cursor = [], 0
    for begin, end in sample.loss_masking_spans.tolist():
        if begin > cursor:
            trained.append(gpt2.decode(sample.token_ids[cursor:begin]))
        cursor = end
    trained.append(gpt2.decode(sample.token_ids[cursor:]))
    assert trained == ["Hello.<|im_end|>\n", f"4<|im_end|>\n{EOS}"]


def test_plain_rows_with_a_chat_template_are_warned_about_once(
    hh_rows, template_file, gpt2_tokenizer_path, tmp_path, capsys
):
    source = tmp_path / "hh.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in hh_rows))
    common = ["prepare", "--input", str(source), "--tokenizer", str(gpt2_tokenizer_path), "--no-progress"]
    assert main([*common, "--chat-template", str(template_file), "--output", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().err.count("has a chat template but the rows are plain text") == 1
    assert (
        main([*common, "--chat-template", str(template_file), "--chat", "--output", str(tmp_path / "b")]) == 0
    )
    assert "plain text" not in capsys.readouterr().err
    assert main([*common, "--output", str(tmp_path / "c")]) == 0  # no template: nothing to say
    assert "plain text" not in capsys.readouterr().err
    assert GPTMemmapDataset(tmp_path / "b").metadata["chat_template_sha256"]


def test_chat_refuses_rows_it_cannot_convert(run_prepare, template_file):
    from unitrain.errors import UnitrainError

    rows = [{"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 0.0]}]
    with pytest.raises(
        UnitrainError, match="--chat turns text and preference rows into messages, not groups"
    ):
        run_prepare(rows, chat_template=str(template_file), chat=True)
