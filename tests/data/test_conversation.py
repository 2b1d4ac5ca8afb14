"""Conversation schema: rendering matches transformers' apply_chat_template; loss only on assistant turns."""

from __future__ import annotations

import pytest

from unitrain.data.memmap.reader import GPTMemmapDataset

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
EOS = "<|endoftext|>"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    return path


def hf_render(gpt2_tokenizer_path, messages, add_generation_prompt):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(gpt2_tokenizer_path), eos_token=EOS)
    return tokenizer.apply_chat_template(
        messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def test_messages_sft_trains_only_assistant_turns(run_prepare, gpt2, template_file, gpt2_tokenizer_path):
    output, _ = run_prepare([{"messages": MESSAGES}], chat_template=str(template_file))
    dataset = GPTMemmapDataset(output)
    assert dataset.kind == "sft" and dataset.metadata["chat_template_sha256"]
    sample = dataset[0]
    assert gpt2.decode(sample.token_ids) == hf_render(gpt2_tokenizer_path, MESSAGES, False) + EOS
    trained, cursor = [], 0
    for begin, end in sample.loss_masking_spans.tolist():
        if begin > cursor:
            trained.append(gpt2.decode(sample.token_ids[cursor:begin]))
        cursor = end
    if cursor < len(sample.token_ids):
        trained.append(gpt2.decode(sample.token_ids[cursor:]))
    assert trained == ["Hello.<|im_end|>\n", "4<|im_end|>\n" + EOS]  # EOS joins the final, trained turn
    # the template the data was rendered with is the dataset's, so every export of a run carries it
    assert (output / "tokenizer" / "chat_template.jinja").read_text() == TEMPLATE


def test_message_preference_shared_prompt(run_prepare, gpt2, template_file, gpt2_tokenizer_path):
    chosen = MESSAGES[:4] + [{"role": "assistant", "content": "4"}]
    rejected = MESSAGES[:4] + [{"role": "assistant", "content": "5"}]
    explicit = {"prompt": MESSAGES[:4], "chosen": chosen[4:], "rejected": rejected[4:]}
    output, _ = run_prepare(
        [{"chosen": chosen, "rejected": rejected}, explicit], chat_template=str(template_file)
    )
    dataset = GPTMemmapDataset(output)
    assert dataset.kind == "preference"
    for index in range(2):
        sample = dataset[index]
        assert gpt2.decode(sample.prompt_ids) == hf_render(gpt2_tokenizer_path, MESSAGES[:4], True)
        assert gpt2.decode(sample.chosen_ids) == "4<|im_end|>\n" + EOS
        assert gpt2.decode(sample.rejected_ids) == "5<|im_end|>\n" + EOS


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "unknown_role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "bad_role_order"),
        ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "bad_role_order"),
        ([{"role": "user", "content": 3}], "bad_messages"),
        ("not a list", "bad_messages"),
    ],
)
def test_bad_conversations_are_dropped(run_prepare, template_file, messages, reason):
    _, report = run_prepare(
        [{"messages": MESSAGES}, {"messages": messages}], chat_template=str(template_file)
    )
    assert report["dropped"] == {reason: 1} and report["documents"] == 1


def test_missing_chat_template_is_one_clear_error(run_prepare):
    from unitrain.errors import UnitrainError

    with pytest.raises(UnitrainError, match="chat template"):
        run_prepare([{"messages": MESSAGES}])


def test_text_prompt_beside_message_lists(run_prepare, gpt2, template_file, gpt2_tokenizer_path):
    """UltraFeedback style (whole conversations + a copy of the first user turn as a string) and responses-only
    lists with a string prompt both give the prompt of the conversation, rendered once."""
    user = {"role": "user", "content": "2+2?"}
    whole = {
        "prompt": "2+2?",
        "chosen": [user, {"role": "assistant", "content": "4"}],
        "rejected": [user, {"role": "assistant", "content": "5"}],
    }
    responses_only = {
        "prompt": "2+2?",
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    output, report = run_prepare(
        [whole, responses_only], mode="conversation", chat_template=str(template_file)
    )
    assert report["documents"] == 2 and report["dropped"] == {}
    dataset = GPTMemmapDataset(output)
    for index in range(2):
        sample = dataset[index]
        assert gpt2.decode(sample.prompt_ids) == hf_render(gpt2_tokenizer_path, [user], True)
        assert gpt2.decode(sample.chosen_ids) == "4<|im_end|>\n" + EOS
        assert gpt2.decode(sample.rejected_ids) == "5<|im_end|>\n" + EOS


def test_a_template_error_drops_the_row_not_the_run(run_prepare, tmp_path):
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + TEMPLATE
    )
    without_system = {"messages": MESSAGES[1:]}
    _, report = run_prepare([{"messages": MESSAGES}, without_system], chat_template=str(strict))
    assert report["documents"] == 1 and report["dropped"] == {"template_error": 1}
    assert "System role not supported" in report["dropped_examples"]["template_error"][0]["message"]
