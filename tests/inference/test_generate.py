"""`unitrain generate` decodes what transformers' (and peft's) own models decode, token for token, for a
checkpoint, an adapter and a training run; sampling is reproducible with a seed."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from unitrain.cli import main

from .conftest import EOS, transformers_greedy

PROMPTS = ["Hello there, how", "The cat sat on the", "Why"]
NEW = 12


def generate(tmp_path, *args) -> list[dict]:
    output = tmp_path / "out.jsonl"
    argv = ["generate", *args, "--max-new-tokens", str(NEW), "--batch-size", "2", "--output", str(output)]
    assert main(argv) == 0
    return [json.loads(line) for line in output.read_text().splitlines()]


def prompt_ids(gpt2_tokenizer_path) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(gpt2_tokenizer_path))
    return [tokenizer.encode(text, add_special_tokens=False).ids for text in PROMPTS]


def test_a_checkpoint_decodes_as_transformers_does(tiny_checkpoint, gpt2_tokenizer_path, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    argv = [arg for text in PROMPTS for arg in ("--prompt", text)]
    rows = generate(tmp_path, "--model", str(tiny_checkpoint), *argv)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    expected = transformers_greedy(model, prompt_ids(gpt2_tokenizer_path), NEW)
    assert [row["model_ids"] for row in rows] == expected
    assert [row["prompt"] for row in rows] == PROMPTS
    for row, ids in zip(rows, expected):
        assert row["model_finish"] == ("eos" if EOS in ids else "length")
    printed = capsys.readouterr().out
    assert PROMPTS[1] in printed and rows[1]["model"] in printed


def test_an_adapter_decodes_as_peft_does_and_its_reference_is_the_base(
    tiny_checkpoint, gpt2_tokenizer_path, tmp_path
):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    torch.manual_seed(1)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    adapter_config = tmp_path / "adapter" / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    adapter_config.write_text(json.dumps({**settings, "base_model_name_or_path": str(tiny_checkpoint)}))

    argv = [arg for text in PROMPTS for arg in ("--prompt", text)]
    rows = generate(tmp_path, "--model", str(tmp_path / "adapter"), "--reference", *argv)
    ids = prompt_ids(gpt2_tokenizer_path)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    assert [row["reference_ids"] for row in rows] == transformers_greedy(fresh, ids, NEW)
    twin = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    expected = transformers_greedy(twin, ids, NEW)
    assert [row["model_ids"] for row in rows] == expected
    assert [row["model_ids"] for row in rows] != [row["reference_ids"] for row in rows]


@pytest.fixture(scope="module")
def lora_run(tiny_checkpoint, hh_pairs, tmp_path_factory):
    """Two LoRA DPO steps on 16 HH-RLHF pairs from the tiny checkpoint, a quarter of them held out."""
    from unitrain.config import config_to_yaml, parse_config

    root = tmp_path_factory.mktemp("lora-run")
    config = parse_config(
        {
            "objective": "dpo",
            "model": {"path": str(tiny_checkpoint)},
            "lora": {"rank": 4, "alpha": 8},
            "data": {"train": str(hh_pairs), "validation": 0.25},
            "packing": {"sequence_length": 256},
            "batch": {"micro_batch_size": 2, "gradient_accumulation_steps": 1},
            "optimizer": {"lr": 0.05},
            "train": {"max_steps": 2, "seed": 0, "device": "cpu"},
            "run": {"output_dir": str(root / "run"), "progress": False, "tensorboard": False},
        }
    )
    (root / "config.yaml").write_text(config_to_yaml(config))
    assert main(["train", str(root / "config.yaml")]) == 0
    return root


def test_a_run_decodes_its_held_out_prompts_as_its_export_does(lora_run, hh_pairs, tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from unitrain.data.memmap import GPTMemmapDataset
    from unitrain.train.data import held_out_indices

    run = lora_run / "run"
    rows = generate(tmp_path, "--model", str(run), "--held-out", str(run), "--limit", "3", "--reference")
    dataset = GPTMemmapDataset(hh_pairs)
    indices = held_out_indices(run, dataset)[:3].tolist()
    assert [row["index"] for row in rows] == indices
    prompts = [dataset[index].prompt_ids.tolist() for index in indices]
    assert main(["export", str(run), "--merge", "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert [row["model_ids"] for row in rows] == transformers_greedy(merged, prompts, NEW)
    start = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    assert [row["reference_ids"] for row in rows] == transformers_greedy(start, prompts, NEW)
    assert all(row["chosen"] for row in rows)


def test_sampling_is_reproducible_with_a_seed(tiny_checkpoint, tmp_path):
    argv = [
        "--model",
        str(tiny_checkpoint),
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[1],
        "--temperature",
        "1.5",
    ]
    state = torch.get_rng_state()
    first = generate(tmp_path, *argv, "--seed", "3")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left alone
    again = generate(tmp_path, *argv, "--seed", "3")
    other = generate(tmp_path, *argv, "--seed", "4")
    greedy = generate(
        tmp_path, "--model", str(tiny_checkpoint), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]
    )
    ids = lambda rows: [row["model_ids"] for row in rows]  # noqa: E731
    assert ids(first) == ids(again)
    assert ids(first) != ids(other) and ids(first) != ids(greedy)


def test_bad_requests_are_one_line(tiny_checkpoint, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint)]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "a"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "a", "--reference"]) == 2
    assert "plain checkpoint" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompts", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: expected a string" in capsys.readouterr().err


def test_a_lora_model_goes_to_transformers_with_its_adapters_folded_in(tiny_checkpoint):
    from unitrain.model import from_pretrained
    from unitrain.model.generate import to_transformers
    from unitrain.model.lora import adapter_state_dict, apply_lora

    model = from_pretrained(tiny_checkpoint)
    apply_lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj", "up_proj"], seed=1)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.normal_(0.0, 0.1)  # B is zero at init: make every adapter count
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    input_ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        expected = model(input_ids)
        torch.testing.assert_close(to_transformers(model)(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
