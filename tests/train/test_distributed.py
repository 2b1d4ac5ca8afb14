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
from unitrain.train.metrics import read_metrics

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


@pytest.fixture(scope="module")
def one_process(preference_data, tmp_path_factory, tiny_config):
    """The reference runs: one process, 4 micro-batches of 1 row per step; one per `lora` section, run once."""
    roots = {}

    def run(lora: dict):
        key = str(sorted(lora.items()))
        if key not in roots:
            roots[key] = root = tmp_path_factory.mktemp("one")
            batch = {"micro_batch_size": 1, "gradient_accumulation_steps": 4}
            config = tiny_config("dpo", preference_data, root, batch=batch, lora=lora, **SECTIONS)
            (root / "run.yaml").write_text(config_to_yaml(config))
            launch(root / "run.yaml", 1)
        return roots[key]

    return run


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
    rows_two = read_metrics(tmp_path / "metrics.jsonl")
    rows_one = read_metrics(one_process / "metrics.jsonl")
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
    if reference == "cached":
        assert [path.name for path in (tmp_path / "reference-cache").iterdir()] == [
            "reference_logps.safetensors"
        ]
    weights_two = load_file(str(latest_checkpoint(tmp_path) / "model.safetensors"))
    weights_one = load_file(str(latest_checkpoint(one_process) / "model.safetensors"))
    assert weights_two.keys() == weights_one.keys()
    assert all(("lora_" in name) == bool(lora) for name in weights_one)
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5)
