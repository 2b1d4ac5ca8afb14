"""`eval.samples`: the same held-out prompts completed at every validation, as the run's model at that step
completes them (the final ones equal transformers' greedy decoding of the final export), logged to samples.jsonl,
TensorBoard's text tab and a W&B table, without changing what the run trains."""

from __future__ import annotations

import json

import pytest
import torch

from unitrain.cli import main
from unitrain.config import parse_config
from unitrain.train import train
from unitrain.train.logs.metrics import read_metrics

from .test_wandb import history, offline_runs

NEW = 6


def config(data, output_dir, samples: int, **sections):
    raw = {
        "objective": "dpo",
        "model": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "tie_word_embeddings": True, "initializer_range": 0.1}},
        "data": {"train": str(data), "validation": 0.25},
        "packing": {"sequence_length": 256},
        "batch": {"micro_batch_size": 2, "gradient_accumulation_steps": 1},
        "optimizer": {"lr": 0.05},
        "train": {"max_steps": 2, "seed": 0, "device": "cpu"},
        "run": {"output_dir": str(output_dir), "progress": False, "tensorboard": True, "eval_every": 1},
        "eval": {"samples": samples, "max_new_tokens": NEW},
        **sections,
    }  # fmt: skip
    return parse_config(raw)


def assert_greedy_decoding(checkpoint, rows, dataset, indices) -> None:
    """Each row's completion is transformers' greedy decoding of its held-out prompt by `checkpoint`."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(dataset.tokenizer_path / "tokenizer.json"))
    for row, index in zip(rows, indices, strict=True):
        prompt = torch.tensor([dataset[index].prompt_ids.tolist()])
        with torch.no_grad():
            output = model.generate(prompt, do_sample=False, max_new_tokens=NEW, eos_token_id=dataset.eos_id,
                                    pad_token_id=dataset.eos_id, attention_mask=torch.ones_like(prompt))  # fmt: skip
        new = output[0, prompt.shape[1] :].tolist()
        text = new[:-1] if new[-1] == dataset.eos_id and len(new) < NEW + 1 and dataset.eos_id in new else new
        assert row["completion"] == tokenizer.decode(text, skip_special_tokens=False)
        assert row["tokens"] == len(new)


def test_samples_at_every_validation_in_every_log(hh_pairs, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from unitrain.data.memmap import GPTMemmapDataset
    from unitrain.train.data import held_out_indices

    wandb = {"enabled": True, "project": "unitrain-test", "mode": "offline"}
    train(config(hh_pairs, tmp_path / "run", 2, wandb=wandb))
    rows = read_metrics(tmp_path / "run" / "samples.jsonl")
    dataset = GPTMemmapDataset(hh_pairs)
    indices = held_out_indices(tmp_path / "run", dataset)[:2].tolist()
    assert [(row["step"], row["index"]) for row in rows] == [(s, i) for s in (0, 1, 2) for i in indices]
    assert len({row["prompt"] for row in rows}) == 2

    # the last validation's completions are the final model's: transformers' greedy decoding of the export
    assert_greedy_decoding(tmp_path / "run" / "hf", rows[-2:], dataset, indices)

    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(row["eval/samples_seconds"] > 0 for row in metrics if "eval/loss" in row)

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("samples/text_summary")
    assert [event.step for event in texts] == [0, 1, 2]
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert rows[-1]["completion"].replace("\n", "<br>").replace("|", "\\|") in table

    (records,) = offline_runs(tmp_path / "run")
    logged = history(records)  # a table is logged as nested keys (samples/_type, samples/path, ...)
    tables = [row for row in logged if any(key.split("/")[0] == "samples" for key in row)]
    assert [row["step"] for row in tables] == [0, 1, 2]
    files = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    contents = [json.loads(path.read_text()) for path in files]
    assert contents[0]["columns"] == ["index", "prompt", "completion"]
    assert sorted(json.dumps(content["data"]) for content in contents) == sorted(
        json.dumps([[row["index"], row["prompt"], row["completion"]] for row in rows if row["step"] == step])
        for step in (0, 1, 2)
    )


def test_samples_leave_training_as_it_was(hh_pairs, tmp_path):
    """LoRA dropout draws from torch's generator: generating must neither move it nor touch the adapters."""
    lora = {
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.2},
        "train": {"max_steps": 4, "seed": 0, "device": "cpu"},
    }
    train(config(hh_pairs, tmp_path / "with", 2, **lora))
    train(config(hh_pairs, tmp_path / "without", 0, **lora))
    timed = ("seconds", "per_second")
    kept = lambda key: not key.endswith(timed) and not key.startswith("memory/")  # noqa: E731
    strip = lambda rows: [{k: v for k, v in row.items() if kept(k)} for row in rows]  # noqa: E731
    with_samples = strip(read_metrics(tmp_path / "with" / "metrics.jsonl"))
    without = strip(read_metrics(tmp_path / "without" / "metrics.jsonl"))
    assert with_samples == without
    assert not (tmp_path / "without" / "samples.jsonl").exists() or not read_metrics(
        tmp_path / "without" / "samples.jsonl"
    )


def test_samples_on_the_transformers_backend_with_lora_and_checkpointing(hh_pairs, tmp_path):
    """The transformers backend generates with its own module (LoRA adapters inside, activation checkpointing
    on): the final completions are the merged export's greedy decoding, and the run trains as without samples."""
    from unitrain.data.memmap import GPTMemmapDataset
    from unitrain.train.data import held_out_indices

    sections = {
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.2},
        "train": {"max_steps": 3, "seed": 0, "device": "cpu", "activation_checkpointing": True},
    }
    runs = {}
    for name, samples in (("with", 2), ("without", 0)):
        settings = config(hh_pairs, tmp_path / name, samples, **sections).model_dump()
        settings["model"]["backend"] = "transformers"
        train(parse_config(settings))
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    kept = lambda key: not key.endswith(("seconds", "per_second")) and not key.startswith("memory/")  # noqa: E731
    strip = lambda rows: [{k: v for k, v in row.items() if kept(k)} for row in rows]  # noqa: E731
    assert strip(runs["with"]) == strip(runs["without"])
    merged = tmp_path / "merged"
    assert main(["export", str(tmp_path / "with"), "--merge", "--output", str(merged)]) == 0
    dataset = GPTMemmapDataset(hh_pairs)
    indices = held_out_indices(tmp_path / "with", dataset)[:2].tolist()
    rows = read_metrics(tmp_path / "with" / "samples.jsonl")
    assert [row["step"] for row in rows] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert_greedy_decoding(merged, rows[-2:], dataset, indices)
