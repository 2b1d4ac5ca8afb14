"""LoRA DPO against full DPO with a frozen reference model: peak memory and pairs/s, same model, data and pairs.

    python benchmarks/lora.py                    # CPU, fp32: a ~500M-parameter random Llama, 3 repeats
    python benchmarks/lora.py --quick            # smoke run: tiny model, one repeat
    python benchmarks/lora.py --device cuda      # GPU, bf16 (the LoRA base is then stored in bf16)

Both configurations run unitrain's own trainer (`Trainer(config)`, then `train_step()` calls: the code a run
executes, without the final checkpoint and export) on the same random Llama checkpoint written by `transformers`,
the same prepared HH-RLHF pairs, the same seed and packing, hence the same pairs in every step (checked).
`full`: every weight trains (fp32 master weights, AdamW) against `dpo.reference: model`, a second frozen copy.
`lora`: rank 16 on all seven projections, the base frozen, the reference the same module with its adapters off.
Each run is its own process, so its peak resident memory (GPU: peak allocated) is its own; the order alternates
between repeats; warm-up steps are dropped; the tables give the median and the min-max over repeats.
Trade-off: a process per run costs start-up seconds but no run's allocations leak into another's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from _bench_common import (
    GPT2_TOKENIZER,
    ModelShape,
    median_spread,
    save_random_llama,
    select_pairs,
    write_json,
)
from dpo_vs_trl import run_worker

VARIANTS = ("full", "lora")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, one repeat (smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--hidden-size", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--sequence-length", type=int, default=512, help="slots of the one row per step")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--timed-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default=None, help="keep the checkpoint, data and raw results here")
    parser.add_argument("--output", default=None, help="write the full results as JSON here")
    parser.add_argument("--worker", nargs=3, metavar=("SPEC", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(spec_path: str, variant: str, out_path: str) -> None:
    """One configuration: the trainer's own init and steps; writes per-step pairs/seconds and peak memory."""
    from unitrain.config import parse_config
    from unitrain.train.dist import init_distributed
    from unitrain.train.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    raw = {
        "objective": "dpo",
        "model": {"path": spec["model_path"]},
        "data": {"train": spec["dataset_path"]},
        "packing": {"mode": "packed", "share_prompt": True, "sequence_length": spec["sequence_length"]},
        "batch": {"micro_batch_size": 1, "gradient_accumulation_steps": 1},
        "dpo": {"beta": 0.1, "loss": "sigmoid", "reference": "model"},
        "optimizer": {"lr": 1e-5, "weight_decay": 0.0},
        "schedule": {"kind": "constant"},
        "train": {
            "max_steps": spec["warmup_steps"] + spec["timed_steps"],
            "device": spec["device"],
            "dtype": spec["dtype"],
        },
        "run": {"output_dir": tempfile.mkdtemp(dir=spec["workdir"]), "progress": False, "tensorboard": False},
        "lora": {"rank": spec["rank"], "alpha": 2.0 * spec["rank"]} if variant == "lora" else {},
    }
    start = time.perf_counter()
    trainer = Trainer(parse_config(raw), init_distributed(spec["device"]), resume=False)
    setup_seconds = time.perf_counter() - start
    cuda = spec["device"].startswith("cuda")
    setup_peak = peak_memory_mib(cuda, reset=True)  # loading and building; then the steps' own peak
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    steps = []
    for _ in range(spec["warmup_steps"] + spec["timed_steps"]):
        metrics = trainer.train_step()
        if metrics is None:
            raise SystemExit("a step had a non-finite loss or gradient")
        seconds = metrics["step_seconds"]
        pairs = round(metrics["pairs_per_second"] * seconds)
        steps.append({"seconds": seconds, "pairs": pairs, "loss": metrics["loss"]})
    training_peak = peak_memory_mib(cuda)
    write_json(
        out_path,
        {
            "variant": variant,
            "steps": steps,
            "setup_seconds": setup_seconds,
            "trainable_parameters": trainable,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "setup_peak_mib": setup_peak,
            "training_peak_mib": training_peak,
            "peak_memory_mib": max(setup_peak, training_peak),
        },
    )


def peak_memory_mib(cuda: bool, reset: bool = False) -> float:
    """Peak GPU memory allocated, or peak resident memory of this process (Linux VmHWM), since the last reset."""
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return peak
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    peak = int(status["VmHWM"].split()[0]) / 1024
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident size
    return peak


def prepare(workdir: Path, args: argparse.Namespace) -> dict:
    """The pairs, the checkpoint and the spec every worker reads."""
    raw_rows, _ = select_pairs(400, max_length=args.sequence_length // 2)
    (workdir / "raw.jsonl").write_text("".join(json.dumps(row) + "\n" for row in raw_rows))
    heads = max(1, args.hidden_size // 64)
    shape = ModelShape(args.hidden_size, args.layers, heads, heads, args.hidden_size * 11 // 4)
    save_random_llama(shape, workdir / "model", seed=0)
    from unitrain.cli import main as unitrain

    prepare_args = ["--tokenizer", str(GPT2_TOKENIZER), "--output", str(workdir / "dataset"), "--no-progress"]
    if unitrain(["prepare", "--input", str(workdir / "raw.jsonl"), *prepare_args, "--overwrite"]) != 0:
        raise SystemExit("unitrain prepare failed")
    gpu = args.device.startswith("cuda")
    spec = {
        "workdir": str(workdir),
        "model_path": str(workdir / "model"),
        "dataset_path": str(workdir / "dataset"),
        "shape": vars(shape),
        "sequence_length": args.sequence_length,
        "rank": args.rank,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.timed_steps,
        "threads": args.threads,
        "device": args.device,
        "dtype": "bfloat16" if gpu else "float32",
    }
    (workdir / "spec.json").write_text(json.dumps(spec, indent=1))
    return spec


def summarize(runs: dict[str, list[dict]], warmup: int) -> dict:
    """Per variant: pairs/s and peak memory over repeats (median, min, max); the same pairs in every step."""
    pairs = {
        variant: [[s["pairs"] for s in run["steps"]] for run in results] for variant, results in runs.items()
    }
    reference = pairs[VARIANTS[0]][0]
    if any(step_pairs != reference for variant_pairs in pairs.values() for step_pairs in variant_pairs):
        raise SystemExit(f"the configurations trained on different pairs per step: {pairs}")
    summary = {}
    for variant, results in runs.items():
        rates = [
            sum(s["pairs"] for s in r["steps"][warmup:]) / sum(s["seconds"] for s in r["steps"][warmup:])
            for r in results
        ]
        summary[variant] = {
            "pairs_per_second": median_spread(rates),
            "peak_memory_mib": median_spread([r["peak_memory_mib"] for r in results]),
            "training_peak_mib": median_spread([r["training_peak_mib"] for r in results]),
            "parameters": results[0]["parameters"],
            "trainable_parameters": results[0]["trainable_parameters"],
            "pairs_per_step": reference,
        }
    return summary


def markdown(summary: dict, device: str) -> str:
    memory = "peak allocated MiB" if device.startswith("cuda") else "peak RSS MiB"
    lines = [
        f"| run | trainable parameters | {memory}: whole run | of it, training steps | pairs/s |",
        "|---|---:|---:|---:|---:|",
    ]

    def spread(values, digits: int) -> str:
        median, low, high = values
        return f"{median:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"

    for variant in VARIANTS:
        row = summary[variant]
        lines.append(
            f"| {variant} | {row['trainable_parameters']:,} of {row['parameters']:,} | "
            f"{spread(row['peak_memory_mib'], 0)} | {spread(row['training_peak_mib'], 0)} | "
            f"{spread(row['pairs_per_second'], 3)} |"
        )
    lora, full = summary["lora"], summary["full"]
    memory_ratio = lora["peak_memory_mib"][0] / full["peak_memory_mib"][0]
    speed_ratio = lora["pairs_per_second"][0] / full["pairs_per_second"][0]
    lines += [
        "",
        f"LoRA / full (medians): peak memory {memory_ratio:.3f}x (target <= 0.35x), pairs/s {speed_ratio:.2f}x "
        "(target >= 1.3x)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    if args.quick:
        args.hidden_size, args.layers, args.sequence_length, args.repeats, args.timed_steps = (
            128,
            2,
            512,
            1,
            1,
        )
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lora-bench-"))
    for sub in ("results", "logs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    spec = prepare(workdir, args)
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS[repeat % 2 :] + VARIANTS[: repeat % 2]:  # alternate which runs first
            name = f"{variant}-{repeat}"
            print(f"running {name}", file=sys.stderr, flush=True)
            runs[variant].append(
                run_worker(workdir, name, ["lora.py", "--worker", str(workdir / "spec.json"), variant])
            )
    summary = summarize(runs, args.warmup_steps)
    table = markdown(summary, args.device)
    machine = {"cpu": platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__}
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "load_average_at_end": os.getloadavg(),
        "seconds": time.perf_counter() - started,
        "spec": spec,
        "summary": summary,
        "runs": runs,
    }
    if args.output:
        write_json(args.output, report)
    print(table)
    print(f"model {spec['shape']}, {args.sequence_length}-slot rows, {args.timed_steps} timed steps after "
          f"{args.warmup_steps} warm-up, {args.repeats} repeats, {args.threads} threads; "
          f"load average at the end {os.getloadavg()[0]:.2f}; {report['seconds']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
