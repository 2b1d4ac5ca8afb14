"""Single-objective runs pinned bit for bit: the per-step losses, the validation losses and a digest of the final
weights of tiny pretraining, SFT, DPO and blended runs, recorded before one run could mix objectives.

Anything that changes how a single-objective run samples, packs, normalizes or steps moves one of these. The
values are exact on the recording machine (2-core Intel Xeon KVM, torch 2.13.0+cpu, one thread); another CPU's
float rounding may move the last bits, which `UNITRAIN_PIN_TOLERANCE=1` accepts at rtol 1e-6 (the digests are
then skipped).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from unitrain.config import parse_config
from unitrain.train import train
from unitrain.train.metrics import read_metrics

from .conftest import tiny_raw
from .test_trainer import final_weights

TOLERANT = os.environ.get("UNITRAIN_PIN_TOLERANCE") == "1"


def weights_digest(output_dir) -> str:
    weights = final_weights(output_dir)
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].to(torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_record(output_dir) -> tuple[list[str], list[str], str]:
    rows = read_metrics(output_dir / "metrics.jsonl")
    losses = [float(r["loss"]).hex() for r in rows if "loss" in r]
    evals = [float(r["eval/loss"]).hex() for r in rows if "eval/loss" in r]
    return losses, evals, weights_digest(output_dir)


# name -> (objective, data fixtures, extra sections)
RUNS = {
    "pretrain": ("pretrain", ["pretrain_data"], {}),
    "sft": ("sft", ["sft_data"], {}),
    "dpo": ("dpo", ["preference_data"], {}),
    "dpo_groups_listwise": (
        "dpo",
        ["group_data"],
        {"dpo": {"loss": ["sigmoid", "plackett_luce"], "loss_weights": [1.0, 0.5], "group_pairs": "all"}},
    ),
    "sft_blend": ("sft", ["sft_data", "pretrain_data"], {}),
}

PINNED = {
    "pretrain": (
        [
            "0x1.f0c9e2ef3b3fcp+1",
            "0x1.c37050d79435ep+1",
            "0x1.a2f17926fabb8p+1",
            "0x1.845a41dbe241ep+1",
            "0x1.6943d33333333p+1",
            "0x1.5cbb7e613716bp+1",
        ],
        ["0x1.f1ec0e865ac7bp+1", "0x1.8b4ee4c415c99p+1", "0x1.60643677d46cfp+1"],
        "6c91d7bcb6ea5d55",
    ),
    "sft": (
        [
            "0x1.f13d8de5ab278p+1",
            "0x1.c31f56c797dd5p+1",
            "0x1.a3a109d89d89ep+1",
            "0x1.877d7566b9e2ap+1",
            "0x1.74133b13b13b1p+1",
            "0x1.6d42e30f9525dp+1",
        ],
        ["0x1.f27a478787878p+1", "0x1.85ba878787878p+1", "0x1.680c0b4b4b4b5p+1"],
        "7fa9e462392a6312",
    ),
    "dpo": (
        [
            "0x1.62e4300000000p-1",
            "0x1.49d37b13b13b1p-1",
            "0x1.3315624924925p-1",
            "0x1.1388d76276276p-1",
            "0x1.d4f43d89d89d9p-2",
            "0x1.e488d89d89d8ap-2",
        ],
        ["0x1.62e4300000000p-1", "0x1.2ad64aaaaaaabp-1", "0x1.177072aaaaaabp-1"],
        "695d162f8f13b3fa",
    ),
    "dpo_groups_listwise": (
        [
            "0x1.f22fd0ea0ea0ep+0",
            "0x1.1bc1a5af5af5bp+1",
            "0x1.edf2ca576a258p+0",
            "0x1.e7415e79e79e8p+0",
            "0x1.03a4431c71c72p+1",
            "0x1.1debfc1414141p+1",
        ],
        ["0x1.56cca416c16c2p+1", "0x1.48f48a2222222p+1", "0x1.42595c8888888p+1"],
        "996ad7f8b46aaae2",
    ),
    "sft_blend": (
        [
            "0x1.f19438e38e38ep+1",
            "0x1.c8861af286bcap+1",
            "0x1.a0c353bd02648p+1",
            "0x1.8737d46cefa8ep+1",
            "0x1.74b93eb1a1f59p+1",
            "0x1.6771ee9a18dabp+1",
        ],
        ["0x1.f21a55bddb40fp+1", "0x1.87047f63371eap+1", "0x1.642ca1af286bdp+1"],
        "1fd8b53e4ffcd79c",
    ),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_single_objective_runs_are_pinned(name, request, tmp_path):
    objective, fixtures, sections = RUNS[name]
    paths = [str(request.getfixturevalue(fixture)) for fixture in fixtures]
    raw = tiny_raw(objective, paths[0], tmp_path, run={"eval_every": 3}, **sections)
    if len(paths) > 1:  # a blend, weights 2:1
        raw["data"]["train"] = [{"path": path, "weight": w} for path, w in zip(paths, (2.0, 1.0))]
    train(parse_config(raw))
    losses, evals, digest = run_record(tmp_path)
    pinned_losses, pinned_evals, pinned_digest = PINNED[name]
    if TOLERANT:
        for got, pinned in ((losses, pinned_losses), (evals, pinned_evals)):
            np.testing.assert_allclose(
                [float.fromhex(x) for x in got], [float.fromhex(x) for x in pinned], rtol=1e-6
            )
        return
    assert (losses, evals, digest) == (pinned_losses, pinned_evals, pinned_digest)
