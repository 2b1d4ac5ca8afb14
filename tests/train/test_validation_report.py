"""What a DPO validation reports beside its means: the per-pair table (reward margin, longer response's tokens,
the chosen response's gain over the reference) equals what `unitrain score` computes for the same held-out pairs
and models; the chosen win rate is logged; the final report is printed; `plot` draws the last validation's margin
histogram. And the reference is asked once per held-out batch for the whole run, with unchanged numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unitrain.cli import main
from unitrain.train.dist import init_distributed
from unitrain.train.evaluation.validation import Validation
from unitrain.train.logs.metrics import PAIRS_FILE, read_metrics
from unitrain.train.trainer import Trainer


@pytest.fixture(scope="module")
def cli_run(preference_data, tmp_path_factory, tiny_config):
    """A DPO run through `unitrain train` (validation at steps 0, 3 and 6), and what it printed."""
    import contextlib
    import io

    from unitrain.config import config_to_yaml

    output = tmp_path_factory.mktemp("report") / "run"
    config = tiny_config("dpo", preference_data, output, run={"eval_every": 3})
    path = output.parent / "config.yaml"
    path.write_text(config_to_yaml(config))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", str(path)]) == 0
    return output, printed.getvalue()


def test_validation_pairs_equal_the_scores_of_the_same_pairs(cli_run, preference_data, tmp_path):
    run, _ = cli_run
    validations = read_metrics(run / PAIRS_FILE)
    metrics = [row for row in read_metrics(run / "metrics.jsonl") if "eval/loss" in row]
    assert [row["step"] for row in validations] == [row["step"] for row in metrics] == [0, 3, 6]
    assert validations[0]["margins"] == [0.0] * len(validations[0]["margins"])  # policy = reference at step 0
    last = validations[-1]
    argv = ["score", "--model", str(run / "hf"), "--reference", str(run / "initial"), "--data"]
    argv += [str(preference_data), "--held-out", str(run), "--output", str(tmp_path / "scores.jsonl")]
    assert main(argv) == 0
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    expected = np.array(
        [
            (
                (r["chosen_logp"] - r["reference_chosen_logp"])
                - (r["rejected_logp"] - r["reference_rejected_logp"]),
                max(r["chosen_tokens"], r["rejected_tokens"]),
                r["chosen_logp"] - r["reference_chosen_logp"],
            )
            for r in scores
        ]
    )  # (P, 3) in dataset order
    logged = np.array([last["margins"], last["longer_tokens"], last["chosen_gains"]]).T  # in batch order
    order = lambda table: table[np.lexsort(table.T[::-1])]  # noqa: E731  rows sorted, whatever the batch order
    assert len(logged) == len(expected) == metrics[-1]["eval/pairs"]
    assert np.abs(expected[:, 0]).max() > 1e-3, "the run moved the policy: the comparison is not of zeros"
    np.testing.assert_allclose(order(logged), order(expected), atol=2e-5, rtol=1e-5)
    assert metrics[-1]["eval/rewards/chosen_win_rate"] == pytest.approx((expected[:, 2] > 0).mean())
    assert metrics[-1]["eval/rewards/accuracies"] == pytest.approx((expected[:, 0] > 0).mean())


def test_the_run_prints_the_report_of_its_final_validation(cli_run):
    run, printed = cli_run
    last = read_metrics(run / PAIRS_FILE)[-1]
    wins = sum(gain > 0 for gain in last["chosen_gains"])
    assert "reward margins (nats): 10% " in printed
    assert "accuracy by the longer response's tokens: " in printed
    assert (
        f"chosen responses more likely than under the reference: {wins} of {len(last['margins'])}" in printed
    )


def test_plot_draws_the_margin_histogram_of_the_last_validation(cli_run, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    run, _ = cli_run
    saved = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda self, *a, **k: (saved.append(self), real_savefig(self, *a, **k))
    )
    assert main(["plot", str(run), "--output", str(tmp_path / "curves.png")]) == 0
    axis = next(axis for axis in saved[0].axes if axis.get_title() == "reward margins")
    (stairs,) = axis.patches
    last = read_metrics(run / PAIRS_FILE)[-1]
    assert sum(stairs.get_data().values) == len(last["margins"])
    assert "validation at step 6" in axis.get_xlabel()


def test_the_reference_is_asked_once_per_held_out_batch(preference_data, tmp_path, tiny_config):
    """A second validation runs no reference forward; after a training step its numbers equal those of a
    validation that asks the reference again."""
    config = tiny_config(
        "dpo", preference_data, tmp_path / "run", data={"validation": 0.25}, train={"max_steps": 2}
    )
    trainer = Trainer(config, init_distributed("cpu"), resume=False)
    asked = []
    real = trainer.reference.response_logps

    def counted(batch, position=None):
        asked.append(1)
        return real(batch, position)

    trainer.reference.response_logps = counted
    first = trainer.evaluate()
    batches = len(asked)
    assert batches == trainer.validation.plan[0] > 1
    assert trainer.evaluate() == first and len(asked) == batches
    trainer.train_step()  # asks the reference for its own batches
    trained = len(asked)
    remembered = trainer.evaluate()
    assert len(asked) == trained
    again = Validation(trainer)
    fresh = again.evaluate()  # asks the reference again
    assert len(asked) == trained + batches
    assert remembered["eval/loss"] != first["eval/loss"]
    assert remembered == pytest.approx(fresh, rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(trainer.validation.pairs, again.pairs, rtol=1e-6, atol=1e-6)


def test_a_new_run_starts_without_an_old_runs_pairs(preference_data, tmp_path, tiny_config):
    from unitrain.train import train

    run = tmp_path / "run"
    run.mkdir()
    (run / PAIRS_FILE).write_text(
        '{"step": 99, "margins": [5.0], "longer_tokens": [3], "chosen_gains": [1.0]}\n'
    )
    train(tiny_config("dpo", preference_data, run, train={"max_steps": 2}))
    assert [row["step"] for row in read_metrics(run / PAIRS_FILE)] == [0, 2]


def test_a_list_of_losses_logs_each_term(preference_data, tmp_path, tiny_config):
    """`dpo.loss: [sigmoid, sft]` logs `losses/sigmoid` and `losses/sft` (each unweighted, per pair): their
    weighted sum is the loss, and at validation the sigmoid term is the mean of softplus(−β · margin) over the
    pairs of validation_pairs.jsonl."""
    import math

    from unitrain.train import train

    dpo = {"loss": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.5}
    result = train(tiny_config("dpo", preference_data, tmp_path, dpo=dpo, train={"max_steps": 3}))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    trained = [row for row in rows if "losses/sigmoid" in row]
    assert len(trained) == 3
    for row in trained:
        assert row["loss"] == pytest.approx(row["losses/sigmoid"] + 0.5 * row["losses/sft"], rel=1e-5)
    last = read_metrics(tmp_path / PAIRS_FILE)[-1]
    sigmoid = np.mean([math.log1p(math.exp(-0.5 * margin)) for margin in last["margins"]])
    assert abs(np.mean(last["margins"])) > 1e-3
    assert result.last_metrics["eval/losses/sigmoid"] == pytest.approx(sigmoid, rel=1e-5)
    assert result.last_metrics["eval/loss"] == pytest.approx(
        sigmoid + 0.5 * result.last_metrics["eval/losses/sft"], rel=1e-5
    )


def test_a_batchs_chosen_targets_add_up_to_the_plans_count(preference_data, tmp_path, tiny_config):
    """`PackedBatch.num_chosen_targets` (from the batch's tensors, what validation normalizes the `sft` term by)
    sums over a step's micro-batches to the plan's own count (numpy, from the row metadata), which training uses."""
    from unitrain.train.data import load_training_data

    config = tiny_config("dpo", preference_data, tmp_path, batch={"micro_batch_size": 2})
    stream = load_training_data(config, init_distributed("cpu")).stream
    for _ in range(3):
        step = stream.next_step()
        assert step.global_chosen_targets > 0
        assert sum(batch.num_chosen_targets for batch in step.micro_batches) == step.global_chosen_targets
