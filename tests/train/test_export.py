"""Exports a user loads elsewhere: BOS/EOS of the dataset's tokenizer in config.json and generation_config.json,
file modes that follow the umask (weights included), and an existing output replaced only with --overwrite."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from unitrain.cli import main
from unitrain.data.memmap.writer import write_dataset
from unitrain.data.sample import GPTSample
from unitrain.train import train

from .conftest import VOCAB


@pytest.fixture(scope="module")
def bos_eos_data(tmp_path_factory):
    """Pretraining documents that start with BOS (1) and end with EOS (2)."""
    rng = np.random.default_rng(5)
    docs = [GPTSample(np.concatenate([[1], rng.integers(3, VOCAB, size=12), [2]])) for _ in range(16)]
    path = tmp_path_factory.mktemp("export") / "data"
    return write_dataset(path, docs, "pretraining", vocab_size=VOCAB, bos_id=1, eos_id=2)


@pytest.fixture(scope="module")
def trained_run(bos_eos_data, tmp_path_factory, tiny_config):
    output = tmp_path_factory.mktemp("run")
    train(tiny_config("pretrain", bos_eos_data, output, data={"validation": None}, train={"max_steps": 2}))
    return output


@pytest.mark.parametrize("export", ["initial", "hf", "cli"])
def test_a_random_start_exports_the_dataset_bos_and_eos(trained_run, tmp_path, export):
    from transformers import AutoConfig, GenerationConfig

    directory = trained_run / export
    if export == "cli":
        directory = tmp_path / "exported"
        assert main(["export", str(trained_run), "--output", str(directory)]) == 0
    config = AutoConfig.from_pretrained(directory)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    generation = GenerationConfig.from_pretrained(directory)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)


@pytest.mark.parametrize("lora", [{}, {"rank": 4}], ids=["full", "lora"])
def test_every_file_of_a_run_follows_the_umask(lora, preference_data, tmp_path, tiny_config):
    previous = os.umask(0o027)
    try:
        config = tiny_config(
            "dpo", preference_data, tmp_path / "run", dpo={"reference": "cached"}, run={"save_every": 1},
            lora=lora,
        )  # fmt: skip
        train(config)
        assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "exported")]) == 0
    finally:
        os.umask(previous)
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    names = {path.name for path in files}
    assert {"model.safetensors", "reference_logps.safetensors", "generation_config.json"} <= names
    assert not lora or "adapter_model.safetensors" in names
    modes = {str(path.relative_to(tmp_path)): oct(stat.S_IMODE(path.stat().st_mode)) for path in files}
    assert modes == dict.fromkeys(modes, oct(0o640))


def test_export_replaces_an_existing_output_only_with_overwrite(trained_run, tmp_path, capsys):
    output = tmp_path / "exported"
    output.mkdir()
    (output / "model-00001-of-00002.safetensors").write_text("a shard of an older, larger export")
    assert main(["export", str(trained_run), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {output} already exists; pass --overwrite to replace it\n"
    assert os.listdir(output) == ["model-00001-of-00002.safetensors"]
    assert main(["export", str(trained_run), "--output", str(output), "--overwrite"]) == 0
    assert "model-00001-of-00002.safetensors" not in os.listdir(output)
    assert json.loads((output / "config.json").read_text())["eos_token_id"] == 2
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")], "no staging directory left"


def test_a_checkpoint_start_keeps_its_own_generation_config(bos_eos_data, tmp_path, tiny_config):
    """An instruct model's generation_config.json (several EOS ids, sampling defaults) survives training."""
    import torch

    from unitrain.model import ModelConfig, build_model, save_pretrained

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4)
    save_pretrained(build_model(config), tmp_path / "start")
    generation = {"bos_token_id": 1, "eos_token_id": [2, 5], "temperature": 0.6, "top_p": 0.9}
    (tmp_path / "start" / "generation_config.json").write_text(json.dumps(generation))
    run = tmp_path / "run"
    start = {"path": str(tmp_path / "start"), "config": None}
    settings = dict(model=start, data={"validation": None}, train={"max_steps": 2})
    train(tiny_config("pretrain", bos_eos_data, run, **settings))
    assert json.loads((run / "hf" / "generation_config.json").read_text()) == generation
    assert main(["export", str(run), "--output", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text()) == generation
