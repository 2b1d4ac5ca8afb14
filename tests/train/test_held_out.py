"""`unitrain score --held-out RUN_DIR` scores exactly the pairs a run held out, and says so; without it the
summary says the pairs are not known to be held out, and cites no setting the user did not give."""

from __future__ import annotations

import json

import pytest

from unitrain.cli import main
from unitrain.data.batches.stream import split_indices
from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.memmap.writer import write_dataset
from unitrain.train import train

from .conftest import VOCAB


@pytest.fixture(scope="module")
def dpo_run(preference_data, tmp_path_factory, tiny_config):
    output = tmp_path_factory.mktemp("run")
    return output, train(tiny_config("dpo", preference_data, output))


def score(tmp_path, run, data, *flags):
    argv = ["score", "--model", str(run / "hf"), "--reference", str(run / "initial"), "--data", str(data)]
    assert main([*argv, "--output", str(tmp_path / "scores.jsonl"), *flags]) == 0
    return [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]


def test_score_held_out_scores_the_validation_pairs_of_the_run(dpo_run, preference_data, tmp_path, capsys):
    run, result = dpo_run
    train_indices, held_out = split_indices(len(GPTMemmapDataset(preference_data)), 0.125, seed=0)
    rows = score(tmp_path, run, preference_data, "--held-out", str(run))
    assert [row["index"] for row in rows] == held_out.tolist()
    assert not set(held_out) & set(train_indices)
    out = capsys.readouterr().out
    assert f"scored {len(held_out)} pairs that {run} held out from training (its validation pairs)" in out
    # the same pairs, the same models: the run's own final validation accuracy
    accuracy = sum(
        r["chosen_logp"] - r["rejected_logp"] > r["reference_chosen_logp"] - r["reference_rejected_logp"]
        for r in rows
    ) / len(rows)
    assert accuracy == pytest.approx(result.last_metrics["eval/rewards/accuracies"])
    assert f"preference accuracy {accuracy:.4f}" in out
    assert "not known to be held out" not in out and "sequence-length" not in out


def test_score_without_held_out_says_so(dpo_run, preference_data, tmp_path, capsys):
    run, _ = dpo_run
    assert len(score(tmp_path, run, preference_data, "--limit", "5")) == 5
    out = capsys.readouterr().out
    assert f"scored 5 pairs of {preference_data} (the first 5) in " in out
    assert "not known to be held out (--held-out RUN_DIR scores the pairs a run never trained on)" in out
    assert "sequence-length" not in out, "no setting the user did not give"
    score(tmp_path, run, preference_data, "--sequence-length", "16")
    assert "skipped (a response longer than --sequence-length 16)" in capsys.readouterr().out


def test_score_held_out_refuses_data_the_run_did_not_validate_on(dpo_run, preference_data, tmp_path, capsys):
    run, _ = dpo_run
    source = GPTMemmapDataset(preference_data)
    other = write_dataset(tmp_path / "other", [source[k] for k in range(8)], "preference", vocab_size=VOCAB)
    argv = ["score", "--model", str(run / "hf"), "--output", str(tmp_path / "x.jsonl")]
    assert main([*argv, "--data", str(other), "--held-out", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"error: {other} is not a dataset {run} held pairs out of (it validated on {preference_data})\n"
    )
    assert main([*argv, "--data", str(preference_data), "--held-out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'validation.json'} not found: {tmp_path} is not the output directory of a training "
        "run\n"
    )


@pytest.mark.parametrize("drop", [False, True], ids=["copies-kept", "drop-duplicates"])
def test_no_copy_of_a_held_out_pair_is_trained_on(preference_data, tmp_path, tiny_config, capsys, drop):
    """Every pair twice (the layout of a file concatenated with itself): a plain 20% split left most held-out
    pairs' copies in training. Copies are held out together; `data.drop_duplicates` keeps one of each."""
    from unitrain.train.data import load_training_data
    from unitrain.train.dist import init_distributed

    source = GPTMemmapDataset(preference_data)
    doubled = [source[k] for k in range(len(source))] * 2
    data = write_dataset(tmp_path / "doubled", doubled, "preference", vocab_size=VOCAB)
    sections = {
        "data": {"train": str(data), "validation": 0.2, "drop_duplicates": drop},
        "train": {"max_steps": 2},
    }
    config = tiny_config("dpo", data, tmp_path / "run", **sections)
    loaded = load_training_data(config, init_distributed("cpu"))
    [(_, train_indices)], [(_, held_out)] = loaded.stream.sources, loaded.validation
    key = lambda k: (tuple(doubled[k].token_ids), doubled[k].chosen_span)  # noqa: E731
    assert not {key(k) for k in held_out} & {key(k) for k in train_indices}  # naive check, by the tokens
    assert len(held_out) >= round(0.2 * len(doubled)) // (2 if drop else 1)
    counts = len(train_indices) + len(held_out)
    assert counts == (len(source) if drop else len(doubled))
    assert len({key(k) for k in train_indices}) == (len(train_indices) if drop else len(train_indices) // 2)
    train(config)
    assert [
        row["index"] for row in score(tmp_path, tmp_path / "run", data, "--held-out", str(tmp_path / "run"))
    ] == (held_out.tolist())
