"""DPO: unitrain against TRL's DPOTrainer, same data, same model, same machine, one run.

    python benchmarks/dpo_vs_trl.py            # full CPU run (about 10 minutes on 2 cores)
    python benchmarks/dpo_vs_trl.py --quick    # smoke run: tiny model, few steps, one repeat
    python benchmarks/dpo_vs_trl.py --device cuda --dtype bfloat16   # GPU: ~0.6B model, MFU vs bf16 peak

Steps: select a fixed slice of HH-RLHF (explicit prompts), save one random Llama checkpoint with `transformers`,
`unitrain prepare` the slice, then the correctness gate (token ids of every pair, step-0 per-pair log-probs and
losses of every packing layout against TRL's, in fp32 on any device, against a distinct reference so that the
losses are not all log 2); only if it passes, the timed runs: each trainer in its own process (so peak RSS is its
own), interleaved over repeats, warm-up steps discarded; a torch.mm peak at the model's shapes before and after.
Needs the `bench` extra (`pip install -e .[bench]`). Trade-off: a process per run costs start-up
seconds but keeps every number isolated; no timing is asserted anywhere, the script only reports.
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
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from _bench_common import (
    GPT2_TOKENIZER,
    ModelShape,
    Spec,
    measure_matmul_peak,
    save_random_llama,
    select_pairs,
    write_json,
)
from _bench_report import gate_report, markdown_tables, step_lengths, summarize, trl_real_slots

HERE = Path(__file__).resolve().parent
GATE_TOLERANCE = 1e-4
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, matched against the device name.
GPU_BF16_PEAKS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
LAYOUT_RUNS = [("separate", "dup"), ("pair", "dup"), ("pair", "shared"), ("packed", "dup")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, one repeat (smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--pairs-per-step", type=int, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--timed-steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument(
        "--no-layouts", action="store_true", help="skip the separate/pair/packed breakdown runs"
    )
    parser.add_argument(
        "--layout-repeats",
        type=int,
        default=1,
        help="repeats of the breakdown runs (headline runs: --repeats)",
    )
    parser.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's default; off here")
    parser.add_argument("--workdir", default=None, help="keep checkpoints, data and raw results here")
    parser.add_argument("--output", default=None, help="write the full results as JSON here")
    return parser.parse_args(argv)


def presets(args: argparse.Namespace) -> dict:
    """Defaults per target: CPU fp32 (finishes in ~10 min on 2 cores), GPU bf16 (~0.6B), or --quick."""
    gpu = args.device.startswith("cuda")
    if args.quick:
        values = dict(shape=ModelShape(128, 2, 4, 4, 256), pairs=4, warmup=1, timed=1, repeats=1)
    elif gpu:
        values = dict(shape=ModelShape(1536, 16, 12, 12, 4096), pairs=16, warmup=2, timed=5, repeats=2)
    else:
        values = dict(shape=ModelShape(512, 4, 8, 8, 1536), pairs=4, warmup=1, timed=2, repeats=2)
    shape = values["shape"]
    if args.hidden_size:
        heads = max(1, args.hidden_size // 64)
        intermediate = shape.intermediate_size * args.hidden_size // shape.hidden_size
        shape = replace(shape, hidden_size=args.hidden_size, num_heads=heads, num_kv_heads=heads)
        shape = replace(shape, intermediate_size=intermediate)
    if args.layers:
        shape = replace(shape, num_layers=args.layers)
    return {
        "shape": shape,
        "pairs_per_step": args.pairs_per_step or values["pairs"],
        "warmup_steps": args.warmup_steps if args.warmup_steps is not None else values["warmup"],
        "timed_steps": args.timed_steps or values["timed"],
        "repeats": args.repeats or values["repeats"],
        "dtype": args.dtype or ("bfloat16" if gpu else "float32"),
        "threads": args.threads or os.cpu_count(),
        "gpu": gpu,
    }


def prepare_inputs(workdir: Path, settings: dict, args: argparse.Namespace) -> tuple[Spec, float]:
    """Slice, checkpoints and `unitrain prepare`; returns the spec and the prepare time."""
    total_pairs = settings["pairs_per_step"] * (settings["warmup_steps"] + settings["timed_steps"])
    sequence_length = 1024
    raw_rows, explicit_rows = select_pairs(total_pairs, max_length=sequence_length // 2)
    if len(raw_rows) < total_pairs:
        raise SystemExit(f"only {len(raw_rows)} usable pairs, {total_pairs} needed")
    (workdir / "raw.jsonl").write_text("".join(json.dumps(row) + "\n" for row in raw_rows))
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in explicit_rows))
    save_random_llama(settings["shape"], workdir / "policy", seed=0)
    save_random_llama(settings["shape"], workdir / "gate-reference", seed=1)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "unitrain", "prepare", "--input", str(workdir / "raw.jsonl"), "--tokenizer",
         str(GPT2_TOKENIZER), "--output", str(workdir / "dataset"), "--no-progress", "--overwrite"],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    prepare_seconds = time.perf_counter() - start
    spec = Spec(
        workdir=str(workdir),
        model_path=str(workdir / "policy"),
        gate_reference_path=str(workdir / "gate-reference"),
        pairs_path=str(workdir / "pairs.jsonl"),
        dataset_path=str(workdir / "dataset"),
        shape=settings["shape"],
        pairs_per_step=settings["pairs_per_step"],
        warmup_steps=settings["warmup_steps"],
        timed_steps=settings["timed_steps"],
        gate_pairs=min(8, total_pairs),
        sequence_length=sequence_length,
        threads=settings["threads"],
        device=args.device,
        dtype=settings["dtype"],
        trl_gradient_checkpointing=args.trl_gradient_checkpointing,
    )
    spec.save(workdir / "spec.json")
    return spec, prepare_seconds


def run_worker(workdir: Path, name: str, arguments: list[str]) -> dict:
    """One trainer in its own process; its stdout/stderr go to `<workdir>/logs/<name>.log`."""
    out = workdir / "results" / f"{name}.json"
    log = workdir / "logs" / f"{name}.log"
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
    }
    with log.open("w") as handle:
        done = subprocess.run(
            [sys.executable, *arguments, str(out)], cwd=HERE, env=env, stdout=handle, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"worker {name} failed (exit {done.returncode}); end of {log}:\n" + "\n".join(tail))
    return json.loads(out.read_text())


def trainer_commands(spec_path: str, layouts: bool) -> dict[str, list[str]]:
    commands = {
        "trl-online": ["_bench_trl.py", spec_path, "online"],
        "ours-online": ["_bench_ours.py", spec_path, "online", "packed", "shared"],
        "trl-precomputed": ["_bench_trl.py", spec_path, "precomputed"],
        "ours-cached": ["_bench_ours.py", spec_path, "cached", "packed", "shared"],
    }
    if layouts:
        for mode, share in LAYOUT_RUNS:
            commands[f"ours-online-{mode}-{share}"] = ["_bench_ours.py", spec_path, "online", mode, share]
    return commands


def machine_description(device: str) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    description = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import trl

        description["trl"] = trl.__version__
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e .[bench]") from None
    if device.startswith("cuda"):
        description["gpu"] = torch.cuda.get_device_name()
    return description


def nominal_gpu_peak(name: str) -> float | None:
    return next((peak for key, peak in GPU_BF16_PEAKS.items() if key in name), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = presets(args)
    torch.set_num_threads(settings["threads"])
    machine = machine_description(args.device)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    for sub in ("results", "logs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    spec, prepare_seconds = prepare_inputs(workdir, settings, args)
    spec_path = str(workdir / "spec.json")
    print(
        f"workdir {workdir}; model {spec.shape}; {spec.pairs_per_step} pairs/step; prepare {prepare_seconds:.1f} s"
    )

    trl_gate = run_worker(workdir, "gate-trl", ["_bench_trl.py", spec_path, "gate"])
    ours_gate = run_worker(workdir, "gate-ours", ["_bench_ours.py", spec_path, "gate", "packed", "shared"])
    gate = gate_report(trl_gate, ours_gate, GATE_TOLERANCE)
    results = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine,
               "argv": sys.argv[1:] if argv is None else argv, "spec": json.loads(Path(spec_path).read_text()),
               "prepare_seconds": prepare_seconds, "gate": gate}  # fmt: skip
    print("gate:", json.dumps(gate["layouts"]), "differing pairs:", gate["differing_pairs"])
    if not gate["passed"]:
        print("CORRECTNESS GATE FAILED: no speed is reported (see the gate numbers above)")
        if args.output:
            write_json(args.output, results)
        return 1

    tokens = 8192 if settings["gpu"] else 1024
    peaks = [measure_matmul_peak(spec.shape, tokens, args.device, spec.torch_dtype)]
    commands = trainer_commands(spec_path, layouts=not args.no_layouts)
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    names = list(commands)
    for repeat in range(settings["repeats"]):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]  # rotate: no trainer always first
        for name in order:
            if name.startswith("ours-online-") and repeat >= args.layout_repeats:
                continue
            runs[name].append(run_worker(workdir, f"{name}-r{repeat}", commands[name]))
            print(f"repeat {repeat} {name}: {sum(s['wall'] for s in runs[name][-1]['steps']):.1f} s")
    peaks.append(measure_matmul_peak(spec.shape, tokens, args.device, spec.torch_dtype))
    matmul_peak = max(peak["mix_flops_per_s"] for peak in peaks)

    per_step = step_lengths(spec, trl_gate["token_ids"])
    for run in runs["trl-online"] + runs["trl-precomputed"]:
        run["real_slots"] = trl_real_slots(spec, per_step)
    summaries = {name: summarize(spec, name_runs, per_step, matmul_peak) for name, name_runs in runs.items()}
    lengths = [pair for step in per_step[spec.warmup_steps :] for pair in step]
    prompt = sum(p for p, _, _ in lengths)
    responses = sum(c + r for _, c, r in lengths)
    trl_cached, ours_cached = (
        runs["trl-precomputed"][0]["reference_logps"],
        runs["ours-cached"][0]["reference_logps"],
    )
    results.update(
        matmul_peaks=peaks,
        matmul_peak_flops_per_s=matmul_peak,
        ideal_token_bound=(2 * prompt + responses) / (prompt + responses),
        cached_reference_max_abs_diff=max(abs(a - b) for x, y in zip(trl_cached, ours_cached) for a, b in zip(x, y)),
        online_loss_max_abs_diff=max(
            abs(a - b) for a, b in zip(summaries["trl-online"]["losses"], summaries["ours-online"]["losses"])
        ),
        summaries=summaries,
        total_seconds=time.perf_counter() - started,
    )  # fmt: skip
    if settings["gpu"]:
        nominal = nominal_gpu_peak(machine["gpu"])
        results["gpu_bf16_nominal_peak"] = nominal
        for summary in summaries.values():
            summary["mfu_vs_nominal"] = (
                None if nominal is None else summary["useful_flops_per_s"][0] / nominal
            )
    print_report(results)
    if args.output:
        write_json(args.output, results)
    return 0


def print_report(results: dict) -> None:
    summaries = results["summaries"]
    print()
    print(markdown_tables(results))
    print()
    online = summaries["ours-online"]["pairs_per_s"][0] / summaries["trl-online"]["pairs_per_s"][0]
    cached = summaries["ours-cached"]["pairs_per_s"][0] / summaries["trl-precomputed"]["pairs_per_s"][0]
    memory = summaries["ours-online"]["peak_rss_mib"][0] / summaries["trl-online"]["peak_rss_mib"][0]
    print(f"speed-up online {online:.2f}x, cached {cached:.2f}x; ideal token bound (2P+C+R)/(P+C+R) "
          f"{results['ideal_token_bound']:.2f}; peak RSS ours/TRL {memory:.2f}")  # fmt: skip
    print(f"torch.mm peak at model shapes: {results['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s; "
          f"step-loss max |diff| TRL vs ours (online) {results['online_loss_max_abs_diff']:.2e}; "
          f"cached reference max |diff| {results['cached_reference_max_abs_diff']:.2e}")  # fmt: skip
    if results.get("gpu_bf16_nominal_peak"):
        for name, summary in summaries.items():
            print(f"MFU vs nominal bf16 peak, {name}: {summary['mfu_vs_nominal']:.1%}")
    print(f"machine {results['machine']}; total {results['total_seconds']:.0f} s; {results['date']}")


if __name__ == "__main__":
    sys.exit(main())
