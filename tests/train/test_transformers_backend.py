"""Training through the transformers backend: the same run as the native decoder on a Llama, and a non-native
architecture through the whole trainer (DPO with a model reference, checkpoints, exact resume, the `hf/` export),
a mixture of experts, and the cached reference."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from unitrain.cli import main
from unitrain.config import config_to_yaml
from unitrain.train import train
from unitrain.train.checkpoint import latest_checkpoint
from unitrain.train.logs.metrics import read_metrics
from unitrain.train.trainer import Trainer

from .conftest import VOCAB

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def step_losses(output_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(output_dir / "metrics.jsonl") if "loss" in row]


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    from unitrain.model import ModelConfig, build_model, save_pretrained

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
    )
    path = tmp_path_factory.mktemp("llama")
    save_pretrained(build_model(config), path)
    return path


def test_transformers_backend_on_llama_equals_native(
    llama_checkpoint, preference_data, tmp_path, tiny_config
):
    """20 DPO steps (model reference, packed shared-prompt rows, accumulation) give the same losses."""
    losses = {}
    for backend in ("native", "transformers"):
        config = tiny_config(
            "dpo",
            preference_data,
            tmp_path / backend,
            model={"config": None, "path": str(llama_checkpoint), "backend": backend},
            train={"max_steps": 20},
            run={"eval_every": 10},
        )
        result = train(config)
        losses[backend] = step_losses(tmp_path / backend)
        assert result.steps == 20
    assert len(losses["native"]) == 20
    np.testing.assert_allclose(losses["transformers"], losses["native"], rtol=1e-5)
    assert losses["native"][-1] < losses["native"][0]
    eval_losses = [
        [row["eval/loss"] for row in read_metrics(tmp_path / backend / "metrics.jsonl") if "eval/loss" in row]
        for backend in ("native", "transformers")
    ]
    np.testing.assert_allclose(eval_losses[1], eval_losses[0], rtol=1e-5)


def neox_config(tiny_config, data, output_dir, objective="dpo", **sections):
    model = {"config": {"model_type": "gpt_neox", **SMALL, "rotary_pct": 0.5}}
    return tiny_config(objective, data, output_dir, model=model, **sections)


def test_a_non_native_architecture_resumes_exactly_and_exports(
    preference_data, tmp_path, tiny_config, monkeypatch
):
    """GPT-NeoX from `model.config`: a SIGTERM then `--resume` gives the losses of a run that never stopped, and
    `hf/` is the model's own save_pretrained, loaded by transformers with the checkpoint's weights."""
    from transformers import AutoModelForCausalLM

    sections = {"train": {"max_steps": 6}, "run": {"save_every": 2, "keep_last": 5}}
    train(neox_config(tiny_config, preference_data, tmp_path / "full", **sections))
    path = tmp_path / "run.yaml"
    path.write_text(
        config_to_yaml(neox_config(tiny_config, preference_data, tmp_path / "stopped", **sections))
    )
    real_step = Trainer.train_step

    def step_then_sigterm(self):
        metrics = real_step(self)
        if self.step == 2:
            signal.raise_signal(signal.SIGTERM)
        return metrics

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    assert main(["train", str(path)]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert main(["train", str(path), "--resume"]) == 0
    assert len(step_losses(tmp_path / "full")) == 6
    np.testing.assert_allclose(step_losses(tmp_path / "stopped"), step_losses(tmp_path / "full"), rtol=1e-6)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "hf")
    assert type(exported).__name__ == "GPTNeoXForCausalLM"
    trained = load_file(str(latest_checkpoint(tmp_path / "full") / "model.safetensors"))
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, trained[f"hf.{name}"], rtol=0, atol=0)
    initial = AutoModelForCausalLM.from_pretrained(
        tmp_path / "full" / "initial"
    )  # the random start, for the reference
    assert not torch.equal(initial.state_dict()["lm_head.weight"], exported.state_dict()["lm_head.weight"])


def test_a_mixture_of_experts_trains_without_the_router_loss(preference_data, tmp_path, tiny_config):
    experts = {"num_local_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 2}
    model = {"config": {"model_type": "mixtral", **SMALL, **experts}}
    config = tiny_config("dpo", preference_data, tmp_path, model=model, train={"max_steps": 4})
    result = train(config)
    assert result.steps == 4 and np.isfinite(result.last_metrics["eval/loss"])
    assert not any("router" in key or "aux" in key for key in result.last_metrics)


def test_the_cached_reference_equals_the_model_reference(preference_data, tmp_path, tiny_config):
    sections = {"train": {"max_steps": 3}}
    for kind in ("model", "cached"):
        train(neox_config(tiny_config, preference_data, tmp_path / kind, dpo={"reference": kind}, **sections))
    np.testing.assert_allclose(step_losses(tmp_path / "cached"), step_losses(tmp_path / "model"), rtol=1e-6)


@pytest.mark.parametrize("objective", ["pretrain", "sft"])
def test_pretraining_and_sft_train_with_activation_checkpointing(
    objective, pretrain_data, sft_data, tmp_path, tiny_config
):
    data = pretrain_data if objective == "pretrain" else sft_data
    losses = []
    for checkpointing in (False, True):
        output = tmp_path / str(checkpointing)
        train_section = {"max_steps": 3, "activation_checkpointing": checkpointing}
        train(neox_config(tiny_config, data, output, objective, train=train_section))
        losses.append(step_losses(output))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)


def test_lora_dpo_exports_an_adapter_peft_loads_a_merge_transformers_loads_and_scores(
    preference_data, tmp_path, tiny_config
):
    """LoRA on GPT-NeoX's own modules through the trainer: `hf/` is a PEFT adapter, `export --merge` a
    transformers checkpoint, and `score` of either gives the log-probs of `peft` on transformers' own model,
    one prompt + response at a time."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from unitrain.data.memmap import GPTMemmapDataset

    lora = {"rank": 4, "alpha": 8.0, "target_modules": ["query_key_value", "dense"]}
    run = tmp_path / "run"
    train(neox_config(tiny_config, preference_data, run, lora=lora, train={"max_steps": 3}))
    assert json.loads((run / "hf" / "adapter_config.json").read_text())["target_modules"] == [
        "dense",
        "query_key_value",
    ]
    assert main(["export", str(run), "--output", str(tmp_path / "merged"), "--merge"]) == 0
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")).__name__ == "GPTNeoXForCausalLM"
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(run / "initial"), run / "hf"
    ).eval()
    dataset = GPTMemmapDataset(preference_data)
    for name, model in (("adapter", run / "hf"), ("merged", tmp_path / "merged")):
        output = tmp_path / f"{name}.jsonl"
        assert (
            main(["score", "--model", str(model), "--data", str(preference_data), "--output", str(output)])
            == 0
        )
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        for index in range(0, len(rows), 7):
            sample = dataset[index]
            ids = torch.as_tensor(np.concatenate([sample.prompt_ids, sample.chosen_ids]), dtype=torch.int64)[
                None
            ]
            with torch.no_grad():
                logps = torch.log_softmax(peft_model(ids).logits[0, :-1].float(), -1)
            start = len(sample.prompt_ids) - 1
            expected = logps[start:].gather(1, ids[0, start + 1 :, None]).sum()
            np.testing.assert_allclose(rows[index]["chosen_logp"], float(expected), rtol=1e-5, atol=1e-5)


def test_groups_and_bf16_autocast_train(group_data, preference_data, tmp_path, tiny_config):
    """A listwise loss over groups of ranked responses, and a bf16-autocast DPO run, through GPT-NeoX."""
    groups = {"loss": ["sigmoid", "plackett_luce"], "group_pairs": "all"}
    result = train(
        neox_config(tiny_config, group_data, tmp_path / "groups", dpo=groups, train={"max_steps": 3})
    )
    assert result.steps == 3 and np.isfinite(result.last_metrics["eval/loss"])
    bf16 = {"max_steps": 3, "dtype": "bfloat16"}
    result = train(neox_config(tiny_config, preference_data, tmp_path / "bf16", train=bf16))
    assert result.steps == 3 and result.skipped_steps == 0 and np.isfinite(result.last_metrics["eval/loss"])
