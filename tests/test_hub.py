"""Hugging Face Hub ids (`org/name[@revision]`) as model paths, resolved offline from a cache laid out as
huggingface_hub lays it out: a local directory of the same name wins, a missing id is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unitrain.cli import main
from unitrain.errors import UnitrainError
from unitrain.files import resolve_model

MAIN, V2 = "a" * 40, "b" * 40  # commit hashes of two revisions
VOCAB = 61


def tiny_model(seed: int):
    from unitrain.model import ModelConfig, build_model

    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    return build_model(config)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """HF cache `models--org--tiny` with `main` and a `v2` branch, each its own snapshot; offline."""
    from huggingface_hub import constants

    from unitrain.model import save_pretrained

    repo = tmp_path / "hf-home" / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    for seed, (branch, commit) in enumerate((("main", MAIN), ("v2", V2))):
        (repo / "refs" / branch).write_text(commit)
        save_pretrained(tiny_model(seed), repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    return repo


def test_ids_resolve_from_the_cache_and_a_local_directory_wins(hub_cache, tmp_path, monkeypatch):
    assert resolve_model("org/tiny", "model.path") == str(hub_cache / "snapshots" / MAIN)
    assert resolve_model("org/tiny@v2", "model.path") == str(hub_cache / "snapshots" / V2)
    assert resolve_model(f"org/tiny@{V2}", "model.path") == str(hub_cache / "snapshots" / V2)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    assert resolve_model("org/tiny", "model.path") == "org/tiny"
    assert (
        resolve_model("no/such/path", "model.path") == "no/such/path"
    )  # not an id: the caller says what is wrong
    with pytest.raises(UnitrainError, match=r"^model.path org/other: neither a local directory nor a model found "
                       r"in the local Hugging Face cache \(HF_HUB_OFFLINE=1\)") as raised:  # fmt: skip
        resolve_model("org/other", "model.path")
    assert "\n" not in str(raised.value)
    with pytest.raises(UnitrainError, match="org/tiny@v3: neither"):
        resolve_model("org/tiny@v3", "model.path")


def test_train_and_score_take_hub_ids(hub_cache, tmp_path, capsys):
    from unitrain.config import parse_config
    from unitrain.data.memmap import write_dataset
    from unitrain.data.sample import GPTSample
    from unitrain.train import train
    from unitrain.train.checkpoint import latest_checkpoint

    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(8):
        tokens = rng.integers(1, VOCAB, size=12)
        pairs.append(GPTSample(tokens, chosen_span=(4, 8), rejected_span=(8, 12)))
    write_dataset(tmp_path / "pairs", pairs, "preference", vocab_size=VOCAB, eos_id=0)
    raw = {
        "objective": "dpo",
        "model": {"path": "org/tiny"},
        "dpo": {"reference_model": "org/tiny@v2"},
        "data": {"train": str(tmp_path / "pairs")},
        "packing": {"sequence_length": 32},
        "batch": {"micro_batch_size": 2},
        "train": {"max_steps": 1, "device": "cpu"},
        "run": {"output_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }
    result = train(parse_config(raw))
    assert result.steps == 1
    meta = json.loads((latest_checkpoint(tmp_path / "run") / "meta.json").read_text())
    assert meta["model_path"] == str(hub_cache / "snapshots" / MAIN)
    argv = ["score", "--model", "org/tiny", "--reference", "org/tiny@v2", "--data", str(tmp_path / "pairs")]
    assert main([*argv, "--output", str(tmp_path / "scores.jsonl")]) == 0
    assert main([*argv[:2], "org/missing", *argv[3:], "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "--model org/missing: neither a local directory" in capsys.readouterr().err
    with pytest.raises(UnitrainError, match="^model.path org/missing: neither"):
        train(
            parse_config(
                {
                    **raw,
                    "model": {"path": "org/missing"},
                    "run": {**raw["run"], "output_dir": str(tmp_path / "r2")},
                }
            )
        )
    assert not (tmp_path / "r2").exists()
