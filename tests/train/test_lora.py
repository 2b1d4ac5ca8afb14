"""LoRA runs on tiny synthetic data: only adapters train (base bit-identical, optimizer state and checkpoints hold
adapters only), the adapter-off reference is the base, DPO metrics equal `peft`'s, cached reference, refusals."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from unitrain.config import parse_config
from unitrain.data.batches.stream import iterate_batches, split_indices
from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.errors import UnitrainError
from unitrain.losses.preference import response_logps
from unitrain.model import from_pretrained
from unitrain.train import train
from unitrain.train.checkpoint import export_hf, latest_checkpoint, load_checkpoint
from unitrain.train.dist import init_distributed
from unitrain.train.logs.metrics import read_metrics
from unitrain.train.policy import PolicyLogprobs
from unitrain.train.step.reference import CACHE_FILE, weights_hash
from unitrain.train.trainer import Trainer

from .conftest import tiny_raw
from .test_trainer import _token_logps

LORA = {"rank": 4, "alpha": 8.0}


# where each Hugging Face projection lives in our decoder
MODULE_OF = {
    "q_proj": "attention.qkv",
    "k_proj": "attention.qkv",
    "v_proj": "attention.qkv",
    "o_proj": "attention.out",
    "gate_proj": "mlp.gate_up",
    "up_proj": "mlp.gate_up",
    "down_proj": "mlp.down",
}


def adapter_names(targets=tuple(MODULE_OF), num_layers: int = 2) -> set[str]:
    return {
        f"layers.{i}.{MODULE_OF[target]}.lora_{kind}.{target}"
        for i in range(num_layers)
        for target in targets
        for kind in "AB"
    }


def losses_of(output_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(output_dir / "metrics.jsonl") if "loss" in row]


def test_only_adapters_train_and_the_base_stays_bit_identical(preference_data, tmp_path, tiny_config):
    config = tiny_config(
        "dpo", preference_data, tmp_path, lora=LORA, optimizer={"lr": 3e-2}, train={"max_steps": 6}
    )
    trainer = Trainer(config, init_distributed("cpu"), resume=False)
    base = {
        name: param.detach().clone()
        for name, param in trainer.model.named_parameters()
        if "lora_" not in name
    }
    result = trainer.fit()
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name]), name
    initial = from_pretrained(tmp_path / "initial").state_dict()
    assert all(torch.equal(initial[name], tensor) for name, tensor in base.items())  # the base is `initial/`

    checkpoint = load_checkpoint(latest_checkpoint(tmp_path))
    assert set(checkpoint["model_state"]) == adapter_names()
    optimizer = checkpoint["optimizer_state"]
    assert (
        len(optimizer["state"])
        == len(adapter_names())
        == sum(len(g["params"]) for g in optimizer["param_groups"])
    )
    assert all(len(state["exp_avg"].shape) == 2 for state in optimizer["state"].values())
    assert checkpoint["meta"]["lora"]["base_model"] == str((tmp_path / "initial").resolve())
    assert checkpoint["meta"]["lora"]["base_sha256"] == weights_hash(tmp_path / "initial")

    losses = losses_of(tmp_path)
    assert losses[-1] < losses[0] - 0.03 and result.last_metrics["rewards/accuracies"] > 0.7
    adapter_config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "initial").resolve())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8.0)
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_adapter_off_reference_is_the_base_model_bit_for_bit(
    preference_data, tmp_path, tiny_config, monkeypatch
):
    import unitrain.train.step.reference

    def no_second_model(*args, **kwargs):
        raise AssertionError("the LoRA reference must not load a model")

    monkeypatch.setattr(unitrain.train.step.reference, "from_pretrained", no_second_model)
    config = tiny_config("dpo", preference_data, tmp_path, lora=LORA, train={"max_steps": 3})
    trainer = Trainer(config, init_distributed("cpu"), resume=False)
    monkeypatch.undo()
    trainer.fit()  # the adapters have moved
    base = PolicyLogprobs(from_pretrained(tmp_path / "initial"), config.train.logprob_chunk_size)
    dataset = GPTMemmapDataset(preference_data)
    packing = dict(objective="dpo", mode="packed", share_prompt=True, sequence_length=64, micro_batch_size=2)
    batches = iterate_batches(dataset, np.arange(len(dataset)), **packing)

    for batch in batches:
        with torch.no_grad():
            expected = response_logps(base(batch), batch.target_response, batch.num_responses)[0]
            policy = response_logps(trainer.policy(batch), batch.target_response, batch.num_responses)[0]
        assert torch.equal(trainer.reference.response_logps(batch), expected)
        assert not torch.equal(policy, expected)


@pytest.mark.parametrize("start", ["fresh", "sft-adapter"])
def test_dpo_validation_metrics_match_peft(start, preference_data, tmp_path, tiny_config):
    """The policy is `peft` on transformers with the exported adapter; the reference is the base alone, or, for a
    run that starts from an SFT adapter, `peft` with that adapter (the model the run started from)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    beta, lora = 0.2, LORA
    base, sections = tmp_path / "dpo" / "initial", {}
    if start == "sft-adapter":
        train(tiny_config("sft", preference_data, tmp_path / "sft", lora=LORA, optimizer={"lr": 3e-2}))
        base, adapter = tmp_path / "sft" / "initial", tmp_path / "sft" / "hf"
        sections["model"], lora = {"path": str(base), "config": None}, {**LORA, "adapter": str(adapter)}
    dpo = {"beta": beta}
    result = train(tiny_config("dpo", preference_data, tmp_path / "dpo", dpo=dpo, lora=lora, **sections))
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "dpo" / "hf")
    reference = AutoModelForCausalLM.from_pretrained(base)
    if start == "sft-adapter":
        reference = PeftModel.from_pretrained(reference, tmp_path / "sft" / "hf")
    dataset = GPTMemmapDataset(preference_data)
    _, held_out = split_indices(len(dataset), 0.125, seed=0)
    margins, losses = [], []
    for index in held_out:
        sample = dataset[int(index)]
        prompt = len(sample.prompt_ids)
        rewards = []
        for response in (sample.chosen_ids, sample.rejected_ids):
            tokens = np.concatenate([sample.prompt_ids, response])
            sums = [float(_token_logps(m.eval(), tokens)[prompt - 1 :].sum()) for m in (policy, reference)]
            rewards.append(beta * (sums[0] - sums[1]))
        margins.append(rewards[0] - rewards[1])
        losses.append(-F.logsigmoid(torch.tensor(margins[-1])).item())
    assert abs(np.mean(margins)) > 1e-3  # the adapters changed the policy
    assert result.last_metrics["eval/loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    assert result.last_metrics["eval/rewards/margins"] == pytest.approx(np.mean(margins), rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("start", ["fresh", "sft-adapter"])
def test_cached_reference_gives_the_losses_of_the_adapter_off_reference(
    start, preference_data, tmp_path, tiny_config
):
    """The cache is computed from the base checkpoint (merged with the starting adapter, if any) and keyed by
    the base weights (and that adapter); its losses are those of the policy module with its adapters off."""
    from safetensors import safe_open

    from unitrain.model.adapter import adapter_hash

    base, lora, sections = None, LORA, {}
    if start == "sft-adapter":
        train(tiny_config("sft", preference_data, tmp_path / "sft", lora=LORA, optimizer={"lr": 3e-2}))
        base, adapter = tmp_path / "sft" / "initial", tmp_path / "sft" / "hf"
        sections["model"], lora = {"path": str(base), "config": None}, {**LORA, "adapter": str(adapter)}
    runs = {}
    for kind in ("model", "cached"):
        dpo = {"reference": kind}
        config = tiny_config("dpo", preference_data, tmp_path / kind, lora=lora, dpo=dpo, **sections)
        runs[kind] = train(config)
    np.testing.assert_allclose(losses_of(tmp_path / "cached"), losses_of(tmp_path / "model"), rtol=1e-6)
    assert runs["cached"].last_metrics["eval/loss"] == pytest.approx(
        runs["model"].last_metrics["eval/loss"], rel=1e-6
    )
    with safe_open(tmp_path / "cached" / "reference-cache" / CACHE_FILE, framework="np") as handle:
        key = json.loads(handle.metadata()["key"])
    if start == "fresh":
        assert key["weights"] == weights_hash(tmp_path / "cached" / "initial")  # the base weights alone
    else:
        assert key["weights"] == f"{weights_hash(base)}+{adapter_hash(tmp_path / 'sft' / 'hf')}"


def test_the_frozen_base_is_stored_in_bf16_only_for_bf16_training_on_gpu(tmp_path):
    from unitrain.train.lora import base_dtype

    raw = tiny_raw("sft", tmp_path, tmp_path, lora=LORA, train={"dtype": "bfloat16"})
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert base_dtype(parse_config(raw), cuda) == torch.bfloat16
    assert base_dtype(parse_config(raw), cpu) == torch.float32
    assert base_dtype(parse_config({**raw, "train": {"max_steps": 6}}), cuda) == torch.float32
    assert base_dtype(parse_config({**raw, "lora": {}}), cuda) == torch.float32  # full training: fp32 masters


@pytest.mark.parametrize("objective", ["pretrain", "sft"])
def test_lora_lowers_lm_and_sft_losses(objective, pretrain_data, sft_data, tmp_path, tiny_config):
    data = sft_data if objective == "sft" else pretrain_data
    lora = {"rank": 8, "alpha": 16.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    train(tiny_config(objective, data, tmp_path, lora=lora, optimizer={"lr": 3e-2}))
    losses = losses_of(tmp_path)
    assert (
        losses[-1] < losses[0] - 0.05
    )  # slower than full training: the random embedding and head stay frozen
    assert set(load_file(latest_checkpoint(tmp_path) / "model.safetensors")) == adapter_names(
        targets=("q_proj", "v_proj", "down_proj")
    )


def test_resume_refusals_are_one_line(pretrain_data, tmp_path, tiny_config):
    def config(**sections):
        return tiny_config("pretrain", pretrain_data, tmp_path, train={"max_steps": 4}, **sections)

    train(tiny_config("pretrain", pretrain_data, tmp_path, train={"max_steps": 2}, lora=LORA))
    cases = [
        ({}, "holds LoRA adapters \\(lora.rank 4\\); resume with the run's lora settings"),
        ({"lora": {"rank": 8}}, "lora settings differ from the checkpoint's in rank, alpha"),
    ]
    for sections, message in cases:
        with pytest.raises(UnitrainError, match=message):
            train(config(**sections), resume=True)
    adapters = latest_checkpoint(tmp_path) / "model.safetensors"
    kept = load_file(adapters)
    save_file(dict(list(kept.items())[1:]), adapters, metadata={"format": "pt"})  # one adapter short
    with pytest.raises(UnitrainError, match=f"its model state lacks {list(kept)[0]}"):
        train(config(lora=LORA), resume=True)
    save_file({**kept, "layers.0.extra": kept[next(iter(kept))].clone()}, adapters, metadata={"format": "pt"})
    with pytest.raises(UnitrainError, match="its model state holds layers.0.extra"):
        train(config(lora=LORA), resume=True)
    save_file(kept, adapters, metadata={"format": "pt"})
    weights = tmp_path / "initial" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(UnitrainError, match="differs from the one its adapters were trained on") as error:
        train(config(lora=LORA), resume=True)
    assert "\n" not in str(error.value)
    full = tmp_path / "full"
    train(tiny_config("pretrain", pretrain_data, full, train={"max_steps": 2}))
    with pytest.raises(UnitrainError, match="holds fully trained weights; resume without lora"):
        train(tiny_config("pretrain", pretrain_data, full, train={"max_steps": 4}, lora=LORA), resume=True)


def test_adapter_start_refusals(pretrain_data, tmp_path, tiny_config):
    train(tiny_config("pretrain", pretrain_data, tmp_path / "sft", train={"max_steps": 2}, lora=LORA))
    adapter, base = tmp_path / "sft" / "hf", tmp_path / "sft" / "initial"

    def raw(lora, model_path=base):
        values = tiny_raw(
            "pretrain", pretrain_data, tmp_path / "next", lora={**LORA, "adapter": str(adapter), **lora}
        )
        values["model"] = {"path": str(model_path)}
        return values

    parse_config(raw({}))  # matches
    cases = [
        ({"rank": 8}, "r=4, lora_alpha=8.0, but lora.rank=8"),
        ({"target_modules": ["q_proj"]}, "target_modules .* differ from lora.target_modules"),
        ({"rank": None}, "adapter is given but rank is null"),
    ]
    for lora, message in cases:
        with pytest.raises(UnitrainError, match=message):
            parse_config(raw(lora))
    with pytest.raises(UnitrainError, match="trained on base .* not model.path") as error:
        parse_config(raw({}, model_path=tmp_path / "sft" / "hf"))
    assert "\n" not in str(error.value)
    values = raw({})
    values["model"] = {"config": {"hidden_size": 32}}
    with pytest.raises(UnitrainError, match="lora.adapter needs model.path"):
        parse_config(values)


def test_export_merge_and_score_of_an_adapter(preference_data, tmp_path, tiny_config, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from unitrain.cli import main

    train(tiny_config("dpo", preference_data, tmp_path / "run", lora=LORA, train={"max_steps": 3}))
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "merged"), "--merge"]) == 0
    run, scores = tmp_path / "run", {}
    shutil.copytree(run / "initial", tmp_path / "moved-base")  # the same weights elsewhere: --base is read
    models = {
        "adapter": ["--model", str(run / "hf")],
        "merged": ["--model", str(tmp_path / "merged")],
        "base": ["--model", str(run / "hf"), "--base", str(tmp_path / "moved-base")],
    }
    for name, model in models.items():
        output = tmp_path / f"{name}.jsonl"
        assert main(["score", *model, "--data", str(preference_data), "--output", str(output)]) == 0
        scores[name] = [json.loads(line) for line in output.read_text().splitlines()]
    # independent: `peft` on `transformers`' own model, one prompt + response at a time
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "initial"), run / "hf")
    dataset = GPTMemmapDataset(preference_data)
    expected = {"chosen_logp": [], "rejected_logp": []}
    for index in range(len(scores["adapter"])):
        sample = dataset[index]
        for key, response in (("chosen_logp", sample.chosen_ids), ("rejected_logp", sample.rejected_ids)):
            tokens = np.concatenate([sample.prompt_ids, response])
            logps = _token_logps(peft_model.eval(), tokens)[len(sample.prompt_ids) - 1 :]
            expected[key].append(float(logps.sum()))
    for key in ("chosen_logp", "rejected_logp"):
        for name in models:
            np.testing.assert_allclose([r[key] for r in scores[name]], expected[key], rtol=1e-5, atol=1e-5)
    full = tmp_path / "full"
    train(tiny_config("dpo", preference_data, full, train={"max_steps": 2}))
    with pytest.raises(UnitrainError, match="holds full weights, not LoRA adapters"):
        export_hf(latest_checkpoint(full), tmp_path / "y", merge=True)
    # an adapter export over a full one replaces it whole: no weights or config.json of the old one stay beside it
    assert main(["export", str(full), "--output", str(tmp_path / "out")]) == 0
    assert main(["export", str(run), "--output", str(tmp_path / "out"), "--overwrite"]) == 0
    assert not {"model.safetensors", "config.json"} & set(os.listdir(tmp_path / "out"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "out"))
    score = ["score", "--data", str(preference_data), "--output", str(tmp_path / "z.jsonl")]
    assert main([*score, "--model", str(full / "hf"), "--base", str(full / "hf")]) == 2
    other = tmp_path / "other-base"
    shutil.copytree(tmp_path / "run" / "initial", other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    assert main([*score, "--model", str(tmp_path / "run" / "hf"), "--base", str(other)]) == 2
    assert "was trained on other base weights than" in capsys.readouterr().err
