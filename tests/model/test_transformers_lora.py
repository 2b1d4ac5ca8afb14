"""LoRA on the transformers backend, on two architectures the native decoder does not implement: the adapters-off
model is the base bit for bit, logits and adapter gradients equal `peft`'s on the same transformers model, the
adapter directory loads in `peft`, and the merged model loads in `transformers`."""

from __future__ import annotations

import pytest
import torch

from unitrain.errors import UnitrainError
from unitrain.model.adapter import save_adapter
from unitrain.model.lora import adapter_state_dict, apply_lora, merge_lora, reference_adapters

from .transformers_configs import build

TARGETS = {
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "olmo2": ["q_proj", "v_proj", "o_proj", "up_proj"],
}
RANK, ALPHA = 4, 8.0


@pytest.fixture(params=list(TARGETS))
def lora_model(request):
    model, twin = build(request.param, seed=3)
    return request.param, model, twin


def _randomize_adapters(model) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)


def test_adapters_match_peft_and_switch_off_to_the_base(lora_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    name, model, twin = lora_model
    ids = torch.randint(1, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids)
    adapters = apply_lora(model, RANK, ALPHA, 0.0, TARGETS[name], seed=1)
    assert adapters and all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    _randomize_adapters(model)
    with torch.no_grad(), reference_adapters(model):
        assert torch.equal(model(ids), base)  # the DPO reference: no second model, bit for bit

    peft_model = get_peft_model(twin, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[name]))
    theirs = {
        key.replace(".default", ""): value for key, value in peft_model.named_parameters() if "lora_" in key
    }
    ours = adapter_state_dict(model)
    from unitrain.model.adapter import peft_name

    assert sorted(peft_name(key).removesuffix(".weight") + ".weight" for key in ours) == sorted(theirs)
    with torch.no_grad():
        for key, tensor in ours.items():
            theirs[peft_name(key)].copy_(tensor)
    logits, expected = model(ids), peft_model(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    logits.square().mean().backward()
    expected.square().mean().backward()
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor.grad, theirs[peft_name(key)].grad, rtol=1e-4, atol=1e-6)


def test_the_adapter_export_loads_in_peft_and_the_merge_in_transformers(lora_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name, model, _ = lora_model
    model.save_pretrained(tmp_path / "base")
    apply_lora(model, RANK, ALPHA, 0.0, TARGETS[name], seed=1)
    _randomize_adapters(model)
    save_adapter(
        adapter_state_dict(model), tmp_path / "adapter", rank=RANK, alpha=ALPHA, dropout=0.0,
        target_modules=TARGETS[name], base_model=str(tmp_path / "base"),
    )  # fmt: skip
    ids = torch.randint(1, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        loaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
        )
        torch.testing.assert_close(loaded(ids).logits, ours, rtol=1e-5, atol=1e-5)
        merge_lora(model).save_pretrained(tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(merged(ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_targets_the_model_lacks_are_named():
    model, _ = build("gpt_neox")
    with pytest.raises(
        UnitrainError,
        match="unknown LoRA target module 'q_proj' for GPTNeoXForCausalLM; valid: .*query_key_value",
    ):
        apply_lora(model, RANK, ALPHA, 0.0, ["q_proj"])
