"""torchrun with 2 CPU processes (gloo; DDP and FSDP2) == 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from unitrain.config import config_to_yaml
from unitrain.train.checkpoint import latest_checkpoint
from unitrain.train.logs.metrics import read_metrics

SECTIONS = {"train": {"max_steps": 4}, "run": {"eval_every": 2}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(config_path, processes: int) -> None:
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
    ]
    command = [*torchrun, "-m", "unitrain"] if processes > 1 else [sys.executable, "-m", "unitrain"]
    subprocess.run([*command, "train", str(config_path)], env=ENV, check=True, timeout=300)


GROUPS = {"dpo": {"loss": ["sigmoid", "plackett_luce"], "group_pairs": "all"}}


def one_process_run(data, tmp_path_factory, tiny_config, **sections):
    """A reference run: one process, 4 micro-batches of 1 row per step."""
    root = tmp_path_factory.mktemp("one")
    batch = {"micro_batch_size": 1, "gradient_accumulation_steps": 4}
    (root / "run.yaml").write_text(
        config_to_yaml(tiny_config("dpo", data, root, batch=batch, **SECTIONS, **sections))
    )
    launch(root / "run.yaml", 1)
    return root


@pytest.fixture(scope="module")
def one_process(preference_data, tmp_path_factory, tiny_config):
    """The reference runs on pairs, one per `lora` section, each run once."""
    roots = {}

    def run(lora: dict):
        key = str(sorted(lora.items()))
        if key not in roots:
            roots[key] = one_process_run(preference_data, tmp_path_factory, tiny_config, lora=lora)
        return roots[key]

    return run


@pytest.fixture(scope="module")
def one_process_groups(group_data, tmp_path_factory, tiny_config):
    return one_process_run(group_data, tmp_path_factory, tiny_config, **GROUPS)


@pytest.mark.parametrize(
    ("fsdp", "reference", "lora"),
    [
        (False, "model", {}),
        (True, "model", {}),
        (False, "cached", {}),
        (False, "model", {"rank": 4, "alpha": 16.0}),
        (True, "model", {"rank": 4, "alpha": 16.0}),
    ],
    ids=["ddp", "fsdp2", "ddp-cached", "ddp-lora", "fsdp2-lora"],
)
def test_two_gloo_ranks_match_one_process(
    fsdp, reference, lora, one_process, preference_data, tmp_path, tiny_config
):
    """2 ranks x 2 micro-batches of 1 row: the same rows per step as the one-process run (whose reference model
    runs alongside; a cached reference, filled once by rank 0, gives the same numbers). With LoRA the reference
    is the policy module with its adapters off, through the DDP/FSDP2-wrapped model; checkpoints hold the
    adapters only."""
    batch = {"micro_batch_size": 1, "gradient_accumulation_steps": 2}
    sections = {"batch": batch, "parallel": {"fsdp": fsdp}, "dpo": {"reference": reference}, **SECTIONS}
    config = tiny_config("dpo", preference_data, tmp_path, lora=lora, **sections)
    (tmp_path / "run.yaml").write_text(config_to_yaml(config))
    launch(tmp_path / "run.yaml", 2)

    one_process = one_process(lora)
    assert_same_run(tmp_path, one_process)
    if reference == "cached":
        assert [path.name for path in (tmp_path / "reference-cache").iterdir()] == [
            "reference_logps.safetensors"
        ]
    weights_one = load_file(str(latest_checkpoint(one_process) / "model.safetensors"))
    assert all(("lora_" in name) == bool(lora) for name in weights_one)


KEYS = ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "eval/loss", "eval/rewards/accuracies")


def assert_same_run(two, one, keys=KEYS, atol=1e-5) -> None:
    rows_two = read_metrics(two / "metrics.jsonl")
    rows_one = read_metrics(one / "metrics.jsonl")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]
    for key in keys:
        got = [r[key] for r in rows_two if key in r]
        want = [r[key] for r in rows_one if key in r]
        assert len(got) == len(want) > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=key)
    weights_two = load_file(str(latest_checkpoint(two) / "model.safetensors"))
    weights_one = load_file(str(latest_checkpoint(one) / "model.safetensors"))
    assert weights_two.keys() == weights_one.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=atol)


def test_two_gloo_ranks_match_one_process_on_groups(one_process_groups, group_data, tmp_path, tiny_config):
    """Groups with a listwise loss: pairs and groups of the step are counted over both ranks."""
    batch = {"micro_batch_size": 1, "gradient_accumulation_steps": 2}
    config = tiny_config("dpo", group_data, tmp_path, batch=batch, **SECTIONS, **GROUPS)
    (tmp_path / "run.yaml").write_text(config_to_yaml(config))
    launch(tmp_path / "run.yaml", 2)
    keys = KEYS + ("rewards/ranking_accuracy", "rewards/top1_accuracy", "eval/rewards/ranking_accuracy")
    assert_same_run(tmp_path, one_process_groups, keys, atol=5e-5)  # see the accumulation test of groups
