"""Mixed runs: a step's loss and gradient equal Σ_o w_o · L_o computed from each objective's documents run alone,
an objective at loss weight 0 gives the run without it exactly, and 2 gloo ranks give the 1-process run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unitrain.config import config_to_yaml, parse_config
from unitrain.data.epoch.rules import sft_document, sft_targets
from unitrain.train import train
from unitrain.train.data import load_training_data
from unitrain.train.dist import DistContext
from unitrain.train.logs.metrics import read_metrics
from unitrain.train.trainer import Trainer

from .conftest import tiny_raw
from .test_distributed import assert_same_run, launch
from .test_e2e import hh_slice  # noqa: F401  (a fixture)
from .test_pinned_runs import weights_digest

WEIGHTS = {"dpo": 1.0, "pretrain": 0.3, "sft": 0.5}
BETA = 0.1


def mixed_raw(pretrain_data, sft_data, preference_data, output_dir, objectives=WEIGHTS, **sections):
    raw = tiny_raw("dpo", preference_data, output_dir, **sections)
    raw["objective"] = None
    raw["data"]["train"] = [
        {"path": str(preference_data), "objective": "dpo", "name": "pairs"},
        {"path": str(pretrain_data), "objective": "pretrain", "weight": 0.5, "name": "text"},
        {"path": str(sft_data), "objective": "sft", "weight": 0.5, "name": "chat"},
    ]
    raw["objectives"] = objectives
    raw["dpo"] = {"beta": BETA}
    return raw


def logps_alone(model, tokens: np.ndarray, keep: np.ndarray) -> torch.Tensor:
    """log p of tokens[keep] (k,) from a plain causal forward of `tokens` alone."""
    ids = torch.tensor(np.asarray(tokens), dtype=torch.int64)[None]
    logps = torch.log_softmax(model(ids)[0].float(), dim=-1)  # (L, V)
    keep = torch.as_tensor(keep, dtype=torch.int64)
    return logps[keep - 1].gather(1, ids[0, keep, None])[:, 0]


def pair_alone(model, sample) -> torch.Tensor:
    """(chosen, rejected) summed log-probs, each prompt+response run alone."""
    sums = []
    for response in (sample.chosen_ids, sample.rejected_ids):
        tokens = np.concatenate([sample.prompt_ids, response])
        sums.append(logps_alone(model, tokens, np.arange(len(sample.prompt_ids), len(tokens))).sum())
    return torch.stack(sums)


def objectives_alone(model, reference, stream, rows) -> dict[str, torch.Tensor]:
    """Each objective's mean over its own units among the documents of `rows` of the stream's plan, every
    document run alone: L_pretrain and L_sft per target token, L_dpo per pair (sigmoid loss)."""
    sums = {"pretrain": [], "sft": [], "dpo": []}
    S = stream.sequence_length
    for r in rows:
        for document, part in stream.plan.row(r):
            objective, sample = stream._objective_of(document), stream._sample(document)
            if objective == "pretrain":
                tokens = sample.token_ids[part * S : (part + 1) * S]
                sums["pretrain"].append(logps_alone(model, tokens, np.arange(1, len(tokens))))
            elif objective == "sft":
                keep, _ = sft_targets(sample)
                sums["sft"].append(logps_alone(model, sft_document(sample), keep))
            else:
                policy, ref = pair_alone(model, sample), pair_alone(reference, sample).detach()
                margin = BETA * ((policy[0] - ref[0]) - (policy[1] - ref[1]))
                sums["dpo"].append(-F.logsigmoid(margin)[None])
    return {
        name: -torch.cat(sums[name]).mean() if name != "dpo" else torch.cat(sums[name]).mean()
        for name in sums
    }


def test_a_mixed_step_is_the_weighted_sum_of_each_objective_alone(
    pretrain_data, sft_data, preference_data, tmp_path
):
    """2 ranks x 2 micro-batches of 2 rows (the ranks' streams built side by side in one process, as each rank
    builds its own): Σ over ranks and micro-batches of the trainer's micro-batch losses, and their gradient, equal
    Σ_o w_o · L_o of the same rows' documents run alone, each L_o over its own units (fp32, ≤ 1e-5)."""
    raw = mixed_raw(pretrain_data, sft_data, preference_data, tmp_path)
    raw["data"]["validation"] = None
    config = parse_config(raw)
    single = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(config, single, resume=False)
    reference = copy.deepcopy(trainer.model)  # the starting weights, which the trainer's reference holds
    with torch.no_grad():  # the policy moves away from the reference: the DPO loss is not ln 2
        for parameter in trainer.model.parameters():
            parameter.add_(torch.randn_like(parameter, generator=None) * 0.05)
    world = 2
    total = torch.zeros(())
    for rank in range(world):
        context = DistContext(rank=rank, world_size=world, local_rank=0, device=torch.device("cpu"))
        stream = load_training_data(config, context).stream
        step = stream.next_step()
        assert len(step.micro_batches) == 2 and step.global_lm_targets and step.global_sft_targets
        trainer.mixed.set_step(step)
        for batch in step.micro_batches:
            loss, _, _ = trainer.mixed.batch_loss(trainer.policy, batch)
            total = total + loss
    trainer.model.zero_grad()
    total.backward()
    mixed_grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}

    rows = range(2 * 2 * world)  # the step's rows of every rank, in the plan's (shuffled) order
    alone = objectives_alone(trainer.model, reference, stream, rows)
    expected = sum(WEIGHTS[name] * alone[name] for name in WEIGHTS)
    trainer.model.zero_grad()
    expected.backward()
    torch.testing.assert_close(total, expected.detach(), rtol=1e-5, atol=1e-6)
    for name, parameter in trainer.model.named_parameters():
        scale = float(parameter.grad.abs().max())
        torch.testing.assert_close(mixed_grads[name], parameter.grad, rtol=1e-5, atol=1e-5 * scale)


def test_an_objective_at_weight_zero_gives_the_run_without_it(
    pretrain_data, sft_data, preference_data, tmp_path
):
    """`{pretrain: 0}` leaves the pretraining data out: the same pairs are sampled, the same weights result."""
    raw = mixed_raw(pretrain_data, sft_data, preference_data, tmp_path / "zero", {"pretrain": 0, "sft": 0})
    train(parse_config(raw))
    alone = tiny_raw("dpo", preference_data, tmp_path / "dpo", dpo={"beta": BETA})
    alone["data"]["train"] = [{"path": str(preference_data), "name": "pairs"}]
    train(parse_config(alone))
    losses = [
        [r["loss"] for r in read_metrics(p / "metrics.jsonl") if "loss" in r]
        for p in (tmp_path / "zero", tmp_path / "dpo")
    ]
    assert losses[0] == losses[1]
    assert weights_digest(tmp_path / "zero") == weights_digest(tmp_path / "dpo")


def test_mixed_metrics_say_which_objective_had_no_example(pretrain_data, sft_data, preference_data, tmp_path):
    train(parse_config(mixed_raw(pretrain_data, sft_data, preference_data, tmp_path, run={"eval_every": 3})))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    for row in steps:
        assert all(np.isfinite(v) for v in row.values() if isinstance(v, float))
        for prefix, unit in (("lm", "targets"), ("sft", "targets"), ("dpo", "pairs")):
            assert (f"{prefix}/loss" in row) == (row[f"{prefix}/{unit}"] > 0)
    evals = [r for r in rows if "eval/pairs/loss" in r]
    assert len(evals) == 3 and all("eval/text/loss" in r and "eval/chat/loss" in r for r in evals)
    assert evals[-1]["eval/pairs/rewards/accuracies"] >= evals[0]["eval/pairs/rewards/accuracies"]


@pytest.mark.parametrize(
    "fsdp, lora", [(False, {}), (True, {"rank": 4, "alpha": 16.0})], ids=["ddp", "fsdp2-lora"]
)
def test_two_gloo_ranks_match_one_process_in_a_mixed_run(
    fsdp, lora, pretrain_data, sft_data, preference_data, tmp_path
):
    """With FSDP2 and LoRA the adapter-off reference is a collective forward, made on every micro-batch."""
    sections = {"train": {"max_steps": 4}, "run": {"eval_every": 2}, "parallel": {"fsdp": fsdp}, "lora": lora}
    for name, processes, batch in (("one", 1, (1, 4)), ("two", 2, (1, 2))):
        raw = mixed_raw(pretrain_data, sft_data, preference_data, tmp_path / name, **sections)
        raw["batch"] = {"micro_batch_size": batch[0], "gradient_accumulation_steps": batch[1]}
        (tmp_path / f"{name}.yaml").write_text(config_to_yaml(parse_config(raw)))
        launch(tmp_path / f"{name}.yaml", processes)
    keys = (
        "loss",
        "lm/loss",
        "dpo/loss",
        "rewards/margins",  # not accuracies: at step 1 the rewards are 0 up to float rounding, their signs noise
        "grad_norm",
        "eval/pairs/loss",
        "eval/text/loss",
    )
    assert_same_run(tmp_path / "two", tmp_path / "one", keys, atol=5e-5 if lora else 1e-5)


def test_a_mixed_run_caches_the_reference_of_its_preference_data_only(
    pretrain_data, sft_data, preference_data, tmp_path
):
    """The cache holds the pair dataset's log-probs alone, and gives the run of a reference model."""
    from safetensors import safe_open

    from unitrain.data.memmap.reader import GPTMemmapDataset

    runs = {}
    for reference in ("model", "cached"):
        raw = mixed_raw(pretrain_data, sft_data, preference_data, tmp_path / reference)
        raw["dpo"]["reference"] = reference
        train(parse_config(raw))
        runs[reference] = read_metrics(tmp_path / reference / "metrics.jsonl")
    with safe_open(
        str(tmp_path / "cached" / "reference-cache" / "reference_logps.safetensors"), "pt"
    ) as cache:
        key = cache.metadata()
    assert GPTMemmapDataset(preference_data).fingerprint in str(key)
    assert GPTMemmapDataset(pretrain_data).fingerprint not in str(key)
    for key in ("loss", "dpo/loss", "lm/loss", "eval/pairs/loss"):
        got = [r[key] for r in runs["cached"] if key in r]
        want = [r[key] for r in runs["model"] if key in r]
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)


def test_named_validation_sets_report_under_their_names(preference_data, tmp_path):
    """A single-objective run given a list of sets reports each as `eval/NAME/...`, the values of `eval/...`."""
    plain = tiny_raw("dpo", preference_data, tmp_path / "plain")
    plain["data"]["validation"] = str(preference_data)
    named = tiny_raw("dpo", preference_data, tmp_path / "named")
    named["data"]["validation"] = [{"name": "held", "path": str(preference_data)}]
    for raw in (plain, named):
        raw["train"]["max_steps"] = 2
        train(parse_config(raw))
    final = [read_metrics(tmp_path / name / "metrics.jsonl")[-1] for name in ("plain", "named")]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "pairs"):
        assert final[1][f"eval/held/{key}"] == pytest.approx(final[0][f"eval/{key}"], rel=1e-6)


def test_the_plot_of_a_mixed_run_draws_each_objective(
    pretrain_data, sft_data, preference_data, tmp_path, monkeypatch
):
    pytest.importorskip("matplotlib")
    from .test_plot import figure_of, lines_of

    train(parse_config(mixed_raw(pretrain_data, sft_data, preference_data, tmp_path, run={"eval_every": 3})))
    figure = figure_of(tmp_path, monkeypatch)
    loss = lines_of(next(axis for axis in figure.axes if axis.get_title() == "loss"))
    wanted = {"train loss", "train lm/loss", "train sft/loss", "train dpo/loss"}
    wanted |= {"validation pairs/loss", "validation text/loss", "validation chat/loss"}
    assert wanted <= set(loss)
    accuracy = lines_of(next(axis for axis in figure.axes if axis.get_title() == "reward accuracy"))
    assert {"train rewards/accuracies", "validation pairs/rewards/accuracies"} <= set(accuracy)
    assert "dpo" in figure.texts[0].get_text() and "0.3·pretrain" in figure.texts[0].get_text()


def test_a_dpo_run_validates_on_text_too(pretrain_data, preference_data, tmp_path):
    """An LM validation set in a DPO run: its loss is the mean target NLL of the set under the policy."""
    from unitrain.model import from_pretrained

    raw = tiny_raw("dpo", preference_data, tmp_path)
    raw["data"]["validation"] = [
        {"name": "pairs", "path": str(preference_data)},
        {"name": "text", "path": str(pretrain_data), "objective": "pretrain"},
    ]
    raw["train"]["max_steps"] = 2
    train(parse_config(raw))
    final = read_metrics(tmp_path / "metrics.jsonl")[-1]
    model = from_pretrained(tmp_path / "hf")
    from unitrain.data.memmap.reader import GPTMemmapDataset

    text = GPTMemmapDataset(pretrain_data)
    with torch.no_grad():
        nll = torch.cat(
            [
                -logps_alone(model, text[k].token_ids, np.arange(1, len(text[k].token_ids)))
                for k in range(len(text))
            ]
        )
    assert final["eval/text/loss"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert final["eval/text/targets"] == len(nll) and "eval/pairs/rewards/accuracies" in final


def test_dpo_with_lm_loss_on_hh_rlhf_through_the_cli(hh_slice, tmp_path):  # noqa: F811
    """DPO on HH-RLHF pairs + 0.1 × LM loss on the same dialogues as plain text, through `unitrain train`: both
    losses fall, the pairs' reward accuracy rises, and `unitrain plot` draws the run."""
    from unitrain.cli import main

    from .test_e2e import TINY_MODEL, training_pair_accuracy

    raw = {
        "model": {"config": TINY_MODEL},
        "data": {
            "train": [
                {"path": str(hh_slice / "pairs"), "objective": "dpo", "name": "pairs"},
                {"path": str(hh_slice / "text"), "objective": "pretrain", "name": "text"},
            ],
        },
        "objectives": {"dpo": 1.0, "pretrain": 0.1},
        "packing": {"sequence_length": 256},
        "batch": {"micro_batch_size": 2, "gradient_accumulation_steps": 1},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.0},
        "schedule": {"kind": "constant", "warmup_steps": 2},
        "train": {"max_steps": 30, "seed": 0, "device": "cpu"},
        "run": {"output_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }
    (tmp_path / "run.yaml").write_text(config_to_yaml(parse_config(raw)))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    rows = [row for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in row]
    lm = [row["lm/loss"] for row in rows if "lm/loss" in row]
    assert np.mean(lm[-5:]) < np.mean(lm[:5]) - 0.5
    accuracy = training_pair_accuracy(tmp_path / "run", hh_slice / "pairs")
    assert accuracy > 0.7  # chance is 0.5
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_stopped_mixed_run_resumes_exactly(pretrain_data, sft_data, preference_data, tmp_path):
    """Stopped after step 3 and resumed: the losses and weights of the run that never stopped."""

    def raw(output, steps):
        config = mixed_raw(pretrain_data, sft_data, preference_data, output, run={"save_every": 3})
        config["train"]["max_steps"] = steps
        config["schedule"] = {"kind": "constant", "warmup_steps": 1}  # the same rates whatever max_steps
        return parse_config(config)

    train(raw(tmp_path / "full", 6))
    train(raw(tmp_path / "stopped", 3))
    resumed = raw(tmp_path / "stopped", 6)
    train(resumed, resume=True)
    losses = [
        [r["loss"] for r in read_metrics(p / "metrics.jsonl") if "loss" in r]
        for p in (tmp_path / "full", tmp_path / "stopped")
    ]
    assert losses[0][3:] == losses[1][3:]
    assert weights_digest(tmp_path / "full") == weights_digest(tmp_path / "stopped")
