"""`unitrain plot`: labelled axes, the run in the title, the step-0 validation point, chance lines, and rewards
whose colours say chosen or rejected while the line style says training or validation."""

from __future__ import annotations

import math

import pytest

from unitrain.cli import main
from unitrain.config import config_to_yaml, parse_config
from unitrain.train import train
from unitrain.train.logs.metrics import read_metrics

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def dpo_run(preference_data, tmp_path_factory, tiny_config):
    output = tmp_path_factory.mktemp("plot") / "my-run"
    train(tiny_config("dpo", preference_data, output, run={"eval_every": 3}))
    return output


def figure_of(run_dir, monkeypatch):
    """Run `unitrain plot` and keep the figure it saved."""
    from matplotlib.figure import Figure

    saved = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda self, *a, **k: (saved.append(self), real_savefig(self, *a, **k))
    )
    assert main(["plot", str(run_dir)]) == 0
    return saved[0]


def lines_of(axis) -> dict[str, object]:
    return {line.get_label(): line for line in axis.get_lines()}


def test_plot_labels_titles_and_chance_lines(dpo_run, monkeypatch):
    figure = figure_of(dpo_run, monkeypatch)
    axes = {axis.get_title(): axis for axis in figure.axes}
    assert set(axes) == {"loss", "reward accuracy", "reward margin", "rewards", "reward margins"}
    histogram = axes.pop("reward margins")  # of the last validation's pairs
    assert histogram.get_xlabel().endswith("validation at step 6")
    assert all(axis.get_ylabel() and axis.get_xlabel() == "step" for axis in axes.values())
    title = figure.texts[0].get_text()
    assert "my-run" in title and "dpo" in title and "sigmoid" in title
    loss, accuracy = lines_of(axes["loss"]), lines_of(axes["reward accuracy"])
    assert list(loss["validation loss"].get_xdata())[0] == 0  # the step-0 point: policy = reference
    assert loss["validation loss"].get_ydata()[0] == pytest.approx(math.log(2))
    chance_loss = [line for name, line in loss.items() if name.startswith("ln 2")]
    assert chance_loss and list(chance_loss[0].get_ydata()) == pytest.approx([math.log(2)] * 2)
    chance = [line for name, line in accuracy.items() if name.startswith("chance")]
    assert chance and set(chance[0].get_ydata()) == {0.5}


def test_reward_colours_say_chosen_or_rejected(dpo_run, monkeypatch):
    figure = figure_of(dpo_run, monkeypatch)
    rewards = lines_of(next(axis for axis in figure.axes if axis.get_title() == "rewards"))
    colour = {name: line.get_color() for name, line in rewards.items()}
    style = {name: line.get_linestyle() for name, line in rewards.items()}
    assert colour["train rewards/chosen"] == colour["validation rewards/chosen"]
    assert colour["train rewards/rejected"] == colour["validation rewards/rejected"]
    assert colour["train rewards/chosen"] != colour["train rewards/rejected"]
    assert style["train rewards/chosen"] != style["validation rewards/chosen"]


def test_plot_of_a_language_model_run_draws_no_dpo_chance_line(
    pretrain_data, tmp_path, tiny_config, monkeypatch
):
    path = tmp_path / "run.yaml"
    path.write_text(
        config_to_yaml(tiny_config("pretrain", pretrain_data, tmp_path / "lm", train={"max_steps": 2}))
    )
    assert main(["train", str(path)]) == 0
    figure = figure_of(tmp_path / "lm", monkeypatch)
    assert [axis.get_title() for axis in figure.axes] == ["loss"]
    assert not [name for name in lines_of(figure.axes[0]) if name.startswith("ln 2")]


def test_a_group_run_plots_and_reports_ranking_and_top1_accuracy(group_data, tmp_path, capsys, monkeypatch):
    """The listwise metrics are drawn and summed up, and a list of losses is named as text in the title."""
    from .conftest import tiny_raw

    dpo = {"loss": ["sigmoid", "plackett_luce"], "group_pairs": "all"}
    raw = tiny_raw("dpo", group_data, tmp_path / "groups", dpo=dpo, train={"max_steps": 2})
    (tmp_path / "run.yaml").write_text(config_to_yaml(parse_config(raw)))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    (summary,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("validation (")]
    assert summary.startswith("validation (all 6 held-out groups): loss ")
    final = [row for row in read_metrics(tmp_path / "groups" / "metrics.jsonl") if "eval/loss" in row][-1]
    ranking, top1 = final["eval/rewards/ranking_accuracy"], final["eval/rewards/top1_accuracy"]
    assert summary.endswith(f", ranking accuracy {ranking:.4f}, top-1 accuracy {top1:.4f}")
    figure = figure_of(tmp_path / "groups", monkeypatch)
    assert "sigmoid + plackett_luce loss" in figure.texts[0].get_text()
    ranking = lines_of(next(axis for axis in figure.axes if axis.get_title() == "ranking"))
    assert {"validation rewards/ranking_accuracy", "validation rewards/top1_accuracy"} <= set(ranking)


def test_scores_add_the_histogram_of_reward_margins(dpo_run, tmp_path, monkeypatch, capsys):
    import json

    from matplotlib.figure import Figure

    margins = [-1.5, -0.2, 0.1, 0.4, 0.45, 2.0, 3.5]
    rows = [
        {
            "chosen_logp": -10.0 + m,
            "rejected_logp": -12.0,
            "reference_chosen_logp": -10.0,
            "reference_rejected_logp": -12.0,
        }
        for m in margins
    ]
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps(row) + "\n" for row in rows))
    saved = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda self, *a, **k: (saved.append(self), real_savefig(self, *a, **k))
    )
    assert main(["plot", str(dpo_run), "--scores", str(scores), "--output", str(tmp_path / "c.png")]) == 0
    axis = next(axis for axis in saved[0].axes if axis.get_title() == "reward margins")
    (stairs,) = [artist for artist in axis.patches]
    heights = list(stairs.get_data().values)
    assert sum(heights) == len(margins)
    assert (
        heights[0] == 1 and heights[-1] == 1
    )  # -1.5 alone in the first of 8 bins over [-1.5, 3.5], 3.5 in the last
    (scores.parent / "bad.jsonl").write_text('{"chosen_logp": 1.0}\n')
    assert main(["plot", str(dpo_run), "--scores", str(scores.parent / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: not a pair scored with --reference" in capsys.readouterr().err
