"""The training loop on tiny synthetic data: global normalization, validation against `transformers`, pinned
LM/SFT losses, non-finite steps, objective/dataset checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from unitrain.config import parse_config
from unitrain.data.batches.stream import split_indices
from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.errors import UnitrainError
from unitrain.train import train
from unitrain.train.checkpoint import latest_checkpoint
from unitrain.train.logs.metrics import read_metrics

from .conftest import tiny_raw


def step_losses(output_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(output_dir / "metrics.jsonl") if "loss" in row]


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(output_dir) / "model.safetensors"))


GROUP_LOSSES = {
    "dpo": {"loss": ["sigmoid", "plackett_luce"], "loss_weights": [1.0, 0.5], "group_pairs": "all"}
}


@pytest.mark.parametrize("objective", ["pretrain", "dpo", "dpo-groups"])
def test_accumulation_gives_the_big_batch_gradient(
    objective, pretrain_data, preference_data, group_data, tmp_path, tiny_config
):
    """2 micro-batches of 2 rows == 1 micro-batch of 4 rows: the loss is normalized by the step's global count,
    not averaged per micro-batch (micro-batches here hold different numbers of targets/pairs/groups)."""
    data = {"pretrain": pretrain_data, "dpo": preference_data, "dpo-groups": group_data}[objective]
    sections = GROUP_LOSSES if objective == "dpo-groups" else {}
    objective = objective.removesuffix("-groups")
    accumulated = tiny_config(
        objective,
        data,
        tmp_path / "a",
        batch={"micro_batch_size": 2, "gradient_accumulation_steps": 2},
        **sections,
    )
    big = tiny_config(
        objective,
        data,
        tmp_path / "b",
        batch={"micro_batch_size": 4, "gradient_accumulation_steps": 1},
        **sections,
    )
    train(accumulated)
    train(big)
    np.testing.assert_allclose(step_losses(tmp_path / "a"), step_losses(tmp_path / "b"), rtol=1e-5)
    # groups order their responses by score per micro-batch, so the float sums differ in the last bits; Adam
    # then magnifies that in coordinates whose gradient is near 0 (losses agree to ~1e-7)
    atol = 5e-5 if sections else 1e-5
    for name, tensor in final_weights(tmp_path / "a").items():
        torch.testing.assert_close(tensor, final_weights(tmp_path / "b")[name], rtol=1e-4, atol=atol)


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def _token_logps(model, tokens: np.ndarray) -> torch.Tensor:
    """log p(tokens[t] | tokens[:t]) for t >= 1, from the transformers model: (L - 1,)."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]  # (1, L)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()  # (L - 1, V)
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]


@pytest.mark.parametrize("objective, row", [("pretrain", 64), ("sft", 64), ("sft", 16)])
def test_validation_loss_matches_transformers(objective, row, pretrain_data, sft_data, tmp_path, tiny_config):
    """Every held-out document is evaluated, also an SFT document longer than a training row (16 slots)."""
    data = sft_data if objective == "sft" else pretrain_data
    result = train(tiny_config(objective, data, tmp_path, packing={"sequence_length": row}))
    model = _hf_model(tmp_path / "hf")
    dataset = GPTMemmapDataset(data)
    _, held_out = split_indices(len(dataset), 0.125, seed=0)
    assert row == 64 or (dataset.document_lengths[held_out] > row).any()
    total, count = 0.0, 0
    for index in held_out:
        sample = dataset[int(index)]
        logps = _token_logps(model, sample.token_ids)  # (L - 1,) predicting tokens 1..L-1
        keep = np.ones(len(sample.token_ids), dtype=bool)
        keep[0] = False
        if sample.loss_masking_spans is not None:
            for begin, end in sample.loss_masking_spans:
                keep[begin:end] = False
        total -= float(logps[torch.as_tensor(keep[1:])].sum())
        count += int(keep.sum())
    assert result.last_metrics["eval/loss"] == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("row, share_prompt", [(64, True), (16, True), (16, False)])
def test_dpo_validation_metrics_match_transformers(row, share_prompt, preference_data, tmp_path, tiny_config):
    """Every held-out pair is evaluated, also those longer than a training row (16 slots)."""
    beta = 0.2
    packing = {"sequence_length": row, "share_prompt": share_prompt}
    result = train(tiny_config("dpo", preference_data, tmp_path, dpo={"beta": beta}, packing=packing))
    policy, reference = _hf_model(tmp_path / "hf"), _hf_model(tmp_path / "initial")
    dataset = GPTMemmapDataset(preference_data)
    _, held_out = split_indices(len(dataset), 0.125, seed=0)
    assert row == 64 or (dataset.document_lengths[held_out] > row).any()
    margins, losses, chosen_logps = [], [], []
    for index in held_out:
        sample = dataset[int(index)]
        prompt = len(sample.prompt_ids)
        rewards = []
        for which, response in enumerate((sample.chosen_ids, sample.rejected_ids)):
            tokens = np.concatenate([sample.prompt_ids, response])
            sums = [float(_token_logps(m, tokens)[prompt - 1 :].sum()) for m in (policy, reference)]
            rewards.append(beta * (sums[0] - sums[1]))
            if which == 0:
                chosen_logps.append(sums[0])
        margins.append(rewards[0] - rewards[1])
        losses.append(-F.logsigmoid(torch.tensor(margins[-1])).item())
    metrics = result.last_metrics
    assert metrics["eval/loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    assert metrics["eval/rewards/margins"] == pytest.approx(np.mean(margins), rel=1e-3, abs=1e-5)
    assert metrics["eval/rewards/accuracies"] == pytest.approx(np.mean(np.array(margins) > 0))
    assert metrics["eval/logps/chosen"] == pytest.approx(np.mean(chosen_logps), rel=1e-4)
    assert metrics["eval/pairs"] == len(held_out)


# Per-step losses of a fixed tiny setup, recorded when the trainer landed: preference (DPO) work must not move them.
PINNED = {
    "pretrain": [3.881161, 3.526865, 3.272994, 3.034004, 2.822383, 2.724472],
    "sft": [3.884691, 3.524394, 3.278352, 3.058516, 2.906837, 2.853604],
}


@pytest.mark.parametrize("objective", ["pretrain", "sft"])
def test_lm_and_sft_losses_are_pinned(objective, pretrain_data, sft_data, tmp_path, tiny_config):
    data = sft_data if objective == "sft" else pretrain_data
    train(tiny_config(objective, data, tmp_path))
    losses = step_losses(tmp_path)
    np.testing.assert_allclose(losses, PINNED[objective], rtol=1e-5)
    assert losses[-1] < losses[0] - 0.3  # and it learns


# Per-step losses and validation losses (steps 3 and 6) of DPO runs on the tiny pair data, recorded before
# preference groups existed: pairs must train exactly as they did (on the recording machine they reproduce bit
# for bit; the tolerance only allows another CPU's float rounding).
PINNED_DPO = {
    "packed": (
        {},
        [
            0.6931471824645996,
            0.6441915952242337,
            0.5997725214276995,
            0.538153391617995,
            0.4579629531273475,
            0.47317827664888823,
        ],
        [0.5836661656697592, 0.5457797845204672],
    ),
    "separate": (
        {"packing": {"mode": "separate"}},
        [
            0.6931471824645996,
            0.6783708930015564,
            0.6750184297561646,
            0.646634578704834,
            0.619796872138977,
            0.588278591632843,
        ],
        [0.6511950890223185, 0.6281673908233643],
    ),
    "pair_unshared": (
        {"packing": {"mode": "pair", "share_prompt": False}},
        [
            0.6931471824645996,
            0.653116762638092,
            0.6568812727928162,
            0.6525859236717224,
            0.6581156253814697,
            0.637509822845459,
        ],
        [0.6509548425674438, 0.645976185798645],
    ),
    "cached_sft": (
        {"dpo": {"loss": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "reference": "cached"}},
        [
            2.6354220708211265,
            2.433476814856896,
            2.3079556056431363,
            2.194157967200646,
            2.0787567725548377,
            1.9706294719989483,
        ],
        [2.248304843902588, 2.077373663584391],
    ),
}


@pytest.mark.parametrize("layout", list(PINNED_DPO))
def test_dpo_on_pairs_is_pinned(layout, preference_data, tmp_path, tiny_config):
    sections, losses, evals = PINNED_DPO[layout]
    train(tiny_config("dpo", preference_data, tmp_path, run={"eval_every": 3}, **sections))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    np.testing.assert_allclose(step_losses(tmp_path), losses, rtol=1e-6)
    np.testing.assert_allclose(
        [r["eval/loss"] for r in rows if "eval/loss" in r and r["step"] > 0], evals, rtol=1e-6
    )


def test_nonfinite_steps_are_skipped_then_stop(pretrain_data, tmp_path, monkeypatch, tiny_config):
    import unitrain.losses.lm as lm

    real = lm.lm_loss_sum
    calls = {"n": 0}

    def poisoned(logps):
        calls["n"] += 1
        loss, count = real(logps)
        return (loss * float("nan") if calls["n"] in (3, 4) else loss), count  # step 2's two micro-batches

    monkeypatch.setattr(lm, "lm_loss_sum", poisoned)
    result = train(tiny_config("pretrain", pretrain_data, tmp_path / "skip", train={"max_steps": 4}))
    assert (result.steps, result.skipped_steps) == (4, 1)
    assert all(np.isfinite(step_losses(tmp_path / "skip")))
    monkeypatch.setattr(lm, "lm_loss_sum", lambda logps: (real(logps)[0] * float("nan"), logps.numel()))
    config = tiny_config("pretrain", pretrain_data, tmp_path / "stop", train={"max_nonfinite_steps": 3})
    with pytest.raises(UnitrainError, match="3 steps in a row had a non-finite loss or gradient"):
        train(config)


def test_objective_must_match_dataset_kind(pretrain_data, preference_data, tmp_path, tiny_config):
    with pytest.raises(
        UnitrainError,
        match=r"data.train\[0\] .*objective dpo needs a preference dataset, got a "
        r"pretraining dataset",
    ):
        train(tiny_config("dpo", pretrain_data, tmp_path))
    with pytest.raises(UnitrainError, match="objective pretrain needs a pretraining or sft dataset"):
        train(tiny_config("pretrain", preference_data, tmp_path))
    with pytest.raises(
        UnitrainError, match="objective sft needs an sft dataset .* got a pretraining dataset"
    ):
        train(tiny_config("sft", pretrain_data, tmp_path))  # nothing to mask: as docs/training.md says
    # SFT on a preference dataset trains on prompt + chosen
    result = train(tiny_config("sft", preference_data, tmp_path / "sft-pref", train={"max_steps": 2}))
    assert result.steps == 2


def test_epochs_become_steps_and_blends_train(pretrain_data, sft_data, tmp_path, tiny_config):
    from unitrain.data.epoch.plan import plan_rows

    dataset = GPTMemmapDataset(pretrain_data)
    train_indices, _ = split_indices(len(dataset), 0.125, seed=0)
    rows = len(
        plan_rows(
            dataset, train_indices, objective="pretrain", mode="packed", share_prompt=True, sequence_length=64
        )
    )
    config = tiny_config(
        "pretrain", pretrain_data, tmp_path / "epochs", train={"max_steps": None, "epochs": 2}
    )
    assert train(config).steps == -(-2 * rows // 4)  # 4 rows per step (2 micro-batches of 2)

    blend = [{"path": str(pretrain_data), "weight": 3.0}, {"path": str(sft_data), "weight": 1.0}]
    config = tiny_config(
        "pretrain", pretrain_data, tmp_path / "blend", data={"train": blend}, train={"max_steps": 3}
    )
    result = train(config)
    assert result.steps == 3 and np.isfinite(result.last_metrics["eval/loss"])


def test_cached_reference_equals_model_reference(preference_data, tmp_path, tiny_config):
    """The reference log-prob cache (keyed by pair index, here with a separate validation dataset) gives the
    per-step and validation losses of running the frozen reference model alongside."""
    sections = {
        "data": {"train": str(preference_data), "validation": str(preference_data)},
        "train": {"max_steps": 3},
    }
    runs = {}
    for kind in ("model", "cached"):
        config = tiny_config("dpo", preference_data, tmp_path / kind, dpo={"reference": kind}, **sections)
        runs[kind] = train(config)
    assert (tmp_path / "cached" / "reference-cache").is_dir()
    np.testing.assert_allclose(step_losses(tmp_path / "cached"), step_losses(tmp_path / "model"), rtol=1e-6)
    assert runs["cached"].last_metrics["eval/loss"] == pytest.approx(
        runs["model"].last_metrics["eval/loss"], rel=1e-6
    )


def test_reference_cache_dir_is_shared_between_runs(preference_data, tmp_path, tiny_config):
    """Two runs pointed at one `dpo.reference_cache_dir` compute the reference log-probs once."""
    from unitrain.train.step.reference import CACHE_FILE

    cache = tmp_path / "shared-cache"
    dpo = {"reference": "cached", "reference_cache_dir": str(cache), "reference_on_mismatch": "error"}
    model_path = tmp_path / "start"
    train(tiny_config("dpo", preference_data, model_path, train={"max_steps": 2}))
    for name, reference in (("first", dpo), ("second", dpo), ("frozen-model", {"reference": "model"})):
        raw = tiny_raw("dpo", preference_data, tmp_path / name, dpo=reference, train={"max_steps": 2})
        raw["model"] = {"path": str(model_path / "hf")}
        train(parse_config(raw))
        if name == "first":
            written = (cache / CACHE_FILE).stat().st_mtime_ns
    assert (cache / CACHE_FILE).stat().st_mtime_ns == written, "the second run must reuse the cache"
    assert not (tmp_path / "second" / "reference-cache").exists()
    assert not (tmp_path / "second" / "initial").exists(), "a checkpoint start is not copied to initial/"
    # the reused cache gives the losses of running the frozen reference model itself
    np.testing.assert_allclose(
        step_losses(tmp_path / "second"), step_losses(tmp_path / "frozen-model"), rtol=1e-6
    )


def test_a_new_run_refuses_an_output_dir_that_holds_checkpoints(pretrain_data, tmp_path, tiny_config):
    config = tiny_config("pretrain", pretrain_data, tmp_path, train={"max_steps": 2})
    train(config)
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(UnitrainError, match="already holds the checkpoints of a run .* pass --resume"):
        train(config)
    assert train(config, resume=True).steps == 2
    for name, tensor in load_file(tmp_path / "hf" / "model.safetensors").items():
        assert torch.equal(tensor, exported[name]), name


def test_raw_rows_as_data_train_say_to_prepare_them_first(tmp_path, tiny_config):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    for raw in (tmp_path / "pairs.jsonl", tmp_path):  # the file, or the directory holding it
        with pytest.raises(UnitrainError) as error:
            train(tiny_config("dpo", raw, tmp_path / "run"))
        assert str(error.value) == (
            f"{raw}: not a prepared dataset (no metadata.json); run `unitrain prepare` first to tokenize it"
        )


@pytest.mark.parametrize("below", ["", "run"])
def test_an_output_dir_that_is_a_file_is_one_line(pretrain_data, tmp_path, tiny_config, below):
    (tmp_path / "taken").write_text("a file")
    output = tmp_path / "taken" / below if below else tmp_path / "taken"
    with pytest.raises(UnitrainError) as error:
        train(tiny_config("pretrain", pretrain_data, output, train={"max_steps": 2}))
    assert str(error.value) == f"run.output_dir {output}: {tmp_path / 'taken'} is a file, not a directory"


def test_datasets_of_different_tokenizers_are_refused(tmp_path, tiny_config):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from unitrain.data.memmap.writer import DatasetWriter
    from unitrain.data.sample import GPTSample

    one, two = (Tokenizer(WordLevel({"a": 0, word: 1}, unk_token="a")).to_str() for word in ("b", "c"))
    datasets = (
        ("train", "tokenizer.json", one),
        ("validation", "tokenizer.json", two),
        ("renamed", "gpt2-tokenizer.json", one),  # the train tokenizer under another name
    )
    for name, file_name, content in datasets:
        tokenizer = tmp_path / f"tokenizer-{name}" / file_name
        tokenizer.parent.mkdir()
        tokenizer.write_text(content)
        with DatasetWriter(
            tmp_path / name, "pretraining", vocab_size=50, eos_id=0, tokenizer_files=[tokenizer]
        ) as writer:
            for start in range(8):
                writer.add(GPTSample(np.arange(start + 1, start + 20)))
    sections = {"data": {"train": str(tmp_path / "train"), "validation": str(tmp_path / "validation")}}
    config = tiny_config("pretrain", tmp_path / "train", tmp_path / "run", **sections)
    with pytest.raises(
        UnitrainError, match="validation was prepared with a different tokenizer than .*train"
    ):
        train(config)
    renamed = {"data": {"train": str(tmp_path / "train"), "validation": str(tmp_path / "renamed")}}
    config = tiny_config("pretrain", tmp_path / "train", tmp_path / "run2", train={"max_steps": 2}, **renamed)
    assert train(config).steps == 2  # the same tokenizer by content, whatever its file was called


def test_pairs_longer_than_a_row_are_split_and_the_unfit_reported(
    preference_data, tmp_path, tiny_config, capsys
):
    dataset = GPTMemmapDataset(preference_data)
    train_indices, held_out = split_indices(len(dataset), 0.125, seed=0)
    samples = [dataset[int(i)] for i in train_indices]
    alone = [len(s.prompt_ids) + max(len(s.chosen_ids), len(s.rejected_ids)) for s in samples]
    split = sum(len(s.token_ids) > 16 >= need for s, need in zip(samples, alone))
    unfit = sum(need > 16 for need in alone)
    assert split > 0 and unfit > 0
    train(
        tiny_config("dpo", preference_data, tmp_path, packing={"sequence_length": 16}, train={"max_steps": 2})
    )
    output = capsys.readouterr().out
    assert (
        f"; {unfit} pairs of this epoch are not trained on: a response with its prompt needs more than "
        f"packing.sequence_length=16 slots (packing.sequence_length={max(alone)} would keep them all)"
        in output
    )
    assert f"validation: all {len(held_out)} held-out pairs are evaluated" in output
    assert "--max-length" not in output


def test_dpo_validation_loss_with_sft_term_does_not_depend_on_micro_batches(
    preference_data, tmp_path, tiny_config
):
    """The `sft` term is normalized by the validation set's chosen tokens per pair, as in training, so eval/loss
    is the same whatever the validation micro-batches (weights kept fixed with a negligible learning rate)."""
    losses = []
    for rows in (1, 4):
        config = tiny_config(
            "dpo", preference_data, tmp_path / f"rows-{rows}", dpo={"loss": ["sigmoid", "sft"]},
            batch={"micro_batch_size": rows, "gradient_accumulation_steps": 1},
            optimizer={"lr": 1e-12}, train={"max_steps": 2},
        )  # fmt: skip
        losses.append(train(config).last_metrics["eval/loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("lora", [False, True], ids=["reference-model", "lora-adapters-off"])
def test_the_reference_runs_before_the_policy_forward(lora, preference_data, tmp_path, tiny_config):
    """In every micro-batch the reference's forward comes first, so its buffers (a layer's intermediates, a chunk
    of logits) are freed before the policy's forward keeps its activations for the backward, never on top."""
    from unitrain.train.dist import init_distributed
    from unitrain.train.trainer import Trainer

    sections = {"lora": {"rank": 4}} if lora else {}
    config = tiny_config("dpo", preference_data, tmp_path, train={"max_steps": 2}, **sections)
    trainer = Trainer(config, init_distributed("cpu"), resume=False)
    events, inside = [], []
    real = trainer.reference.response_logps

    def reference(*args):
        inside.append(True)  # the LoRA reference runs the policy's own module with its adapters off
        events.append("reference")
        try:
            return real(*args)
        finally:
            inside.pop()

    def policy(*_):
        if not inside:
            events.append("policy with autograd" if torch.is_grad_enabled() else "policy without autograd")

    trainer.reference.response_logps = reference
    trainer.model.embed.register_forward_pre_hook(policy)
    trainer.train_step()
    assert events == ["reference", "policy with autograd"] * config.batch.gradient_accumulation_steps


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_trains_the_same_steps(
    lora, preference_data, tmp_path, tiny_config, monkeypatch
):
    """`train.activation_checkpointing` recomputes every decoder layer in the backward (counted) and gives the
    step losses and final weights of the run that keeps the activations."""
    import unitrain.model.llama as llama

    calls = []
    real = llama.checkpoint
    monkeypatch.setattr(llama, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    sections = {"lora": {"rank": 4}} if lora else {}
    for on in (False, True):
        train_section = {"max_steps": 3, "activation_checkpointing": on}
        train(tiny_config("dpo", preference_data, tmp_path / str(on), train=train_section, **sections))
    micro_batches, layers = 3 * 2, 2
    assert len(calls) == micro_batches * layers  # training forwards only: not the reference, not validation
    np.testing.assert_allclose(step_losses(tmp_path / "True"), step_losses(tmp_path / "False"), rtol=1e-6)
    kept, recomputed = final_weights(tmp_path / "False"), final_weights(tmp_path / "True")
    for name, tensor in kept.items():
        torch.testing.assert_close(recomputed[name], tensor, rtol=1e-5, atol=1e-6)
