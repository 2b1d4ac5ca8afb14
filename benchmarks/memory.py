"""Peak memory and time of DPO on a real model (SmolLM2-135M-Instruct): unitrain against TRL's DPOTrainer.

Every run is a whole process (`unitrain train` through its CLI; TRL through this script's `--worker trl`), run back
to back, and its peak RSS is the kernel's for that process alone (`os.wait4`). Both trainers get the same HH-RLHF
pairs (the first `--pairs` whose prompt + longer response fit `--max-length` tokens of the model's tokenizer), the
same pairs per optimizer step (TRL: batch 4, accumulation 2; unitrain, `packed` with the prompt shared, its
defaults: one row per micro-batch, 2 micro-batches, the row length chosen so that the pairs fill 2 rows per step,
so 8 pairs per step on average; `--layout pair`: exactly 4 pairs per micro-batch, one per row, each padded to the
longest), the same maximum length, fp32, AdamW, beta 0.1, sigmoid loss, an
online reference (full DPO: a frozen copy; LoRA: the adapters switched off). unitrain's per-phase peaks come from
its own `metrics.jsonl`. Trade-off: a handful of steps, since TRL takes minutes per step on two cores; the peak
is reached in the first step and the time per step is the mean over the steps after the first.

    python benchmarks/memory.py --workdir /tmp/memory-bench            # full + LoRA, both trainers
    python benchmarks/memory.py --only unitrain-lora,unitrain-lora-val # a subset of the runs
    python benchmarks/memory.py --only unitrain-full,unitrain-full-no-trim --steps 4  # malloc_trim's A/B
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _bench_common import select_pairs

ROOT = Path(__file__).resolve().parent.parent
LORA = {"rank": 16, "alpha": 32.0}
RUNS = (  # name: (trainer, variant, activation checkpointing, validation)
    ("trl-full", "trl", "full", True, False),  # TRL's default: gradient checkpointing on
    ("unitrain-full", "unitrain", "full", False, False),  # unitrain's default: off
    ("unitrain-full-ckpt", "unitrain", "full", True, False),
    ("trl-full-no-ckpt", "trl", "full", False, False),
    ("trl-lora", "trl", "lora", True, False),
    ("unitrain-lora", "unitrain", "lora", False, False),
    ("unitrain-lora-val", "unitrain", "lora", False, True),
    ("unitrain-full-no-trim", "unitrain", "full", False, False),  # free heap pages kept between phases
)
# The same `unitrain train`, with the C heap's free pages not handed back at phase boundaries (the behaviour before
# PhaseMemory called malloc_trim): the A/B of what that costs in speed and saves in memory.
NO_TRIM = (
    "import sys; import unitrain.train.logs.memory as memory; memory.release_free_memory = lambda: None; "
    "from unitrain.cli import main; sys.exit(main(sys.argv[1:]))"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_process(command: list[str], log: Path, env: dict | None = None) -> tuple[int, float, float]:
    """(exit status, wall seconds, peak RSS MiB) of one whole child process."""
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024


def unitrain_config(args, work: Path, name: str, variant: str, checkpointing: bool, validation: bool) -> Path:
    import yaml

    config = {
        "objective": "dpo",
        "model": {"path": str(args.model)},
        "data": {"train": str(work / "train"), "validation": str(work / "val") if validation else None},
        "packing": {"mode": args.layout, "share_prompt": True, "sequence_length": args.row},
        "batch": {"micro_batch_size": 4 if args.layout == "pair" else 1, "gradient_accumulation_steps": 2},
        "dpo": {"beta": 0.1, "loss": "sigmoid", "reference": "model"},
        "optimizer": {"lr": 1e-6, "weight_decay": 0.0},
        "schedule": {"kind": "constant"},
        "train": {"max_steps": args.steps, "seed": 0, "dtype": "float32", "device": "cpu"},
        "run": {"output_dir": str(work / name), "progress": False, "tensorboard": False, "log_every": 1},
    }
    config["train"]["activation_checkpointing"] = checkpointing
    if variant == "lora":
        config["lora"] = LORA
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def unitrain_result(work: Path, name: str) -> dict:
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step_seconds"] for row in rows if "step_seconds" in row]
    memory = {k.removeprefix("memory/"): v for row in rows for k, v in row.items() if k.startswith("memory/")}
    pairs = [row["pairs_per_second"] * row["step_seconds"] for row in rows if "step_seconds" in row]
    return {"step_seconds": steps, "pairs_per_step": pairs, "phases_rss_mib": memory}


def trl_worker(args) -> int:
    """One TRL DPOTrainer run in this process; prints its step times as JSON on the last line."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    rows = [json.loads(line) for line in Path(args.pairs_file).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    peft_config = None
    if args.variant == "lora":
        from peft import LoraConfig

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules=targets)
    config = DPOConfig(
        output_dir=str(Path(args.pairs_file).parent / "trl-output"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=args.steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        gradient_checkpointing=args.checkpointing,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        train_sampling_strategy="sequential",
        logging_steps=10**6,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
        bf16=False,  # fp32 in both trainers (TRL's default would autocast to bf16)
        seed=0,
    )
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    trainer = DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=peft_config, callbacks=[Clock()],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    bounds = [start, *ends]
    print(json.dumps({"step_seconds": [b - a for a, b in zip(bounds, bounds[1:])]}))
    return 0


def mean_after_first(values: list[float]) -> float:
    rest = values[1:] or values
    return sum(rest) / len(rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, default=Path("/work/cache/smollm2/hf"), help="HF checkpoint dir"
    )
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=16, help="training pairs (steps x 8 by default)")
    parser.add_argument("--validation-pairs", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512, help="prompt + longer response, tokens")
    parser.add_argument("--layout", choices=["packed", "pair"], default="packed", help="unitrain's rows")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated run names")
    parser.add_argument("--output", type=Path, default=None, help="results JSON")
    parser.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return trl_worker(args)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    # the model's own tokenizer; two end tokens (a chat template's end of turn and newline), responses of 2+ tokens
    raw, explicit = select_pairs(
        args.pairs + args.validation_pairs, args.max_length, args.model / "tokenizer.json", 2, 2
    )
    write_jsonl(work / "pairs.jsonl", explicit[: args.pairs])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for name, rows in (("train", raw[: args.pairs]), ("val", raw[args.pairs :])):
        source = write_jsonl(work / f"{name}-raw.jsonl", rows)
        command = [sys.executable, "-m", "unitrain", "prepare", "--input", str(source), "--tokenizer",
                   str(args.model), "--output", str(work / name), "--mode", "preference", "--max-length",
                   str(args.max_length), "--overwrite", "--no-progress", "--workers", "1"]  # fmt: skip
        subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    from unitrain.data.memmap.reader import GPTMemmapDataset

    lengths = GPTMemmapDataset(work / "train").document_lengths  # prompt + chosen + rejected per pair
    rows = 1 if args.layout == "pair" else 2 * args.steps  # packed: the pairs fill 2 rows per step
    args.row = -(-max(int(lengths.max()), int(1.04 * lengths.sum() / rows)) // 8) * 8
    wanted = set(args.only.split(",")) if args.only else None
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    for name, trainer, variant, checkpointing, validation in RUNS:
        if wanted is not None and name not in wanted:
            continue
        log = work / f"{name}.log"
        if trainer == "trl":
            command = [sys.executable, __file__, "--worker", "trl", "--variant", variant, "--model", str(args.model),
                       "--pairs-file", str(work / "pairs.jsonl"), "--steps", str(args.steps), "--workdir", str(work),
                       "--max-length", str(args.max_length)] + (["--checkpointing"] if checkpointing else [])  # fmt: skip
        else:
            config = unitrain_config(args, work, name, variant, checkpointing, validation)
            subprocess.run(["rm", "-rf", str(work / name)], check=True)
            launcher = ["-c", NO_TRIM] if name.endswith("-no-trim") else ["-m", "unitrain"]
            command = [sys.executable, *launcher, "train", str(config)]
        status, wall, peak = run_process(command, log, env)
        if status != 0:
            print(f"{name}: exit {status}, see {log}", file=sys.stderr)
            continue
        entry = {
            "wall_seconds": wall,
            "peak_rss_mib": peak,
            "checkpointing": checkpointing,
            "validation": validation,
        }
        if trainer == "trl":
            entry.update(json.loads(log.read_text().strip().splitlines()[-1]))
        else:
            entry.update(unitrain_result(work, name))
            # the run resets its VmHWM per phase, which resets what wait4 reports too: its own overall peak
            entry["peak_rss_mib"] = max(peak, entry["phases_rss_mib"].get("peak_rss_mib", 0.0))
            peak = entry["peak_rss_mib"]
        entry["step_seconds_mean"] = mean_after_first(entry["step_seconds"])
        per_step = entry.get("pairs_per_step") or [8.0] * len(entry["step_seconds"])  # TRL: batch 4 x 2
        entry["pairs_per_second"] = mean_after_first(per_step) / entry["step_seconds_mean"]
        results["runs"][name] = entry
        print(f"{name}: peak RSS {peak:,.0f} MiB, {entry['pairs_per_second']:.3f} pairs/s, wall {wall:.0f} s",
              flush=True)  # fmt: skip
    print_table(results["runs"])
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))
    return 0


def print_table(runs: dict) -> None:
    pairs = {"full": ("trl-full", "unitrain-full"), "full, both checkpointing": ("trl-full", "unitrain-full-ckpt"),
             "full, neither checkpointing": ("trl-full-no-ckpt", "unitrain-full"),
             "LoRA": ("trl-lora", "unitrain-lora")}  # fmt: skip
    print("| run | peak RSS MiB | pairs/s | s/step | pairs/step | wall s |\n|---|---:|---:|---:|---:|---:|")
    for name, e in runs.items():
        per_step = sum(e.get("pairs_per_step") or [8.0]) / len(e.get("pairs_per_step") or [8.0])
        print(f"| {name} | {e['peak_rss_mib']:,.0f} | {e['pairs_per_second']:.3f} | {e['step_seconds_mean']:.1f} | "
              f"{per_step:.1f} | {e['wall_seconds']:.0f} |")  # fmt: skip
    for label, (theirs, ours) in pairs.items():
        if theirs in runs and ours in runs:
            memory = runs[ours]["peak_rss_mib"] / runs[theirs]["peak_rss_mib"]
            speed = runs[ours]["pairs_per_second"] / runs[theirs]["pairs_per_second"]
            print(f"{label}: unitrain/TRL peak RSS {memory:.2f}x, speed {speed:.1f}x")
    if "unitrain-full" in runs and "unitrain-full-no-trim" in runs:
        memory = runs["unitrain-full"]["peak_rss_mib"] / runs["unitrain-full-no-trim"]["peak_rss_mib"]
        speed = runs["unitrain-full"]["pairs_per_second"] / runs["unitrain-full-no-trim"]["pairs_per_second"]
        print(f"heap pages returned at phase boundaries / kept: peak RSS {memory:.2f}x, speed {speed:.2f}x")
    if "unitrain-lora" in runs and "unitrain-lora-val" in runs:
        ratio = runs["unitrain-lora-val"]["peak_rss_mib"] / runs["unitrain-lora"]["peak_rss_mib"]
        print(f"LoRA with validation / without: peak RSS {ratio:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
