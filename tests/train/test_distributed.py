"""torchrun with 2 CPU processes (gloo, DDP) == 1 process with the same global batch: per-step losses, weights."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from unitrain.config import config_to_yaml
from unitrain.train.checkpoint import latest_checkpoint
from unitrain.train.metrics import read_metrics


def test_two_gloo_ranks_match_one_process(preference_data, tmp_path, tiny_config):
    sections = {"train": {"max_steps": 4}, "run": {"eval_every": 2}}
    two = tiny_config(
        "dpo",
        preference_data,
        tmp_path / "two",
        batch={"micro_batch_size": 1, "gradient_accumulation_steps": 2},
        **sections,
    )
    one = tiny_config(
        "dpo",
        preference_data,
        tmp_path / "one",
        batch={"micro_batch_size": 1, "gradient_accumulation_steps": 4},
        **sections,
    )
    for name, config in (("two", two), ("one", one)):
        (tmp_path / f"{name}.yaml").write_text(config_to_yaml(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    subprocess.run(
        [*launch, "-m", "unitrain", "train", str(tmp_path / "two.yaml")], env=env, check=True, timeout=300
    )
    subprocess.run(
        [sys.executable, "-m", "unitrain", "train", str(tmp_path / "one.yaml")],
        env=env,
        check=True,
        timeout=300,
    )

    rows_two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    rows_one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]
    for key in (
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "grad_norm",
        "eval/loss",
        "eval/rewards/accuracies",
    ):
        got = [r[key] for r in rows_two if key in r]
        want = [r[key] for r in rows_one if key in r]
        assert len(got) == len(want) > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=key)
    weights_two = load_file(str(latest_checkpoint(tmp_path / "two") / "model.safetensors"))
    for name, tensor in load_file(str(latest_checkpoint(tmp_path / "one") / "model.safetensors")).items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5)
