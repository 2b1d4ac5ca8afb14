"""The transformers backend under torchrun with 2 CPU processes (gloo): DDP and FSDP2 (each GPT-NeoX layer its
own unit) give the run of one process with the same global batch."""

from __future__ import annotations

import pytest

from unitrain.config import config_to_yaml

from .test_distributed import SECTIONS, assert_same_run, launch, one_process_run

MODEL = {
    "config": {
        "model_type": "gpt_neox",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rotary_pct": 0.5,
    }
}


@pytest.fixture(scope="module")
def one_process(preference_data, tmp_path_factory, tiny_config):
    return one_process_run(preference_data, tmp_path_factory, tiny_config, model=MODEL)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_gloo_ranks_match_one_process(fsdp, one_process, preference_data, tmp_path, tiny_config):
    batch = {"micro_batch_size": 1, "gradient_accumulation_steps": 2}
    sections = {"batch": batch, "parallel": {"fsdp": fsdp}, "model": MODEL, **SECTIONS}
    config = tiny_config("dpo", preference_data, tmp_path, **sections)
    (tmp_path / "run.yaml").write_text(config_to_yaml(config))
    launch(tmp_path / "run.yaml", 2)
    assert_same_run(tmp_path, one_process)
