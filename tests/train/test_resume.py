"""SIGTERM saves and exits; `--resume` then gives the same losses and weights as a run that never stopped."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from unitrain.cli import main
from unitrain.config import config_to_yaml
from unitrain.errors import UnitrainError
from unitrain.train import train
from unitrain.train.checkpoint import latest_checkpoint, list_checkpoints
from unitrain.train.logs.metrics import read_metrics
from unitrain.train.trainer import Trainer


@pytest.mark.parametrize("lora", [{}, {"rank": 4, "dropout": 0.1}], ids=["full", "lora"])
def test_sigterm_then_resume_matches_uninterrupted(lora, preference_data, tmp_path, tiny_config, monkeypatch):
    """With LoRA the checkpoints hold only the adapters and their optimizer state (and the dropout RNG)."""

    def config(output_dir):
        return tiny_config(
            "dpo",
            preference_data,
            output_dir,
            train={"max_steps": 8},
            run={"save_every": 3, "eval_every": 4, "keep_last": 5},
            lora=lora,
        )

    train(config(tmp_path / "full"))
    path = tmp_path / "run.yaml"
    path.write_text(config_to_yaml(config(tmp_path / "stopped")))

    real_step = Trainer.train_step

    def step_then_sigterm(self):
        metrics = real_step(self)
        if self.step == 4:  # a real SIGTERM arrives while step 5 runs
            signal.raise_signal(signal.SIGTERM)
        return metrics

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    assert main(["train", str(path)]) == 128 + signal.SIGTERM
    assert [p.name for p in list_checkpoints(tmp_path / "stopped")] == ["step-00000003", "step-00000005"]
    monkeypatch.undo()
    assert main(["train", str(path), "--resume"]) == 0

    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "stopped" / "metrics.jsonl")
    assert [row["step"] for row in resumed] == [row["step"] for row in full]  # no step lost or repeated
    for before, after in zip(full, resumed):
        for key in ("loss", "rewards/accuracies", "rewards/margins", "eval/loss", "learning_rate"):
            if key in before:
                np.testing.assert_allclose(
                    after[key], before[key], rtol=1e-6, err_msg=f"step {before['step']}"
                )
    weights = load_file(str(latest_checkpoint(tmp_path / "full") / "model.safetensors"))
    resumed_weights = load_file(str(latest_checkpoint(tmp_path / "stopped") / "model.safetensors"))
    for name, tensor in weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-6, atol=1e-7)


def test_resume_without_checkpoint_is_refused(pretrain_data, tmp_path, tiny_config, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(
        config_to_yaml(tiny_config("pretrain", pretrain_data, tmp_path / "typo", train={"max_steps": 2}))
    )
    assert main(["train", str(path), "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"error: --resume: no checkpoint in {tmp_path / 'typo' / 'checkpoints'} (run.output_dir); check "
        "run.output_dir, or leave out --resume to start a new run\n"
    )
    assert not (tmp_path / "typo").exists(), "a refused resume starts nothing"


def test_a_resume_takes_the_run_settings_and_lists_what_the_command_line_changes(
    pretrain_data, tmp_path, tiny_config, capsys
):
    """The overrides that started the run need not be repeated; `--resume` goes anywhere on the line."""
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(
        config_to_yaml(tiny_config("pretrain", pretrain_data, tmp_path / "run", train={"max_steps": 2}))
    )
    assert main(["train", str(path), "optimizer.lr=0.003"]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "train.max_steps=3", "--resume", "schedule.warmup_steps=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert out[:2] == [
        f"resuming {tmp_path / 'run' / 'checkpoints' / 'step-00000002'} with the run's own settings; changed by the "
        "command line: schedule.warmup_steps 1 -> 2, train.max_steps 2 -> 3",
        f"{path} differs from the run's settings in optimizer.lr 0.003 -> 0.01: not applied on resume (pass them "
        "as key=value overrides to change them)",
    ]
    stored = yaml.safe_load((checkpoint / "config.yaml").read_text())
    assert checkpoint.name == "step-00000003"
    assert (stored["optimizer"]["lr"], stored["train"]["max_steps"], stored["schedule"]["warmup_steps"]) == (
        0.003,
        3,
        2,
    )
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["learning_rate"] for row in rows if row["step"] == 3 and "learning_rate" in row] == [
        pytest.approx(0.003)
    ]  # past warmup: the peak


def test_a_resume_on_changed_data_names_the_dataset(pretrain_data, tmp_path, tiny_config):
    import shutil

    from unitrain.data.memmap.reader import GPTMemmapDataset
    from unitrain.data.memmap.writer import write_dataset

    data = tmp_path / "data"
    shutil.copytree(pretrain_data, data)
    train(tiny_config("pretrain", data, tmp_path / "run", train={"max_steps": 2}))
    source = GPTMemmapDataset(pretrain_data)
    write_dataset(
        data,
        [source[k] for k in range(1, len(source))],
        "pretraining",
        vocab_size=48,
        eos_id=0,
        overwrite=True,
    )
    with pytest.raises(UnitrainError) as error:
        train(tiny_config("pretrain", data, tmp_path / "run", train={"max_steps": 3}), resume=True)
    assert str(error.value).startswith(
        f"cannot resume the data stream: dataset {data} changed since the checkpoint"
    )


def test_resuming_a_finished_run_logs_nothing_twice(preference_data, tmp_path, tiny_config, capsys):
    config = tiny_config("dpo", preference_data, tmp_path, train={"max_steps": 3}, run={"eval_every": 2})
    first = train(config)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows if "eval/loss" in row] == [0, 2, 3]
    capsys.readouterr()
    again = train(config, resume=True)
    assert read_metrics(tmp_path / "metrics.jsonl") == rows
    assert again.steps == 3
    assert again.last_metrics["eval/loss"] == first.last_metrics["eval/loss"]
    assert "already finished at step 3" in capsys.readouterr().out


def test_resume_with_another_architecture_is_one_clear_error(pretrain_data, tmp_path, tiny_config):
    train(tiny_config("pretrain", pretrain_data, tmp_path, train={"max_steps": 2}))
    model = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    wider = tiny_config("pretrain", pretrain_data, tmp_path, train={"max_steps": 4}, model={"config": model})
    with pytest.raises(
        UnitrainError, match="cannot resume from .*step-00000002.* differs .* in head_dim, hidden_size"
    ):
        train(wider, resume=True)


def test_a_run_saved_without_special_token_ids_still_resumes(pretrain_data, tmp_path, tiny_config):
    """Runs from `model.config` now record the data's BOS/EOS ids; one saved before (null ids) resumes all the same."""
    import json

    train(tiny_config("pretrain", pretrain_data, tmp_path, train={"max_steps": 2}))
    stored = latest_checkpoint(tmp_path) / "model_config.json"
    assert json.loads(stored.read_text())["eos_token_id"] == 0
    stored.write_text(
        json.dumps({**json.loads(stored.read_text()), "bos_token_id": None, "eos_token_id": None})
    )
    assert (
        train(tiny_config("pretrain", pretrain_data, tmp_path, train={"max_steps": 3}), resume=True).steps
        == 3
    )
