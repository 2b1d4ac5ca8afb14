"""End to end through the CLI on real data: prepare a slice of HH-RLHF, DPO-train a tiny random Llama, export,
plot; SFT and pretraining on the same slice. Learning is checked, not just that the commands run."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from unitrain.cli import main
from unitrain.config import config_to_yaml
from unitrain.data.batches.stream import iterate_batches
from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.model import from_pretrained
from unitrain.model.adapter import load_model
from unitrain.train.logs.metrics import read_metrics
from unitrain.train.step.reference import pair_logps_of

TINY_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def hh_slice(hh_rlhf_path, gpt2_tokenizer_path, tmp_path_factory):
    """The first 64 HH-RLHF rows prepared as preference pairs and as plain text (the chosen dialogues)."""
    root = tmp_path_factory.mktemp("hh")
    with gzip.open(hh_rlhf_path, "rt") as source:
        (root / "slice.jsonl").write_text("".join(next(source) for _ in range(64)))
    common = [
        "--input",
        str(root / "slice.jsonl"),
        "--tokenizer",
        str(gpt2_tokenizer_path),
        "--max-length",
        "128",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert main(["prepare", *common, "--mode", "preference", "--output", str(root / "pairs")]) == 0
    assert (
        main(["prepare", *common, "--mode", "text", "--field", "text=chosen", "--output", str(root / "text")])
        == 0
    )
    return root


def run_cli(tmp_path, tiny_config, objective, data, steps, sequence_length=512, name=None, **sections):
    """Train through the CLI into `tmp_path / name` (default: the objective); `sections` override the defaults."""
    defaults = dict(
        model={"config": TINY_MODEL},
        data={"train": str(data), "validation": None},
        packing={"sequence_length": sequence_length},
        batch={"micro_batch_size": 1, "gradient_accumulation_steps": 1},
        optimizer={"lr": 1e-2, "weight_decay": 0.0},
        schedule={"kind": "constant", "warmup_steps": 2},
        train={"max_steps": steps},
    )
    name = name or objective
    config = tiny_config(objective, data, tmp_path / name, **{**defaults, **sections})
    path = tmp_path / f"{name}.yaml"
    path.write_text(config_to_yaml(config))
    assert main(["train", str(path)]) == 0
    return read_metrics(tmp_path / name / "metrics.jsonl")


def training_pair_accuracy(run_dir, dataset_dir, reference_dir=None) -> float:
    """Implicit-reward accuracy of the exported policy (a checkpoint or a LoRA adapter) against its starting point
    (`reference_dir`, default the run's `initial/`) on every training pair."""
    policy = load_model(run_dir / "hf")
    reference = load_model(reference_dir or run_dir / "initial")
    dataset = GPTMemmapDataset(dataset_dir)
    correct = total = 0
    batches = iterate_batches(
        dataset,
        np.arange(len(dataset)),
        objective="dpo",
        mode="pair",
        share_prompt=True,
        sequence_length=512,
        micro_batch_size=8,
    )
    with torch.no_grad():
        for batch in batches:
            ratios = pair_logps_of(policy, batch)[0] - pair_logps_of(reference, batch)[0]  # (P, 2)
            correct += int((ratios[:, 0] > ratios[:, 1]).sum())
            total += batch.num_pairs
    assert total == len(dataset)
    return correct / total


def test_dpo_on_hh_rlhf_learns_then_exports_and_plots(hh_slice, tmp_path, tiny_config):
    rows = run_cli(tmp_path, tiny_config, "dpo", hh_slice / "pairs", steps=30)
    losses = [row["loss"] for row in rows if "loss" in row]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    steps = [row for row in rows if "loss" in row]  # the last row holds the peak memory per phase
    assert np.mean([row["rewards/accuracies"] for row in steps[-5:]]) > 0.8
    assert training_pair_accuracy(tmp_path / "dpo", hh_slice / "pairs") > 0.8  # chance is 0.5

    # export: transformers loads weights and tokenizer, and computes the logits our model computes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["export", str(tmp_path / "dpo"), "--output", str(tmp_path / "exported")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported")
    ids = torch.tensor([tokenizer("\n\nHuman: How do I bake bread?\n\nAssistant:")["input_ids"]])  # (1, L)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            hf_model(ids).logits, from_pretrained(tmp_path / "dpo" / "hf")(ids), rtol=1e-4, atol=1e-4
        )

    assert main(["plot", str(tmp_path / "dpo")]) == 0
    assert (tmp_path / "dpo" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("objective, data", [("sft", "pairs"), ("pretrain", "text")])
def test_sft_and_pretraining_on_hh_rlhf_lower_the_loss(objective, data, hh_slice, tmp_path, tiny_config):
    rows = run_cli(tmp_path, tiny_config, objective, hh_slice / data, steps=15, sequence_length=256)
    losses = [row["loss"] for row in rows if "loss" in row]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5


# LoRA learns less per step than full training on a random, frozen base: a wider model and rank 16
LORA_MODEL = {
    **TINY_MODEL,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
LORA = {"rank": 16, "alpha": 32.0}


def test_lora_dpo_on_hh_rlhf_learns_and_its_exports_load_in_peft_and_transformers(
    hh_slice, tmp_path, tiny_config
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = {"config": LORA_MODEL}
    rows = run_cli(tmp_path, tiny_config, "dpo", hh_slice / "pairs", steps=30, model=model, lora=LORA)
    steps = [row for row in rows if "loss" in row]  # the last row holds the peak memory per phase
    losses, accuracies = [row["loss"] for row in steps], [row["rewards/accuracies"] for row in steps]
    assert np.mean(losses[-8:]) < np.mean(losses[:10]) - 0.05  # about an epoch each (rows of ~4 pairs)
    assert np.mean(accuracies[-8:]) > np.mean(accuracies[:10]) + 0.2
    assert training_pair_accuracy(tmp_path / "dpo", hh_slice / "pairs") > 0.75  # chance is 0.5

    run = tmp_path / "dpo"
    assert main(["export", str(run), "--output", str(tmp_path / "merged"), "--merge"]) == 0
    ids = torch.tensor(
        [
            AutoTokenizer.from_pretrained(run / "hf")("\n\nHuman: How do I bake bread?\n\nAssistant:")[
                "input_ids"
            ]
        ]
    )
    base = AutoModelForCausalLM.from_pretrained(run / "initial")
    adapted = PeftModel.from_pretrained(base, run / "hf").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        peft_logits = adapted(ids).logits  # (1, L, V)
        torch.testing.assert_close(merged(ids).logits, peft_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(load_model(run / "hf")(ids), peft_logits, rtol=1e-4, atol=1e-4)
        with adapted.disable_adapter():
            assert (adapted(ids).logits - peft_logits).abs().max() > 1e-2  # the adapter matters


def test_lora_sft_then_lora_dpo_from_the_sft_adapter(hh_slice, tmp_path, tiny_config):
    """The DPO run starts from the SFT adapter, which is also its reference: at the first step the policy equals
    the reference exactly (loss ln 2, zero rewards). tests/train/test_lora.py checks its metrics against `peft`."""
    sft = run_cli(
        tmp_path,
        tiny_config,
        "sft",
        hh_slice / "pairs",
        steps=10,
        sequence_length=256,
        model={"config": LORA_MODEL},
        lora=LORA,
        optimizer={"lr": 3e-2},
    )
    sft_losses = [row["loss"] for row in sft if "loss" in row]
    assert np.mean(sft_losses[-3:]) < np.mean(sft_losses[:3]) - 0.05
    start = {
        "model": {"path": str(tmp_path / "sft" / "initial"), "config": None},
        "lora": {**LORA, "adapter": str(tmp_path / "sft" / "hf")},
    }
    rows = run_cli(tmp_path, tiny_config, "dpo", hh_slice / "pairs", steps=6, **start)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/chosen"] == rows[0]["rewards/rejected"] == 0.0
    assert rows[-2]["rewards/chosen"] != 0.0  # moved away from its SFT start (the last row: peak memory)
    exported = json.loads((tmp_path / "dpo" / "hf" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == str((tmp_path / "sft" / "initial").resolve())
