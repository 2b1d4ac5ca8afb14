"""Groups of 4 ranked responses against the same pairs written out as pairs: pairs trained per second.

Builds groups from the shared HH-RLHF data: each dialogue's prompt (cut after its last "\\n\\nAssistant:"), its
chosen and rejected answers and the two answers of the next dialogue, scored 3, 2, 1, 0 (so `group_pairs: all`
yields 6 pairs per prompt). The same 6 pairs per prompt are also written out as plain pairs. Three runs of
`unitrain train` on one random Llama (fp32, CPU, frozen reference model, sigmoid loss, β = 0.1):

  groups    the groups, `group_pairs: all`, `packed` + `share_prompt`: each prompt and response computed once
  pairs     the 6 pairs per prompt, `packed` + `share_prompt` (the best layout for pairs)
  separate  the 6 pairs per prompt, `separate` (TRL's layout: every response a row with its own prompt copy)

Each run trains one epoch over the same prompts, so every configuration trains exactly the same pairs (6 per
prompt); pairs/s is the pairs of every step but the first (warm-up) ÷ their summed step times, and the runs take
turns over `--repeats` repeats (median, min–max). The ideal ratio is the token count 6·(P + 2R) / (P + 4R) for
mean prompt P and response R. Nothing here is a test: the numbers go to docs/BENCHMARKS.md with the command,
the machine and the date.

    python benchmarks/groups.py                                  # about 15 minutes on 2 CPU cores
    python benchmarks/groups.py --prompts 20 --width 128 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from unitrain.config import parse_config  # noqa: E402
from unitrain.data.memmap.reader import GPTMemmapDataset  # noqa: E402
from unitrain.data.prepare.pipeline import PrepareConfig, prepare  # noqa: E402
from unitrain.train import train  # noqa: E402
from unitrain.train.logs.metrics import read_metrics  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
HH_RLHF = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2 = SHARED / "tokenizers" / "gpt2" / "tokenizer.json"
MARKER = "\n\nAssistant:"
SCORES = [3.0, 2.0, 1.0, 0.0]


def build_inputs(root: Path, prompts: int) -> tuple[Path, Path]:
    """groups.jsonl (prompt, 4 responses, scores) and pairs.jsonl (the 6 implied pairs of each)."""
    with gzip.open(HH_RLHF, "rt") as handle:
        rows = [json.loads(line) for _, line in zip(range(prompts + 1), handle)]

    def answer(text: str) -> str:
        return text[text.rfind(MARKER) + len(MARKER) :]

    groups, pairs = [], []
    for row, donor in zip(rows, rows[1:]):
        prompt = row["chosen"][: row["chosen"].rfind(MARKER) + len(MARKER)]
        answers = [
            answer(row["chosen"]),
            answer(row["rejected"]),
            answer(donor["chosen"]),
            answer(donor["rejected"]),
        ]
        groups.append({"prompt": prompt, "responses": answers, "scores": SCORES})
        pairs += [
            {"prompt": prompt, "chosen": answers[i], "rejected": answers[j]}
            for i in range(4)
            for j in range(i + 1, 4)
        ]
    for name, lines in (("groups", groups), ("pairs", pairs)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "groups.jsonl", root / "pairs.jsonl"


def prepared(root: Path, source: Path, max_length: int) -> Path:
    output = root / source.stem
    prepare(PrepareConfig(input=str(source), tokenizer=str(GPT2), output=str(output), max_length=max_length),
            progress=False)  # fmt: skip
    return output


def token_bound(groups: Path) -> tuple[float, float, float]:
    """(mean prompt tokens, mean response tokens, 6·(P + 2R) / (P + 4R))."""
    dataset = GPTMemmapDataset(groups)
    offsets, response_lengths, _ = dataset.group_columns
    prompt = float((dataset.document_lengths.sum() - response_lengths.sum()) / len(dataset))
    response = float(response_lengths.mean())
    return prompt, response, 6 * (prompt + 2 * response) / (prompt + 4 * response)


def run(name: str, data: Path, output: Path, args) -> float:
    """Train one configuration for an epoch; its pairs per second over every step but the first."""
    packing = {"mode": "separate" if name == "separate" else "packed", "share_prompt": True}
    packing["sequence_length"] = args.sequence_length
    raw = {
        "objective": "dpo",
        "model": {
            "config": {
                "hidden_size": args.width,
                "intermediate_size": 3 * args.width,
                "num_hidden_layers": args.layers,
                "num_attention_heads": args.width // 64,
                "tie_word_embeddings": True,
            }
        },  # fmt: skip
        "data": {"train": str(data)},
        "packing": packing,
        # one row of sequence_length slots per step; `separate` rows are one response each, so 2 per pair
        "batch": {"micro_batch_size": args.separate_pairs if name == "separate" else 1},
        "dpo": {"beta": 0.1, "loss": "sigmoid", "reference": "model", "group_pairs": "all"},
        "optimizer": {"lr": 1e-5},
        "train": {"epochs": 1, "seed": 0, "device": "cpu"},
        "run": {"output_dir": str(output), "progress": False, "tensorboard": False, "save_every": 10**6},
    }
    train(parse_config(raw))
    rows = [row for row in read_metrics(output / "metrics.jsonl") if "pairs_per_second" in row][1:]
    pairs = sum(row["pairs_per_second"] * row["step_seconds"] for row in rows)
    return pairs / sum(row["step_seconds"] for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=120, help="HH-RLHF dialogues made into groups")
    parser.add_argument("--max-length", type=int, default=384, help="prepare --max-length")
    parser.add_argument("--sequence-length", type=int, default=2048)
    parser.add_argument("--separate-pairs", type=int, default=6, help="pairs per step in the separate layout")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        groups_input, pairs_input = build_inputs(root, args.prompts)
        data = {"groups": prepared(root, groups_input, args.max_length)}
        data["pairs"] = data["separate"] = prepared(root, pairs_input, args.max_length)
        prompt, response, bound = token_bound(data["groups"])
        rates: dict[str, list[float]] = {name: [] for name in data}
        for repeat in range(args.repeats):
            names = list(data)[repeat % 3 :] + list(data)[: repeat % 3]  # take turns
            for name in names:
                rates[name].append(run(name, data[name], root / f"run-{name}-{repeat}", args))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "prompts": args.prompts,
        "mean_prompt_tokens": prompt,
        "mean_response_tokens": response,
        "token_bound": bound,
        "pairs_per_second": {
            name: {"median": m, "min": min(rates[name]), "max": max(rates[name])}
            for name, m in medians.items()
        },  # fmt: skip
        "groups_vs_pairs": medians["groups"] / medians["pairs"],
        "groups_vs_separate": medians["groups"] / medians["separate"],
        "seconds": round(time.time() - started, 1),
        "settings": vars(args),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
