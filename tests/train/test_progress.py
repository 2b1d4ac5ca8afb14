"""What a run tells its user while it works and when it ends: progress bars for every phase that can take long,
and lines that say exactly what happened."""

from __future__ import annotations

import pytest

from unitrain.cli import main
from unitrain.config import config_to_yaml
from unitrain.train import train


def test_cached_reference_and_validation_show_progress(preference_data, tmp_path, tiny_config, capsys):
    run = {"progress": True, "eval_every": 2}
    train(tiny_config("dpo", preference_data, tmp_path, dpo={"reference": "cached"}, run=run))
    err = capsys.readouterr().err
    assert "reference log-probs" in err and "pair/s" in err  # rate and ETA of the caching pass
    assert "validation" in err
    capsys.readouterr()
    train(tiny_config("dpo", preference_data, tmp_path / "quiet", dpo={"reference": "cached"}))
    assert capsys.readouterr().err == "", "run.progress: false shows no bar"


@pytest.mark.parametrize(
    "steps, expected", [(1, "done: 1 step; export in "), (2, "done: 2 steps; export in ")]
)
def test_the_done_line_counts_in_words(pretrain_data, tmp_path, tiny_config, capsys, steps, expected):
    config = tiny_config(
        "pretrain", pretrain_data, tmp_path / "run", schedule={"warmup_steps": 0}, train={"max_steps": steps}
    )
    path = tmp_path / "run.yaml"
    path.write_text(config_to_yaml(config))
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert expected in out
    assert "skipped" not in out  # no step was skipped: nothing to say about it
    assert "validation (all 6 held-out documents): loss " in out
