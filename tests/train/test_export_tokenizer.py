"""Every export carries the data's complete tokenizer: its chat template and special-token map come out of the
run's `hf/`, `unitrain export`, `export --merge` and the PEFT adapter directory, and transformers'
`apply_chat_template` works on each."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unitrain.cli import main
from unitrain.data.memmap.writer import DatasetWriter
from unitrain.data.sample import GPTSample
from unitrain.train import train

from .conftest import VOCAB

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant", "hello", "hi"]
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
RENDERED = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"


def chat_tokenizer(directory, template_in_config: bool):
    """A ChatML-style tokenizer of VOCAB ids: tokenizer.json, tokenizer_config.json naming BOS/EOS/PAD, and the
    template as chat_template.jinja or inside tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    vocab.update({f"w{index}": index for index in range(len(vocab), VOCAB)})
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in SPECIALS])
    directory.mkdir(parents=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
    }
    if template_in_config:
        config["chat_template"] = TEMPLATE
    else:
        (directory / "chat_template.jinja").write_text(TEMPLATE)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return sorted(directory.iterdir())


@pytest.fixture(scope="module", params=["jinja", "config"])
def chat_data(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"chat-{request.param}")
    files = chat_tokenizer(root / "tokenizer", template_in_config=request.param == "config")
    rng = np.random.default_rng(0)
    writer = DatasetWriter(root / "data", "pretraining", vocab_size=VOCAB, eos_id=2, tokenizer_files=files)
    with writer:
        for _ in range(16):
            writer.add(GPTSample(np.concatenate([[1], rng.integers(3, VOCAB, size=12), [2]])))
    return root / "data"


def check_tokenizer(directory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.chat_template == TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == RENDERED
    ids = tokenizer.apply_chat_template(
        MESSAGES[:1], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert list(ids) == [1, 4, 6, 2, 1, 5]  # <|im_start|> user hello <|im_end|> <|im_start|> assistant


@pytest.mark.parametrize("lora", [None, {"rank": 4}], ids=["full", "lora"])
def test_every_export_carries_the_chat_template_and_special_tokens(chat_data, lora, tmp_path, tiny_config):
    run = tmp_path / "run"
    settings = {"data": {"validation": None}, "train": {"max_steps": 2}}
    train(tiny_config("pretrain", chat_data, run, lora=lora or {}, **settings))
    exports = {"run/hf": run / "hf", "export": tmp_path / "exported"}
    assert main(["export", str(run), "--output", str(tmp_path / "exported")]) == 0
    if lora:
        assert (run / "hf" / "adapter_config.json").is_file()  # the PEFT adapter directory
        assert main(["export", str(run), "--output", str(tmp_path / "merged"), "--merge"]) == 0
        exports["export --merge"] = tmp_path / "merged"
    for directory in exports.values():
        check_tokenizer(directory)
