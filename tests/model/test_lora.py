"""LoRA on the fused decoder against `peft` on the same `transformers` model: forward, gradients, adapter files,
PEFT's initialization, the adapter-off reference (bit-exact with the base), checkpointing, bf16 and merging."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

from unitrain.errors import UnitrainError
from unitrain.model import from_pretrained
from unitrain.model.adapter import load_adapter, load_merged, peft_name, read_adapter_config, save_adapter
from unitrain.model.lora import (
    LORA_TARGET_MODULES,
    adapter_state_dict,
    apply_lora,
    keep_as_reference,
    lora_linears,
    merge_lora,
    reference_adapters,
)

RANK, ALPHA = 4, 8.0


def lora_model(path, targets=LORA_TARGET_MODULES, seed=0, dtype=None):
    """Our model from a checkpoint with adapters whose B is random too, so that every adapter changes the output."""
    model = from_pretrained(path, dtype=dtype)
    apply_lora(model, RANK, ALPHA, 0.0, list(targets), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in adapter_state_dict(model).items():
            if ".lora_B." in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model


def peft_twin(hf_model, ours, targets=LORA_TARGET_MODULES):
    """`peft` LoRA on the transformers model, holding our adapter values under PEFT's names."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets))
    twin = get_peft_model(hf_model, config)
    state = {peft_name(name): tensor.detach().clone() for name, tensor in adapter_state_dict(ours).items()}
    result = set_peft_model_state_dict(twin, state)
    assert not [key for key in result.missing_keys if "lora_" in key] and not result.unexpected_keys
    return twin


@pytest.mark.parametrize(
    "targets", [LORA_TARGET_MODULES, ("k_proj", "up_proj", "o_proj")], ids=["all", "some"]
)
def test_forward_and_gradients_equal_peft(architecture, random_hf_model, tmp_path, targets):
    hf_model = random_hf_model(architecture)
    hf_model.save_pretrained(tmp_path)
    ours = lora_model(tmp_path, targets)
    twin = peft_twin(hf_model, ours, targets)
    input_ids = torch.randint(0, hf_model.config.vocab_size, (2, 20))
    ours_logits, peft_logits = ours(input_ids), twin(input_ids).logits  # (B, T, V), |logits| ~ 3
    torch.testing.assert_close(ours_logits, peft_logits, rtol=1e-5, atol=1e-5)
    weights = torch.randn(ours_logits.shape, generator=torch.Generator().manual_seed(2))
    (ours_logits * weights).sum().backward()
    (peft_logits * weights).sum().backward()
    peft_params = dict(twin.named_parameters())
    checked = 0
    for name, tensor in adapter_state_dict(ours).items():
        expected = peft_params[peft_name(name).replace(".weight", ".default.weight")].grad
        scale = float(expected.abs().max())  # 1e-5 relative to the gradient's own size (up to ~100 here)
        torch.testing.assert_close(tensor.grad, expected, rtol=1e-5, atol=1e-5 * scale, msg=name)
        checked += 1
    assert checked == 2 * len(targets) * hf_model.config.num_hidden_layers
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)  # the base is frozen


def test_fresh_adapter_is_peft_default_and_leaves_the_model_unchanged(random_hf_model, tmp_path):
    random_hf_model("qwen3").save_pretrained(tmp_path)
    base, model = from_pretrained(tmp_path), from_pretrained(tmp_path)
    apply_lora(model, 16, 32.0, 0.0, list(LORA_TARGET_MODULES), seed=3)
    input_ids = torch.randint(0, base.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids), base(input_ids))
    for name, tensor in adapter_state_dict(model).items():
        if ".lora_B." in name:
            assert not tensor.any(), name
            continue
        # PEFT: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)); std = bound / sqrt(3)
        bound = 1 / math.sqrt(tensor.shape[1])
        assert tensor.dtype == torch.float32 and tensor.abs().max() <= bound
        assert tensor.abs().max() > 0.9 * bound and abs(tensor.std() / (bound / math.sqrt(3)) - 1) < 0.15
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == set(adapter_state_dict(model))


def test_same_seed_same_adapters_different_seed_different():
    from unitrain.model import ModelConfig, build_model

    config = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    states = []
    for seed in (5, 5, 6):
        model = build_model(config)
        apply_lora(model, 2, 4.0, 0.0, ["q_proj"], seed=seed)
        states.append(adapter_state_dict(model)["layers.0.attention.qkv.lora_A.q_proj"])
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])


def test_adapters_off_is_the_base_bit_for_bit(random_hf_model, tmp_path, make_batch):
    random_hf_model("llama3-scaled-tied-bias").save_pretrained(tmp_path)
    base, model = from_pretrained(tmp_path), lora_model(tmp_path)
    batch = make_batch([[(list(range(3, 15)), "pair:5:4"), (list(range(20, 27)), "plain")]])
    input_ids = torch.randint(0, base.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert not torch.equal(model.hidden_states(batch), base.hidden_states(batch))
        with reference_adapters(model):
            assert torch.equal(model.hidden_states(batch), base.hidden_states(batch))
            assert torch.equal(model(input_ids), base(input_ids))
        keep_as_reference(model)  # a run that starts from these adapters: they are its reference
        adapted = model.hidden_states(batch)
        for tensor in adapter_state_dict(model).values():
            tensor.mul_(2.0)  # the trainable copy moves on; the reference does not
        with reference_adapters(model):
            assert torch.equal(model.hidden_states(batch), adapted)
        assert not torch.equal(model.hidden_states(batch), adapted)


def test_activation_checkpointing_gives_the_same_values_and_gradients(random_hf_model, tmp_path, make_batch):
    random_hf_model("qwen2").save_pretrained(tmp_path)
    batch = make_batch([[(list(range(3, 15)), "pair:5:4")], [(list(range(30, 40)), "plain")]])
    results = []
    for checkpointing in (False, True):
        model = lora_model(tmp_path).train()
        model.gradient_checkpointing = checkpointing
        hidden = model.hidden_states(batch)  # (R, T, D)
        hidden.pow(2).sum().backward()
        results.append((hidden.detach(), {n: t.grad for n, t in adapter_state_dict(model).items()}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_base_under_autocast_trains_fp32_adapters(random_hf_model, tmp_path):
    random_hf_model("mistral-window").save_pretrained(tmp_path)
    input_ids = torch.randint(0, 160, (2, 16))
    full = lora_model(tmp_path)
    reference_loss = full(input_ids).float().logsumexp(-1).mean()
    model = lora_model(tmp_path, dtype=torch.bfloat16)  # the frozen base stored in bf16, adapters fp32
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(input_ids).float().logsumexp(-1).mean()
    loss.backward()
    torch.testing.assert_close(loss, reference_loss, rtol=2e-2, atol=2e-2)
    for name, tensor in adapter_state_dict(model).items():
        assert tensor.dtype == tensor.grad.dtype == torch.float32 and tensor.grad.isfinite().all(), name
    assert any(tensor.grad.abs().sum() > 0 for tensor in adapter_state_dict(model).values())


def test_merged_model_computes_what_the_adapters_do(random_hf_model, tmp_path):
    random_hf_model("qwen3").save_pretrained(tmp_path)
    model = lora_model(tmp_path, targets=("q_proj", "v_proj", "gate_proj", "down_proj"))
    input_ids = torch.randint(0, 160, (2, 14))
    with torch.no_grad():
        expected = model(input_ids)
        merged = merge_lora(model)
        assert not adapter_state_dict(merged)
        torch.testing.assert_close(merged(input_ids), expected, rtol=1e-5, atol=1e-5)


def test_adapter_directory_loads_in_peft_and_back(random_hf_model, tmp_path):
    hf_model = random_hf_model("llama")
    hf_model.save_pretrained(tmp_path / "base")
    ours = lora_model(tmp_path / "base", targets=("q_proj", "k_proj", "down_proj"))
    save_adapter(
        adapter_state_dict(ours),
        tmp_path / "adapter",
        rank=RANK,
        alpha=ALPHA,
        dropout=0.0,
        target_modules=["q_proj", "k_proj", "down_proj"],
        base_model=str(tmp_path / "base"),
    )
    twin = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    input_ids = torch.randint(0, 160, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids).logits, ours(input_ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            load_merged(tmp_path / "adapter")(input_ids), ours(input_ids), rtol=1e-5, atol=1e-5
        )
    other = from_pretrained(tmp_path / "base")
    apply_lora(other, RANK, ALPHA, 0.0, ["q_proj", "k_proj", "down_proj"], seed=9)
    load_adapter(other, tmp_path / "adapter")
    for name, tensor in adapter_state_dict(ours).items():
        assert torch.equal(adapter_state_dict(other)[name], tensor), name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"target_modules": "q_proj|v_proj"}, "target_modules must be a list"),
        ({"peft_type": "IA3"}, "only LORA adapters"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target module 'lm_head' is not supported"),
        ({"r": 0}, "r must be a positive number"),
        (["LORA"], "expected a JSON object, found list"),
    ],
)
def test_unsupported_adapter_configs_are_one_line_errors(tmp_path, changes, message):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    config = changes if isinstance(changes, list) else {**config, **changes}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UnitrainError, match=message) as error:
        read_adapter_config(tmp_path)
    assert "\n" not in str(error.value) and "adapter_config.json" in str(error.value)


def test_dropout_acts_on_the_adapters_in_training_only(random_hf_model, tmp_path):
    random_hf_model("llama").save_pretrained(tmp_path)
    model, base = lora_model(tmp_path), from_pretrained(tmp_path)
    for module in lora_linears(model).values():
        module.dropout = 0.5
    input_ids = torch.randint(0, 160, (2, 12))
    with torch.no_grad():
        expected = model.eval()(input_ids)
        model.train()
        first, second = model(input_ids), model(input_ids)
        assert not torch.equal(first, second) and not torch.equal(first, expected)
        with reference_adapters(model):  # the reference never drops anything
            assert torch.equal(model(input_ids), base(input_ids))
        assert torch.equal(model.eval()(input_ids), expected)
