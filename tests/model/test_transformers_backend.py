"""The transformers backend against plain `transformers` (eager attention) run on each sequence alone, fp32.

For every architecture of `transformers_configs.ARCHITECTURES`: the per-response log-probs in every DPO layout
(packed with a shared prompt, packed, pair, separate) and the gradients of a DPO loss; a pretraining and an SFT step
(loss and gradients) on packed documents; all equal to the same computation on unpacked sequences."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from unitrain.errors import UnitrainError
from unitrain.losses.preference import PreferenceLossConfig, preference_losses
from unitrain.train.policy import PolicyLogprobs
from unitrain.train.step.reference import pair_logps_of

from ..preference.conftest import (
    ListDataset,
    packed_batch,
    random_documents,
    random_pairs,
    standalone_pair_logps,
)
from .transformers_configs import ARCHITECTURES, build, twin_logits

LAYOUTS = list(itertools.product(("packed", "pair", "separate"), (True, False)))
LAYOUTS.remove(("separate", False))  # separate rows never share a prompt: one case is enough
CONFIG = PreferenceLossConfig(["sigmoid"], beta=0.5)


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().clamp(min=1e-12)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(scale))


def gradients(module: torch.nn.Module, loss: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    module.zero_grad()
    loss.backward()
    return {
        name.removeprefix(prefix): p.grad.clone()
        for name, p in module.named_parameters()
        if p.grad is not None
    }


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, especially on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def models(request):
    return build(request.param)


@pytest.fixture(scope="module")
def pairs():
    return ListDataset(random_pairs(7, seed=21, prompt=(2, 9), response=(1, 7)), "preference")


def test_dpo_logps_and_gradients_match_each_sequence_alone(models, pairs):
    model, twin = models
    reference = torch.randn(len(pairs), 2, generator=torch.Generator().manual_seed(1)) - 20
    forward = twin_logits(twin)
    expected = torch.stack([standalone_pair_logps(forward, pairs[i]) for i in range(len(pairs))])  # (P, 2)
    counts = torch.tensor([[len(s.chosen_ids), len(s.rejected_ids)] for s in pairs.samples])
    expected_losses = preference_losses(expected, reference, counts, CONFIG).losses
    expected_grads = gradients(twin, expected_losses.mean())
    for mode, share_prompt in LAYOUTS:
        batch = packed_batch(pairs, mode, share_prompt, sequence_length=40)
        sums, batch_counts = pair_logps_of(model, batch)
        order = batch.group_index.argsort()
        close(sums[order].detach(), expected.detach())
        losses = preference_losses(sums[order], reference, batch_counts[order], CONFIG).losses
        grads = gradients(model, losses.mean(), prefix="hf.")
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            close(grad, expected_grads[name])


def _lm_batch(dataset, objective: str):
    from unitrain.data.batches.collate import collate
    from unitrain.data.epoch.plan import plan_rows

    layout = {"objective": objective, "mode": "packed", "share_prompt": False}
    plan = plan_rows(dataset, range(len(dataset)), sequence_length=48, **layout)
    return collate(dataset, plan, range(len(plan)), **layout)


@pytest.mark.parametrize("objective", ["pretrain", "sft"])
def test_pretraining_and_sft_step_match_unpacked_documents(models, objective):
    model, twin = models
    samples = random_documents(9, seed=5, length=(2, 20), spans=objective == "sft")
    dataset = ListDataset(samples, "sft" if objective == "sft" else "pretraining")
    batch = _lm_batch(dataset, objective)
    assert batch.num_rows < len(samples)  # documents really share rows
    total, count = 0.0, 0
    for sample in samples:  # each document alone: every token after the first, outside its masked spans
        ids = torch.as_tensor(np.asarray(sample.token_ids), dtype=torch.int64)[None]
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        keep[0] = False
        for begin, end in sample.loss_masking_spans if sample.loss_masking_spans is not None else ():
            keep[begin:end] = False
        logps = torch.log_softmax(twin(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None]).squeeze(1)
        total, count = total - logps[keep[1:]].sum(), count + int(keep.sum())
    expected_loss = total / count
    expected_grads = gradients(twin, expected_loss)
    policy = PolicyLogprobs(model, chunk_size=16)  # several chunks of the head
    logps = policy(batch)
    assert logps.shape[0] == count
    loss = -logps.sum() / count
    close(loss.detach(), expected_loss.detach())
    grads = gradients(model, loss, prefix="hf.")
    for name, grad in grads.items():
        close(grad, expected_grads[name])


def test_activation_checkpointing_gives_the_same_gradients(pairs):
    model, _ = build("gemma2")
    batch = packed_batch(pairs, "packed", True, sequence_length=40)
    policy = PolicyLogprobs(model, chunk_size=64)
    model.train()
    expected = gradients(model, policy(batch).sum())
    model.gradient_checkpointing = True
    assert model.hf.is_activation_checkpointing
    grads = gradients(model, policy(batch).sum())
    for name, grad in grads.items():
        close(grad, expected[name])


def test_what_cannot_be_trained_exactly_is_refused_in_one_line():
    from unitrain.model.hf_backend.build import build_hf_model, resolve_backend

    cases = {
        "t5": (dict(model_type="t5"), "encoder-decoder"),
        "bert": (dict(architectures=["BertForMaskedLM"]), "not a causal LM"),
        "llava": (dict(model_type="llava"), "vision-language"),
        "falcon_h1": (dict(model_type="falcon_h1", **_small()), "not attention"),
        "lfm2": (dict(model_type="lfm2", **_small()), "not attention"),
        "unknown": (dict(architectures=["NoSuchForCausalLM"]), "not a model transformers knows"),
    }
    for name, (config, words) in cases.items():
        with pytest.raises(UnitrainError, match=words) as error:
            build_hf_model(config)
        assert "\n" not in str(error.value), name
    with pytest.raises(UnitrainError, match="model.backend native implements .*GPT2LMHeadModel"):
        resolve_backend({"architectures": ["GPT2LMHeadModel"]}, "native", "model.config")
    assert resolve_backend({"architectures": ["GPT2LMHeadModel"]}, "auto", "x") == "transformers"
    assert resolve_backend(dict(model_type="llama", **_small()), "auto", "x") == "native"
    yarn = dict(model_type="qwen2", **_small(), rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert resolve_backend(yarn, "auto", "x") == "transformers"  # a feature the native decoder lacks
    incomplete = {key: value for key, value in _small().items() if key != "hidden_size"}
    assert (
        resolve_backend(dict(model_type="llama", **incomplete), "auto", "x") == "native"
    )  # its error names the field


def test_the_probe_catches_a_layer_that_mixes_the_row(monkeypatch):
    """Without the config check, Falcon-H1's Mamba layers are caught by the packed-vs-alone probe."""
    from unitrain.model.hf_backend import build as transformers_backend

    monkeypatch.setattr(transformers_backend, "check_config", lambda *args: None)
    config = dict(model_type="falcon_h1", **_small())
    with pytest.raises(UnitrainError, match="a layer mixes the documents of a row"):
        transformers_backend.build_hf_model(config)


def _small() -> dict:
    return {key: value for key, value in ARCHITECTURES["llama"].items() if key != "model_type"}


@pytest.mark.parametrize("architecture", ["gemma2", "qwen2_moe"])
def test_attention_backends_agree_inside_a_transformers_model(architecture, pairs):
    """dense (one (T, T) mask) = blocks on soft-capped, scaled, windowed layers; flex is checked in test_cuda."""
    model, _ = build(architecture)
    batch = packed_batch(pairs, "packed", True, sequence_length=40)
    hidden = {}
    for backend in ("dense", "blocks"):
        model.attention_backend = backend
        with torch.no_grad():
            hidden[backend] = model.hidden_states(batch)[batch.document_id >= 0]
    close(hidden["blocks"], hidden["dense"])


def test_remote_code_runs_only_when_allowed(tmp_path):
    import json

    from unitrain.model import from_pretrained

    model, _ = build("olmo2")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnitrainError, match="set model.trust_remote_code: true") as error:
        from_pretrained(tmp_path)
    assert "\n" not in str(error.value) and "config.json" in str(error.value)
