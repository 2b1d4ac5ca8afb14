"""Real chat templates on tokenizers whose end of turn is a special token: a response ends with exactly one end
token (ChatML's newline after `<|im_end|>` is neither a target nor kept; no EOS behind Llama-3's `<|eot_id|>`),
compared with transformers' `apply_chat_template` on the same tokenizer; and the tokenization checks counted in
the prepare report (a merge across the prompt/response boundary, a doubled BOS, a response without an end token)."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers

from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.prepare.pipeline import summary
from unitrain.errors import UnitrainError

CHATML = (  # SmolLM2's template without its default system turn
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (  # Meta-Llama-3-8B-Instruct's template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
STYLES = {  # special tokens added to GPT-2, tokenizer_config.json, template, end of turn
    # SmolLM2: BOS <|im_start|>, EOS = the end of turn <|im_end|>
    "chatml": (
        ["<|im_start|>", "<|im_end|>"],
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
        CHATML,
    ),
    # a Llama-3 base tokenizer: EOS <|end_of_text|> is not the template's end of turn <|eot_id|>
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        LLAMA3,
    ),
}
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module", params=list(STYLES))
def chat(request, tmp_path_factory, gpt2_tokenizer_path):
    """(style, tokenizer directory, transformers' tokenizer of it)."""
    from transformers import AutoTokenizer

    specials, config, template = STYLES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    tokenizer = Tokenizer.from_file(str(gpt2_tokenizer_path))
    if (
        request.param == "llama3"
    ):  # Llama-3's pre-tokenizer: a run of newlines is one piece, as in its tokenizer
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in specials])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config})
    )
    (directory / "chat_template.jinja").write_text(template)
    return request.param, directory, AutoTokenizer.from_pretrained(directory)


def hf_ids(hf, messages, add_generation_prompt=False) -> list[int]:
    ids = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return list(ids)


def test_a_conversation_ends_each_turn_with_one_end_token(run_prepare, chat):
    style, directory, hf = chat
    output, report = run_prepare([{"messages": MESSAGES}], tokenizer=str(directory))
    sample = GPTMemmapDataset(output)[0]
    expected = hf_ids(hf, MESSAGES)  # transformers' own rendering and tokenization
    if style == "chatml":
        assert hf.decode(expected[-2:]) == "<|im_end|>\n"
        expected = expected[:-1]  # the newline after the last end of turn is not kept
    assert sample.token_ids.tolist() == expected
    trained, cursor = [], 0
    for begin, stop in sample.loss_masking_spans.tolist():
        trained += [sample.token_ids[cursor:begin].tolist()] if begin > cursor else []
        cursor = stop
    trained += [sample.token_ids[cursor:].tolist()] if cursor < len(sample.token_ids) else []
    assert [hf.decode(ids) for ids in trained] == [f"Hello.{END[style]}", f"4{END[style]}"]
    assert report.get("tokenization_warnings", {}) == {}


def test_a_preference_response_ends_with_one_end_token(run_prepare, chat):
    style, directory, hf = chat
    chosen, rejected = (
        MESSAGES[:4] + [{"role": "assistant", "content": "4"}],
        MESSAGES[:4] + [{"role": "assistant", "content": "5"}],
    )
    output, report = run_prepare([{"chosen": chosen, "rejected": rejected}], tokenizer=str(directory))
    sample = GPTMemmapDataset(output)[0]
    assert sample.prompt_ids.tolist() == hf_ids(hf, MESSAGES[:4], add_generation_prompt=True)
    end = hf.convert_tokens_to_ids(END[style])
    for ids, text in ((sample.chosen_ids, "4"), (sample.rejected_ids, "5")):
        assert hf.decode(ids) == text + END[style]
        assert ids.tolist().count(end) == 1 and ids[-1] == end  # ids 2, 198, 2 before (SmolLM2)
    assert hf.eos_token_id not in sample.chosen_ids.tolist()[:-1]
    assert report.get("tokenization_warnings", {}) == {}


def test_a_merge_across_the_prompt_boundary_is_counted_and_fails_on_request(run_prepare, gpt2):
    """ "Say hi " + "there": alone, the space is its own token; together, " there" is one."""
    merged = {"prompt": "Say hi ", "chosen": "there", "rejected": " you"}
    clean = {"prompt": "Say hi", "chosen": " there", "rejected": " you"}
    assert gpt2.encode(["Say hi there"])[0] != sum(gpt2.encode(["Say hi ", "there"]), [])  # independent
    output, report = run_prepare([clean, merged, clean])
    assert report["tokenization_warnings"] == {"boundary_merge": 1} and report["documents"] == 3
    assert [(e["row"], e["field"]) for e in report["tokenization_warning_examples"]] == [(1, "chosen")]
    assert "boundary_merge" in summary(report, "out") and "kept" in summary(report, "out")
    with pytest.raises(UnitrainError, match=r"row 1, field 'chosen': tokens differ .* \(boundary_merge\)"):
        run_prepare([clean, merged], on_error="fail")


def test_a_doubled_bos_and_a_response_without_end_token_are_counted(run_prepare, chat):
    style, directory, hf = chat
    bos = STYLES[style][1]["bos_token"]
    rows = [{"text": f"{bos}{bos}twice"}, {"text": f"{bos}once"}]
    _, report = run_prepare(rows, tokenizer=str(directory), mode="text")
    assert report["tokenization_warnings"] == {"doubled_bos": 1}
    long = {"prompt": "Q", "chosen": " a b c d e f g h", "rejected": " no"}
    _, report = run_prepare([long, {"prompt": "Q", "chosen": " a", "rejected": " b"}], max_length=6)
    assert report["tokenization_warnings"] == {"response_without_end_token": 1}
    assert report["tokenization_warning_examples"][0]["field"] == "chosen"
    with pytest.raises(UnitrainError, match=r"row 0, field 'chosen': .*\(response_without_end_token\)"):
        run_prepare([long], max_length=6, on_error="fail")
