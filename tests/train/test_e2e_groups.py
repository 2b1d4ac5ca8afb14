"""End to end through the CLI on UltraFeedback-shaped groups built from HH-RLHF: prepare (completions with
scores), DPO-train a tiny random Llama on every pair the ranking implies plus the Plackett–Luce loss with a cached
reference, then score: the ranking learned on the training groups, and each scored log-prob equals a plain
forward of prompt + response."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from unitrain.cli import main
from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.model import from_pretrained
from unitrain.train.logs.metrics import read_metrics

from .test_e2e import run_cli

MARKER = "\n\nAssistant:"
SCORES = (8.0, 5.0, 2.0, 1.0)  # chosen, rejected, then two answers of dialogues used nowhere else


@pytest.fixture(scope="module")
def hh_groups(hh_rlhf_path, gpt2_tokenizer_path, tmp_path_factory):
    """48 groups of 4: each dialogue's chosen and rejected answers and the answers of a dialogue used nowhere
    else (an answer never appears in two groups, so no text is both pushed up and down), scored."""
    root = tmp_path_factory.mktemp("groups")
    with gzip.open(hh_rlhf_path, "rt") as source:
        rows = [json.loads(next(source)) for _ in range(96)]

    def answer(text: str) -> str:
        return text[text.rfind(MARKER) + len(MARKER) :]

    lines = []
    for k, row in enumerate(rows[:48]):
        cut = row["chosen"].rfind(MARKER) + len(MARKER)
        donor = rows[48 + k]
        answers = [
            answer(row["chosen"]),
            answer(row["rejected"]),
            answer(donor["chosen"]),
            answer(donor["rejected"]),
        ]
        completions = [{"response": text, "overall_score": score} for text, score in zip(answers, SCORES)]
        lines.append(json.dumps({"prompt": row["chosen"][:cut], "completions": completions}))
    (root / "groups.jsonl").write_text("\n".join(lines) + "\n")
    command = ["prepare", "--input", str(root / "groups.jsonl"), "--tokenizer", str(gpt2_tokenizer_path)]
    assert main([*command, "--max-length", "256", "--output", str(root / "data"), "--no-progress"]) == 0
    return root


def test_groups_train_and_score_end_to_end(hh_groups, tmp_path, tiny_config, capsys):
    data = hh_groups / "data"
    dataset = GPTMemmapDataset(data)
    assert dataset.is_groups and len(dataset) >= 40
    dpo = {"loss": ["sigmoid", "plackett_luce"], "group_pairs": "all", "reference": "cached"}
    rows = run_cli(tmp_path, tiny_config, "dpo", data, steps=90, sequence_length=512, dpo=dpo)
    steps = [row for row in rows if "loss" in row]  # the last row holds the peak memory per phase
    losses = [row["loss"] for row in steps]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert np.mean([row["rewards/ranking_accuracy"] for row in steps[-5:]]) > 0.7
    assert (tmp_path / "dpo" / "reference-cache" / "reference_logps.safetensors").exists()

    run = tmp_path / "dpo"
    scores = tmp_path / "scores.jsonl"
    command = ["score", "--model", str(run / "hf"), "--reference", str(run / "initial"), "--data", str(data)]
    assert main([*command, "--output", str(scores), "--batch-size", "3"]) == 0
    summary = capsys.readouterr().out
    assert f"scored {len(dataset)} groups" in summary and "ranking accuracy" in summary
    lines = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(len(dataset)))
    ranked = correct = 0
    for line in lines:
        assert line["scores"] == list(SCORES) and len(line["logps"]) == len(line["rewards"]) == 4
        for i in range(4):
            for j in range(i + 1, 4):
                ranked, correct = ranked + 1, correct + (line["rewards"][i] > line["rewards"][j])
    accuracy = float(summary.split("ranking accuracy ")[1].split()[0])
    assert accuracy == pytest.approx(correct / ranked, abs=1e-4) and accuracy > 0.7  # chance is 0.5

    policy = from_pretrained(run / "hf")
    sample = dataset[3]
    with torch.no_grad():
        for number, logp in enumerate(lines[3]["logps"]):
            ids = torch.tensor(
                np.concatenate([sample.prompt_ids, sample.response_ids(number)]), dtype=torch.int64
            )[None]
            token_logps = torch.log_softmax(policy(ids)[0].float(), -1)[:-1].gather(1, ids[0, 1:, None])
            assert logp == pytest.approx(float(token_logps[len(sample.prompt_ids) - 1 :].sum()), rel=1e-4)
    assert read_metrics(run / "metrics.jsonl")
