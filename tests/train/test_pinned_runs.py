"""Single-objective runs pinned bit for bit: the per-step losses, the validation losses and a digest of the final
weights of tiny pretraining, SFT, DPO, listwise-group and blended runs, recorded from the code before one run could
mix objectives (re-recorded from that code whenever it moves the floats, never from the mixing code).

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
from unitrain.train.logs.metrics import read_metrics

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
    "pretrain_blend": ("pretrain", ["pretrain_data", "sft_data"], {}),
}

PINNED = {
    "pretrain": (
        [
            "0x1.f0c9e2ef3b3fcp+1",
            "0x1.c37050d79435ep+1",
            "0x1.a2f17926fabb8p+1",
            "0x1.845a43fbc0440p+1",
            "0x1.6943d33333333p+1",
            "0x1.5cbb7e613716bp+1",
        ],
        ["0x1.f1ec0e865ac7bp+1", "0x1.8b4ee4c415c99p+1", "0x1.60643677d46cfp+1"],
        "a48471656d27fec6",
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
        "0dd4e11ccda8fd59",
    ),
    "dpo": (
        [
            "0x1.62e4300000000p-1",
            "0x1.49d37d89d89d9p-1",
            "0x1.3315600000000p-1",
            "0x1.1388d89d89d8ap-1",
            "0x1.d4f433b13b13bp-2",
            "0x1.e488d89d89d8ap-2",
        ],
        ["0x1.62e4300000000p-1", "0x1.2ad6480000000p-1", "0x1.1770715555555p-1"],
        "ae45cb65f8d7babb",
    ),
    "dpo_groups_listwise": (
        [
            "0x1.f22fd0ea0ea0ep+0",
            "0x1.1bc1a5af5af5bp+1",
            "0x1.edf2cf1f3831fp+0",
            "0x1.e7415e79e79e8p+0",
            "0x1.03a4441c71c72p+1",
            "0x1.1debfa1414141p+1",
        ],
        ["0x1.56cca416c16c2p+1", "0x1.48f487bbbbbbcp+1", "0x1.42595a2222222p+1"],
        "9e85b01bd243f170",
    ),
    "pretrain_blend": (
        [
            "0x1.f1a949c34115bp+1",
            "0x1.ba4dde49beaeep+1",
            "0x1.a322dfb0774d1p+1",
            "0x1.8dc3de49beaeep+1",
            "0x1.890284e6f1d6ap+1",
            "0x1.7b4ce69c8fde2p+1",
        ],
        ["0x1.f13fae4089ae4p+1", "0x1.8e9e089ae408ap+1", "0x1.70d02b06742b0p+1"],
        "423921f3224ab49f",
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
