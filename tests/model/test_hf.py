"""Hugging Face parity: logits equal to `transformers` in both directions, bit-exact weight round trips."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from unitrain.errors import UnitrainError
from unitrain.model import ModelConfig, build_model, from_pretrained, save_pretrained

SEQUENCE_LENGTH = 20  # longer than the Mistral window (8) and the llama3 original context (16)


def test_load_transformers_checkpoint_gives_same_logits(architecture, random_hf_model, tmp_path):
    reference = random_hf_model(architecture)
    reference.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    input_ids = torch.randint(0, reference.config.vocab_size, (3, SEQUENCE_LENGTH))
    with torch.no_grad():
        expected = reference(input_ids).logits  # (B, T, V)
        actual = model(input_ids)  # (B, T, V)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= 1e-4


def test_export_loads_in_transformers_with_same_logits(architecture, random_hf_model, tmp_path):
    config = ModelConfig.from_hf(random_hf_model(architecture).config.to_dict())
    torch.manual_seed(1)
    model = build_model(config).eval()
    save_pretrained(model, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reference).__name__ == config.architecture
    input_ids = torch.randint(0, config.vocab_size, (2, SEQUENCE_LENGTH))
    with torch.no_grad():
        assert (model(input_ids) - reference(input_ids).logits).abs().max() <= 1e-4


def test_import_then_export_is_bit_exact(architecture, random_hf_model, tmp_path):
    random_hf_model(architecture).save_pretrained(tmp_path / "hf")
    save_pretrained(from_pretrained(tmp_path / "hf"), tmp_path / "ours")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    exported = load_file(tmp_path / "ours" / "model.safetensors")
    if original.keys() != exported.keys():  # a tied checkpoint may or may not store lm_head.weight
        original.pop("lm_head.weight")
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name


def test_sharded_checkpoint_round_trip(random_hf_model, tmp_path):
    model = from_pretrained(_save(random_hf_model("qwen2"), tmp_path / "hf"))
    save_pretrained(model, tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = from_pretrained(tmp_path / "sharded")
    for (name, tensor), other in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(tensor, other), name
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    input_ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert (model(input_ids) - reference(input_ids).logits).abs().max() <= 1e-4


def test_dtype_and_tied_head(random_hf_model, tmp_path):
    model = from_pretrained(_save(random_hf_model("llama3-scaled-tied-bias"), tmp_path), dtype=torch.bfloat16)
    assert model.lm_head_weight.dtype == torch.bfloat16
    assert model.lm_head_weight.data_ptr() == model.embed.weight.data_ptr()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_loaded_weights_keep_no_mapping_of_the_checkpoint(random_hf_model, tmp_path):
    """A tensor read in the file's dtype is a view of safetensors' memory map; one such view kept by the model
    keeps the whole map, and every page read while loading (the q/k/v and gate/up parts of the fused weights
    too), resident for the model's life."""
    checkpoint = _save(random_hf_model("llama"), tmp_path)
    model = from_pretrained(checkpoint)
    assert model.embed.weight.dtype == torch.float32  # the file's dtype: the case that used to keep views
    gc.collect()
    assert str(checkpoint / "model.safetensors") not in Path("/proc/self/maps").read_text()


def test_unsupported_architecture_is_refused_in_one_line(random_hf_model, tmp_path):
    _save(random_hf_model("llama"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnitrainError) as error:
        from_pretrained(tmp_path, backend="native")
    message = str(error.value)
    assert "\n" not in message and "GPT2LMHeadModel" in message and "config.json" in message
    assert "model.backend transformers" in message
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert supported in message


def test_missing_tensor_and_bad_rope_type_are_named(random_hf_model, tmp_path):
    reference = random_hf_model("llama")
    state = {k: v for k, v in reference.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    reference.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(UnitrainError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(tmp_path)
    config = reference.config.to_dict() | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UnitrainError, match="rope_type 'yarn' is not supported"):
        ModelConfig.from_hf(config)


def test_parameter_count_and_flops_match_transformers(random_hf_model):
    reference = random_hf_model("qwen3")
    model = build_model(ModelConfig.from_hf(reference.config.to_dict()))
    assert model.num_parameters() == sum(p.numel() for p in reference.parameters())
    config = model.config
    matmul = model.num_parameters() - config.vocab_size * config.hidden_size
    assert model.flops_per_token(0) == 6 * matmul
    per_key = 12 * config.num_layers * config.num_heads * config.head_dim
    assert model.flops_per_token(10) - model.flops_per_token(0) == 10 * per_key


def _save(model, path):
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs low_freq_factor, high_freq_factor"),
        ({"rope_scaling": {"type": "linear"}}, "rope_scaling of type linear needs factor"),
        ({"hidden_size": "abc"}, "wrong type"),
        ({"rms_norm_eps": None}, "wrong type"),
        ({"head_dim": 0}, "head_dim must be positive"),
    ],
)
def test_bad_config_values_are_one_line_errors(changes, message):
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        **changes,
    }
    with pytest.raises(UnitrainError, match=message) as error:
        ModelConfig.from_hf(hf, source="run/config.json")
    assert str(error.value).startswith("run/config.json: ") and "\n" not in str(error.value)
