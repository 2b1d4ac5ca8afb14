"""The native decoder against the transformers backend on the same Llama: pairs/s and peak memory of DPO.

    python benchmarks/backends.py                # CPU, fp32: a ~120M-parameter random Llama, 2 repeats
    python benchmarks/backends.py --quick        # smoke run: tiny model, one repeat
    python benchmarks/backends.py --device cuda  # GPU, bf16

Both configurations run unitrain's own trainer (`Trainer(config)`, then `train_step()` calls) with the same config
but `model.backend` (`native`: unitrain's decoder with fused q/k/v and gate/up; `transformers`: the transformers
`LlamaForCausalLM` with unitrain's attention registered through `AttentionInterface`) on the same random Llama
checkpoint, the same prepared HH-RLHF pairs and packing (shared-prompt packed rows), the same seed, hence the same
pairs in every step (checked), full DPO against `dpo.reference: model`. As in `lora.py` (whose worker plumbing this
reuses), each configuration is its own process (its own peak memory), the two take turns step by step with the
order flipping every step, warm-up steps are dropped, and medians and min-max are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from _bench_common import median_spread, spread, write_json
from lora import peak_memory_mib, prepare, run_repeat

HERE = Path(__file__).resolve().parent
VARIANTS = ("native", "transformers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, one repeat (smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--sequence-length", type=int, default=512, help="slots of the one row per step")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--timed-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default=None, help="keep the checkpoint, data and raw results here")
    parser.add_argument("--output", default=None, help="write the full results as JSON here")
    parser.add_argument("--worker", nargs=3, metavar=("SPEC", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rank, args.activation_checkpointing = 16, False  # read by lora.prepare
    return args


def worker(spec_path: str, variant: str, out_path: str) -> None:
    """One configuration: the trainer's own init and steps; writes per-step pairs/seconds and peak memory."""
    from unitrain.config import parse_config
    from unitrain.train.dist import init_distributed
    from unitrain.train.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    raw = {
        "objective": "dpo",
        "model": {"path": spec["model_path"], "backend": variant},
        "data": {"train": spec["dataset_path"]},
        "packing": {"mode": "packed", "share_prompt": True, "sequence_length": spec["sequence_length"]},
        "batch": {"micro_batch_size": 1, "gradient_accumulation_steps": 1},
        "dpo": {"beta": 0.1, "loss": "sigmoid", "reference": "model"},
        "optimizer": {"lr": 1e-5, "weight_decay": 0.0},
        "schedule": {"kind": "constant"},
        "train": {"max_steps": spec["warmup_steps"] + spec["timed_steps"], "device": spec["device"]},
        "run": {"output_dir": tempfile.mkdtemp(dir=spec["workdir"]), "progress": False, "tensorboard": False},
    }
    raw["train"]["dtype"] = spec["dtype"]
    protocol = os.fdopen(os.dup(1), "w", buffering=1)  # one line per step back to the orchestrator
    os.dup2(2, 1)  # everything else the trainer prints goes to the log
    start = time.perf_counter()
    trainer = Trainer(parse_config(raw), init_distributed(spec["device"]), resume=False)
    setup_seconds = time.perf_counter() - start
    cuda = spec["device"].startswith("cuda")
    setup_peak = peak_memory_mib(cuda, reset=True)
    protocol.write("ready\n")
    steps = []
    for command in sys.stdin:
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
    training_peak = peak_memory_mib(cuda)
    write_json(
        out_path,
        {
            "variant": variant,
            "model_class": type(trainer.model).__name__,
            "steps": steps,
            "setup_seconds": setup_seconds,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "setup_peak_mib": setup_peak,
            "training_peak_mib": training_peak,
            "peak_memory_mib": max(setup_peak, training_peak),
        },
    )


def summarize(runs: dict[str, list[dict]], warmup: int) -> dict:
    pairs = {
        variant: [[s["pairs"] for s in run["steps"]] for run in results] for variant, results in runs.items()
    }
    if pairs["native"] != pairs["transformers"]:
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
            "model_class": results[0]["model_class"],
        }
    ratios = [  # the two configurations' times of one step: they ran side by side
        native["seconds"] / other["seconds"]
        for native_run, other_run in zip(runs["native"], runs["transformers"])
        for native, other in zip(native_run["steps"][warmup:], other_run["steps"][warmup:])
    ]
    summary["step_speed_ratio"] = median_spread(ratios)
    summary["max_loss_difference"] = max(
        abs(a["loss"] - b["loss"])
        for native_run, other_run in zip(runs["native"], runs["transformers"])
        for a, b in zip(native_run["steps"], other_run["steps"])
    )
    return summary


def markdown(summary: dict, device: str) -> str:
    memory = "peak allocated MiB" if device.startswith("cuda") else "peak RSS MiB"
    lines = [
        f"| backend | model class | parameters | {memory}: whole run | of it, training steps | pairs/s |",
        "|---|---|---:|---:|---:|---:|",
    ]

    for variant in VARIANTS:
        row = summary[variant]
        lines.append(
            f"| {variant} | {row['model_class']} | {row['parameters']:,} | {spread(row['peak_memory_mib'], 0)} | "
            f"{spread(row['training_peak_mib'], 0)} | {spread(row['pairs_per_second'], 3)} |"
        )
    native, other = summary["native"], summary["transformers"]
    memory_ratio = other["peak_memory_mib"][0] / native["peak_memory_mib"][0]
    speed_ratio = other["pairs_per_second"][0] / native["pairs_per_second"][0]
    lines += [
        "",
        f"transformers / native (medians): pairs/s {speed_ratio:.2f}x (aim >= 0.7x), peak memory {memory_ratio:.2f}x "
        f"(aim <= 1.3x); per step, native's time / transformers' time {spread(summary['step_speed_ratio'], 2)}; "
        f"largest step-loss difference {summary['max_loss_difference']:.1e}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    if args.quick:
        args.hidden_size, args.layers, args.repeats, args.timed_steps = 128, 2, 1, 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="backends-bench-"))
    for sub in ("results", "logs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    spec = prepare(workdir, args)
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1} of {args.repeats}", file=sys.stderr, flush=True)
        for variant, result in run_repeat(
            workdir, repeat, args.warmup_steps + args.timed_steps, "backends.py", VARIANTS
        ).items():
            runs[variant].append(result)
    summary = summarize(runs, args.warmup_steps)
    table = markdown(summary, args.device)
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
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
