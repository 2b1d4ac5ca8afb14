"""LoRA DPO against full DPO with a frozen reference model: peak memory and pairs/s, same model, data and pairs.

    python benchmarks/lora.py                    # CPU, fp32: a ~500M-parameter random Llama, 2 repeats
    python benchmarks/lora.py --quick            # smoke run: tiny model, one repeat
    python benchmarks/lora.py --device cuda      # GPU, bf16 (the LoRA base is then stored in bf16)
    python benchmarks/lora.py --activation-checkpointing   # both recompute their layers in the backward

Both configurations run unitrain's own trainer (`Trainer(config)`, then `train_step()` calls: the code a run
executes, without the final checkpoint and export) on the same random Llama checkpoint written by `transformers`,
the same prepared HH-RLHF pairs, the same seed and packing, hence the same pairs in every step (checked).
`full`: every weight trains (fp32 master weights, AdamW) against `dpo.reference: model`, a second frozen copy.
`lora`: rank 16 on all seven projections, the base frozen, the reference the same module with its adapters off.
Each configuration is its own process, so its peak resident memory (GPU: peak allocated) is its own. The two
processes of a repeat live side by side and take turns step by step (the order flips every step), so both see
the same machine: on a shared machine whose speed drifts by minutes, the ratio of the two times of one step
is robust where back-to-back runs are not. Warm-up steps are dropped; medians and min-max are reported.
Trade-off: both processes hold their memory at once (one is idle while the other steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
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
    spread,
    write_json,
)

HERE = Path(__file__).resolve().parent
VARIANTS = ("full", "lora")


def common_parser(description: str, hidden_size: int) -> argparse.ArgumentParser:
    """The options every two-configuration benchmark built on this harness takes (`backends.py` too)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, one repeat (smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--hidden-size", type=int, default=hidden_size)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--sequence-length", type=int, default=512, help="slots of the one row per step")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--timed-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default=None, help="keep the checkpoint, data and raw results here")
    parser.add_argument("--output", default=None, help="write the full results as JSON here")
    parser.add_argument("--worker", nargs=3, metavar=("SPEC", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common_parser(__doc__.split("\n")[0], hidden_size=1536)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="both configurations recompute their layers"
    )
    return parser.parse_args(argv)


def lora_sections(variant: str, spec: dict) -> dict:
    """The config sections the `lora` configuration adds: rank `--rank` on all seven projections."""
    return {"lora": {"rank": spec["rank"], "alpha": 2.0 * spec["rank"]}} if variant == "lora" else {}


def worker(spec_path: str, variant: str, out_path: str, sections=lora_sections) -> None:
    """One configuration: the trainer's own init and steps; writes per-step pairs/seconds/loss and peak memory.
    `sections(variant, spec)` gives the config sections that make this configuration what it is."""
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
            "activation_checkpointing": spec.get("activation_checkpointing", False),
        },
        "run": {"output_dir": tempfile.mkdtemp(dir=spec["workdir"]), "progress": False, "tensorboard": False},
    }
    for name, values in sections(variant, spec).items():
        raw[name] = {**raw.get(name, {}), **values}
    protocol = os.fdopen(os.dup(1), "w", buffering=1)  # one line per step back to the orchestrator
    os.dup2(2, 1)  # everything else the trainer prints goes to the log
    start = time.perf_counter()
    trainer = Trainer(parse_config(raw), init_distributed(spec["device"]), resume=False)
    setup_seconds = time.perf_counter() - start
    cuda = spec["device"].startswith("cuda")
    setup_peak = peak_memory_mib(cuda, reset=True)  # loading and building; then the steps' own peak
    protocol.write("ready\n")
    steps = []
    for command in sys.stdin:  # "step" per step, then end of input
        if command.strip() != "step":
            raise SystemExit(f"unexpected command {command!r}")
        metrics = trainer.train_step()
        if metrics is None:
            raise SystemExit("a step had a non-finite loss or gradient")
        seconds = metrics["step_seconds"]
        steps.append(
            {
                "seconds": seconds,
                "pairs": round(metrics["pairs_per_second"] * seconds),
                "loss": metrics["loss"],
            }
        )
        protocol.write(json.dumps(steps[-1]) + "\n")
    # the trainer resets the peak counters at each phase of a step: its recorder holds the steps' overall peak
    recorded = trainer.memory.summary()["memory/peak_allocated_mib" if cuda else "memory/peak_rss_mib"]
    training_peak = max(peak_memory_mib(cuda), recorded)
    write_json(
        out_path,
        {
            "variant": variant,
            "model_class": type(trainer.model).__name__,
            "steps": steps,
            "setup_seconds": setup_seconds,
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "setup_peak_mib": setup_peak,
            "training_peak_mib": training_peak,
            "peak_memory_mib": max(setup_peak, training_peak),
        },
    )


def run_repeat(
    workdir: Path, repeat: int, steps: int, script: str = "lora.py", variants: tuple[str, ...] = VARIANTS
) -> dict[str, dict]:
    """Start each configuration's process (`script --worker`), then let them take turns, one step each, the order
    flipping every step."""
    env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    processes, outputs = {}, {}
    for variant in variants:
        outputs[variant] = workdir / "results" / f"{variant}-{repeat}.json"
        command = [
            sys.executable,
            script,
            "--worker",
            str(workdir / "spec.json"),
            variant,
            str(outputs[variant]),
        ]
        log = (workdir / "logs" / f"{variant}-{repeat}.log").open("w")
        processes[variant] = subprocess.Popen(
            command, cwd=HERE, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
        expect_line(processes[variant], variant)  # set up one at a time
    for step in range(steps):
        for variant in variants if (step + repeat) % 2 == 0 else variants[::-1]:
            processes[variant].stdin.write("step\n")
            processes[variant].stdin.flush()
            expect_line(processes[variant], variant)
    for variant, process in processes.items():
        process.stdin.close()
        if process.wait() != 0:
            raise SystemExit(f"worker {variant}-{repeat} failed; see {workdir / 'logs'}")
    return {variant: json.loads(path.read_text()) for variant, path in outputs.items()}


def expect_line(process: subprocess.Popen, variant: str) -> str:
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"worker {variant} exited early (exit {process.wait()})")
    return line


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
        "activation_checkpointing": args.activation_checkpointing,
    }
    (workdir / "spec.json").write_text(json.dumps(spec, indent=1))
    return spec


def summarize(runs: dict[str, list[dict]], warmup: int) -> dict:
    """Per variant: pairs/s and peak memory over repeats (median, min, max); the same pairs in every step (checked);
    `step_ratio`, the first configuration's time of each timed step over the second's (they ran side by side);
    and the largest difference of the two configurations' losses at one step."""
    first, second = runs
    pairs = {
        variant: [[s["pairs"] for s in run["steps"]] for run in results] for variant, results in runs.items()
    }
    if pairs[first] != pairs[second]:
        raise SystemExit(f"the configurations trained on different pairs per step: {pairs}")
    summary = {}
    for variant, results in runs.items():
        timed = [run["steps"][warmup:] for run in results]
        rates = [sum(s["pairs"] for s in steps) / sum(s["seconds"] for s in steps) for steps in timed]
        summary[variant] = {
            "pairs_per_second": median_spread(rates),
            "peak_memory_mib": median_spread([r["peak_memory_mib"] for r in results]),
            "training_peak_mib": median_spread([r["training_peak_mib"] for r in results]),
            "parameters": results[0]["parameters"],
            "trainable_parameters": results[0]["trainable_parameters"],
            "model_class": results[0]["model_class"],
            "pairs_per_step": pairs[first],
        }

    def side_by_side(start: int) -> list[tuple[dict, dict]]:  # the two configurations' records of one step
        return [
            (a, b)
            for a_run, b_run in zip(runs[first], runs[second])
            for a, b in zip(a_run["steps"][start:], b_run["steps"][start:])
        ]

    summary["step_ratio"] = median_spread([a["seconds"] / b["seconds"] for a, b in side_by_side(warmup)])
    summary["max_loss_difference"] = max(abs(a["loss"] - b["loss"]) for a, b in side_by_side(0))
    return summary


def markdown(summary: dict, device: str) -> str:
    memory = "peak allocated MiB" if device.startswith("cuda") else "peak RSS MiB"
    lines = [
        f"| run | trainable parameters | {memory}: whole run | of it, training steps | pairs/s |",
        "|---|---:|---:|---:|---:|",
    ]

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
        f"(target >= 1.3x); per step, full's time / LoRA's time {spread(summary['step_ratio'], 2)}",
    ]
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace, script: str, variants: tuple[str, ...], prefix: str) -> dict:
    """Prepare, run `args.repeats` repeats of the two configurations side by side, summarize; the report (also
    written to `--output`)."""
    if args.quick:
        args.hidden_size, args.layers, args.repeats, args.timed_steps = 128, 2, 1, 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=prefix))
    for sub in ("results", "logs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    spec = prepare(workdir, args)
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1} of {args.repeats}", file=sys.stderr, flush=True)
        for variant, result in run_repeat(
            workdir, repeat, args.warmup_steps + args.timed_steps, script, variants
        ).items():
            runs[variant].append(result)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    machine = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "load_average_at_end": os.getloadavg(),
        "seconds": time.perf_counter() - started,
        "spec": spec,
        "summary": summarize(runs, args.warmup_steps),
        "runs": runs,
    }
    if args.output:
        write_json(args.output, report)
    return report


def settings_line(args: argparse.Namespace, report: dict, extra: str = "") -> str:
    return (
        f"model {report['spec']['shape']}, {args.sequence_length}-slot rows{extra}, {args.timed_steps} timed steps "
        f"after {args.warmup_steps} warm-up, {args.repeats} repeats, {args.threads} threads; load average at the "
        f"end {report['load_average_at_end'][0]:.2f}; {report['seconds']:.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    report = run_benchmark(args, "lora.py", VARIANTS, "lora-bench-")
    print(markdown(report["summary"], args.device))
    recompute = ", activation checkpointing" if args.activation_checkpointing else ""
    print(settings_line(args, report, recompute))
    return 0


if __name__ == "__main__":
    sys.exit(main())
