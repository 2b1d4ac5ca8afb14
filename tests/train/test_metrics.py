"""Metrics: JSON lines, truncation on resume, DPO means from per-pair sums."""

from __future__ import annotations

import pytest
import torch

from unitrain.train.dist import DistContext
from unitrain.train.logs.metrics import MetricsWriter, preference_metrics, read_metrics, reduce_sums

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_writer_appends_and_truncates_on_resume(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for step in (1, 2, 3, 4):
        writer.log(step, {"loss": float(step)})
    resumed = MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=2)
    resumed.log(3, {"loss": 30.0})
    assert [(row["step"], row["loss"]) for row in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]
    assert not (tmp_path / "other").exists()
    MetricsWriter(tmp_path / "other", enabled=False, tensorboard=False).log(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()


def test_preference_metrics_are_per_pair_means():
    chosen = torch.tensor([0.5, -0.2, 0.3])
    rejected = torch.tensor([0.1, 0.1, 0.4])
    logps = torch.tensor([[-3.0, -4.0], [-2.0, -1.0], [-5.0, -6.0]])
    sums = {
        "pairs": 3,
        "chosen_rewards": chosen.sum(),
        "rejected_rewards": rejected.sum(),
        "accuracies": (chosen > rejected).sum(),
        "chosen_logps": logps[:, 0].sum(),
        "rejected_logps": logps[:, 1].sum(),
    }
    metrics = preference_metrics(reduce_sums(sums, SINGLE), prefix="eval/")
    assert metrics["eval/rewards/accuracies"] == pytest.approx(1 / 3)
    assert metrics["eval/rewards/margins"] == pytest.approx((chosen - rejected).mean().item())
    assert metrics["eval/rewards/chosen"] == pytest.approx(chosen.mean().item())
    assert metrics["eval/logps/rejected"] == pytest.approx(-11 / 3)


def test_train_command_summarizes_final_validation_in_one_line():
    from unitrain.commands.train import _validation_summary

    metrics = {
        "loss": 0.5,
        "eval/loss": 0.64404,
        "eval/rewards/accuracies": 0.6,
        "eval/rewards/margins": -0.125,
    }
    assert _validation_summary(metrics) == "loss 0.6440, reward accuracy 0.6000, reward margin -0.1250"
    assert _validation_summary({"eval/loss": 2.5}) == "loss 2.5000"
    assert _validation_summary({"loss": 0.5}) == ""
