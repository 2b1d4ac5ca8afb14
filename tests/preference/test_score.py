"""`unitrain score` log-probs equal a plain `transformers` forward of prompt+response on the same ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unitrain.cli import main
from unitrain.model import save_pretrained

from .conftest import build_tiny_model, random_pairs


@pytest.fixture(scope="module")
def scored_setup(tmp_path_factory):
    from unitrain.data.memmap.writer import write_dataset

    root = tmp_path_factory.mktemp("score")
    save_pretrained(build_tiny_model(7), root / "policy")
    save_pretrained(build_tiny_model(8), root / "reference")
    samples = random_pairs(7, seed=21)
    write_dataset(root / "data", samples, "preference", vocab_size=61, eos_id=0)
    expected = {role: transformers_logps(root / role, samples) for role in ("policy", "reference")}
    return root, samples, expected


def transformers_logps(model_dir, samples) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probs of each pair from `transformers`' own model, one sequence at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = []
    for sample in samples:
        sums = []
        for response in (sample.chosen_ids, sample.rejected_ids):
            ids = torch.tensor(np.concatenate([sample.prompt_ids, response]))[None]  # (1, L)
            with torch.no_grad():
                logps = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (L, V)
            start = len(sample.prompt_ids)
            sums.append(float(logps[start - 1 : -1].gather(1, ids[0, start:, None]).sum()))
        pairs.append(tuple(sums))
    return pairs


@pytest.mark.parametrize("packing,share", [("packed", "--share-prompt"), ("separate", "--no-share-prompt")])
def test_score_matches_a_transformers_forward(scored_setup, packing, share, capsys):
    root, samples, expected = scored_setup
    output = root / f"{packing}.jsonl"
    argv = [
        "score",
        "--model",
        str(root / "policy"),
        "--data",
        str(root / "data"),
        "--reference",
        str(root / "reference"),
        "--packing",
        packing,
        share,
        "--batch-size",
        "2",
        "--output",
        str(output),
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(len(samples)))
    wins = 0
    for row, sample, (chosen, rejected), (ref_chosen, ref_rejected) in zip(
        rows, samples, expected["policy"], expected["reference"]
    ):
        assert row["chosen_logp"] == pytest.approx(chosen, rel=1e-5)
        assert row["rejected_logp"] == pytest.approx(rejected, rel=1e-5)
        assert row["reference_chosen_logp"] == pytest.approx(ref_chosen, rel=1e-5)
        assert row["reference_rejected_logp"] == pytest.approx(ref_rejected, rel=1e-5)
        assert (row["chosen_tokens"], row["rejected_tokens"]) == (
            len(sample.chosen_ids),
            len(sample.rejected_ids),
        )
        wins += chosen - rejected > ref_chosen - ref_rejected
    summary = capsys.readouterr().out
    assert f"scored {len(samples)} pairs of {root / 'data'} in " in summary
    assert f"preference accuracy {wins / len(samples):.4f}" in summary


def test_score_refuses_a_dataset_that_is_not_preference(tmp_path, capsys):
    from unitrain.data.memmap.writer import write_dataset
    from unitrain.data.sample import GPTSample

    write_dataset(tmp_path / "text", [GPTSample(np.arange(1, 9))], "pretraining", vocab_size=61)
    save_pretrained(build_tiny_model(0), tmp_path / "model")
    argv = [
        "score",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(tmp_path / "text"),
        "--output",
        "x.jsonl",
    ]
    assert main(argv) == 2
    assert "score needs a preference dataset" in capsys.readouterr().err


def test_score_limit_scores_the_first_pairs_only(scored_setup, capsys):
    root, samples, expected = scored_setup
    output = root / "limited.jsonl"
    argv = ["score", "--model", str(root / "policy"), "--data", str(root / "data"), "--limit", "3"]
    assert main([*argv, "--output", str(output)]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2]
    for row, (chosen, rejected) in zip(rows, expected["policy"]):
        assert row["chosen_logp"] == pytest.approx(chosen, rel=1e-5)
        assert row["rejected_logp"] == pytest.approx(rejected, rel=1e-5)
    assert "scored 3 pairs" in capsys.readouterr().out
    assert not list(root.glob(".*.partial")), "the partial output file must be renamed, not left behind"


def test_score_reports_margins_length_buckets_and_the_chosen_win_rate(scored_setup, tmp_path, capsys):
    import statistics

    root, samples, _ = scored_setup
    output = tmp_path / "scores.jsonl"
    argv = ["score", "--model", str(root / "policy"), "--reference", str(root / "reference")]
    assert main([*argv, "--data", str(root / "data"), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    margins = [
        (row["chosen_logp"] - row["reference_chosen_logp"])
        - (row["rejected_logp"] - row["reference_rejected_logp"])
        for row in rows
    ]
    assert f"median {statistics.median(margins):.3f}" in printed
    assert f"mean {statistics.fmean(margins):.3f}" in printed
    histogram = printed.split("histogram ")[1].splitlines()[0]
    assert sum(int(cell.rsplit(":", 1)[1]) for cell in histogram.split()) == len(rows)
    wins = sum(row["chosen_logp"] > row["reference_chosen_logp"] for row in rows)
    assert f"more likely than under the reference: {wins} of {len(rows)}" in printed
    longer = [max(row["chosen_tokens"], row["rejected_tokens"]) for row in rows]
    buckets = printed.split("accuracy by the longer response's tokens: ")[1].splitlines()[0].split(", ")
    counted = 0
    for bucket in buckets:
        span, rest = bucket.split(": ")
        low, high = map(int, span.split("-"))
        inside = [margin for margin, length in zip(margins, longer) if low <= length <= high]
        accuracy, _, pairs = rest.split()
        assert int(pairs) == len(inside) and float(accuracy) == pytest.approx(
            sum(margin > 0 for margin in inside) / len(inside), abs=5e-4
        )
        counted += len(inside)
    assert counted == len(rows)
