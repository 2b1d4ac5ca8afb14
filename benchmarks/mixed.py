"""A mixed run (DPO + 0.1 LM on text) against the DPO-only and the LM-only runs of the same data: pairs/s of the
DPO part, target tokens/s of each objective and real tokens/s in total.

    python benchmarks/mixed.py --data runs/mix            # the datasets of the worked example in docs/training.md
    python benchmarks/mixed.py --data runs/mix --quick    # smoke run: a few steps

The three runs are unitrain's own trainer (`Trainer(config)`, then `train_step()` calls) on the same random
Llama (the README demo's shape: 2 layers, width 64, the GPT-2 vocabulary), the same rows of 512 slots and seed,
`dpo.reference: model`. They live in one process and take turns step by step, so a shared machine's drift hits
all three alike; the first steps are dropped, medians are reported. `separate` is the time the DPO-only and the
LM-only runs would need for the pairs and the text targets a mixed step trains, at their own rates: a ratio above
1 means the mixed run does the same work faster than two runs. Trade-off: the runs share one process, so the
measured rates include each other's cache effects (the same for every run).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from unitrain.config import parse_config
from unitrain.train.dist import DistContext
from unitrain.train.trainer import Trainer

MODEL = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
}


def config(data: Path, output: Path, sources: list[dict], objectives: dict | None, steps: int):
    raw = {
        "model": {"config": MODEL},
        "data": {"train": sources},
        "packing": {"sequence_length": 512},
        "batch": {"micro_batch_size": 4, "gradient_accumulation_steps": 1},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "train": {"max_steps": steps, "seed": 0, "device": "cpu"},
        "run": {"output_dir": str(output), "progress": False, "tensorboard": False},
    }
    if objectives:
        raw["objectives"] = objectives
    if any(source["objective"] == "dpo" for source in sources):
        raw["dpo"] = {"beta": 0.1, "reference": "model"}
    return parse_config(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="directory with pairs-train/ and text-train/"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    steps, warmup = (6, 2) if args.quick else (args.steps, args.warmup)
    pairs = {"path": str(args.data / "pairs-train"), "objective": "dpo"}
    text = {"path": str(args.data / "text-train"), "objective": "pretrain"}
    torch.manual_seed(0)
    context = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with tempfile.TemporaryDirectory() as scratch:
        runs = {
            "mixed": ([pairs, text], {"dpo": 1.0, "pretrain": 0.1}),
            "dpo": ([pairs], None),
            "lm": ([text], None),
        }
        trainers = {
            name: Trainer(
                config(args.data, Path(scratch) / name, sources, weights, steps), context, resume=False
            )
            for name, (sources, weights) in runs.items()
        }
        rows: dict[str, list[dict]] = {name: [] for name in runs}
        for step in range(steps):
            for name, trainer in trainers.items():
                started = time.perf_counter()
                metrics = trainer.train_step()
                metrics["wall"] = time.perf_counter() - started
                if step >= warmup:
                    rows[name].append(metrics)
    median = {
        name: {key: statistics.median(r[key] for r in got if key in r) for key in got[0]}
        for name, got in rows.items()
    }
    mixed, dpo, lm = median["mixed"], median["dpo"], median["lm"]
    pairs_step = mixed["dpo/pairs"]
    targets_step = mixed["lm/targets"]
    # an LM-only row's targets are its tokens less one per document piece: tokens/s bounds its targets/s from above
    separate = pairs_step / dpo["pairs_per_second"] + targets_step / lm["tokens_per_second"]
    print(
        f"# {datetime.now(UTC):%Y-%m-%d}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {steps} steps ({warmup} dropped), medians"
    )
    print("| run | step s | pairs/s | LM targets/s | tokens/s (all real tokens) |")
    print("|---|---|---|---|---|")
    print(
        f"| mixed (DPO + 0.1 LM) | {mixed['step_seconds']:.3f} | {mixed['pairs_per_second']:.1f} | "
        f"{mixed['lm/targets_per_second']:.0f} | {mixed['tokens_per_second']:.0f} |"
    )
    print(
        f"| DPO only | {dpo['step_seconds']:.3f} | {dpo['pairs_per_second']:.1f} | — | {dpo['tokens_per_second']:.0f} |"
    )
    print(
        f"| LM only | {lm['step_seconds']:.3f} | — | ≤ {lm['tokens_per_second']:.0f} | {lm['tokens_per_second']:.0f} |"
    )
    print(
        f"\nper mixed step: {pairs_step:.0f} pairs + {targets_step:.0f} LM targets in {mixed['step_seconds']:.3f} s; "
        f"separate runs: {separate:.3f} s ({separate / mixed['step_seconds']:.2f}x the mixed step's time)"
    )
    print(f"DPO part: {mixed['pairs_per_second'] / dpo['pairs_per_second']:.2f}x the DPO-only run's pairs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
