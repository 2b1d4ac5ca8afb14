"""Epoch planning at corpus scale: open, plan, cache and step costs per document, before and after.

Synthetic datasets of `--sizes` documents (random ids, log-normal lengths, mean ≈ 330 tokens) and as many
preference pairs (log-normal prompt/response lengths, ≈ 230 tokens a pair) are written through
`DatasetWriter.add_batch` into `--workdir` (a temporary directory, never the repository; deleted at the end
unless `--keep`). Every measurement runs in a fresh process: open time and the resident memory it adds; plan
time per document and the extra peak resident memory of planning (peak RSS during the plan minus RSS after the
open, the peak reset through /proc/self/clear_refs); the fill; the time a fresh process takes to read the cached
plan; `next_step` time. The previous planner (tests/preference/naive_planner.py, the code this one replaced) runs on
the same datasets up to `--before-max` documents. A line time = a + b·n is fitted over the sizes and extrapolated
to 10⁸ and 10⁹. `--train` adds the time from `unitrain train` start to its first optimizer step with a tiny
model on the largest documents dataset; `--windows` the fill and plan time against the window size.

    python benchmarks/scale.py --sizes 100000 1000000 10000000 --before-max 1000000 --train --windows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VOCAB = 50257
CHUNK = 1_000_000  # documents per add_batch call


def write_documents(path: Path, count: int, seed: int = 0) -> None:
    from unitrain.data.memmap.writer import DatasetWriter

    rng = np.random.default_rng(seed)
    with DatasetWriter(path, "pretraining", vocab_size=VOCAB, eos_id=VOCAB - 1, overwrite=True) as writer:
        for begin in range(0, count, CHUNK):
            lengths = np.maximum(rng.lognormal(5.3, 1.0, min(CHUNK, count - begin)), 1).astype(np.int64)
            writer.add_batch(rng.integers(0, VOCAB, int(lengths.sum()), dtype=np.uint16), lengths)


def write_pairs(path: Path, count: int, seed: int = 1) -> None:
    from unitrain.data.memmap.writer import DatasetWriter

    rng = np.random.default_rng(seed)
    with DatasetWriter(path, "preference", vocab_size=VOCAB, eos_id=VOCAB - 1, overwrite=True) as writer:
        for begin in range(0, count, CHUNK):
            n = min(CHUNK, count - begin)
            prompt, chosen, rejected = (
                np.maximum(rng.lognormal(mu, sigma, n), 1).astype(np.int64)
                for mu, sigma in ((4.3, 1.0), (3.6, 0.9), (3.6, 0.9))
            )
            lengths = prompt + chosen + rejected
            spans = np.stack([prompt, prompt + chosen], axis=1)
            tokens = rng.integers(0, VOCAB, int(lengths.sum()), dtype=np.uint16)
            writer.add_batch(tokens, lengths, preference_spans=spans)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _stream(dataset, objective: str, sequence_length: int, window: int | None, cache_dir=None, indices=None):
    from unitrain.data.batches.stream import BatchStream

    return BatchStream(
        [(dataset, np.arange(len(dataset)) if indices is None else indices, 1.0)],
        objective=objective,
        mode="packed",
        share_prompt=True,
        sequence_length=sequence_length,
        micro_batch_size=1,
        accumulation_steps=8,
        seed=0,
        window=window,
        cache_dir=cache_dir,
    )


def worker(task: dict) -> dict:
    """One measurement in this (fresh) process."""
    from unitrain.data.memmap.reader import GPTMemmapDataset

    rss_start = _status("VmRSS")
    started = time.perf_counter()
    dataset = GPTMemmapDataset(task["path"])
    result = {"open_s": time.perf_counter() - started, "open_bytes": _status("VmRSS") - rss_start}
    objective, S, window = task.get("objective"), task.get("sequence_length"), task.get("window")
    if task["kind"] == "open":
        return result
    if task["kind"] == "compile":
        started = time.perf_counter()
        from unitrain.data.epoch.plan_kernel import pack_window

        pack_window(np.array([3, 2], np.int64), 4, False, np.empty(2, np.int64), np.empty(2, np.int64))
        return {"first_call_s": time.perf_counter() - started}
    if task["kind"] == "cache_read":
        stream = _stream(dataset, objective, S, window, task["cache_dir"])
        stream._build = None  # a rebuild would fail loudly: this must be a read
        rss, started = _status("VmRSS"), time.perf_counter()
        rows = len(stream.plan)
        return {"read_s": time.perf_counter() - started, "rows": rows, "read_bytes": _status("VmRSS") - rss}
    _ = dataset.document_lengths if task["kind"] == "old" else None  # the old reader had them at open
    import unitrain.data.batches.stream  # noqa: F401  (torch and the planner imported before the clock)
    from unitrain.data.epoch.plan_kernel import (
        pack_window,  # compiled (or loaded from cache) before the clock
    )

    sys.path.insert(0, str(REPO / "tests" / "preference"))
    import naive_planner

    pack_window(np.array([1], np.int64), 2, False, np.empty(1, np.int64), np.empty(1, np.int64))
    indices = np.arange(len(dataset))  # the caller's (train/data.py's split), not the planner's
    _reset_peak()
    rss = _status("VmRSS")
    started = time.perf_counter()
    if task["kind"] == "old":
        rows, _ = naive_planner.naive_epoch(
            [(dataset, indices, 1.0)],
            seed=0,
            epoch=0,
            objective=objective,
            mode="packed",
            share_prompt=True,
            sequence_length=S,
        )
        plan_s, peak = time.perf_counter() - started, _status("VmHWM")
        return {**result, "plan_s": plan_s, "extra_bytes": peak - rss, "rows": len(rows)}
    stream = _stream(dataset, objective, S, window, task.get("cache_dir"), indices)
    plan = stream.plan
    plan_s, peak = time.perf_counter() - started, _status("VmHWM")
    result.update(plan_s=plan_s, extra_bytes=peak - rss, rows=len(plan), fill=plan.efficiency)
    result["items"] = len(plan.item_document)
    if task.get("steps"):
        stream.next_step()
        started = time.perf_counter()
        for _ in range(task["steps"]):
            stream.next_step()
        result["step_s"] = (time.perf_counter() - started) / task["steps"]
    return result


def run_worker(task: dict, env: dict | None = None) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(task)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    b, a = np.polyfit(np.array(sizes, float), np.array(seconds, float), 1)
    return float(a), float(b)


def time_to_first_step(dataset: Path, workdir: Path) -> dict:
    import yaml

    output = workdir / "run"
    config = {
        "objective": "pretrain",
        "model": {
            "config": {
                "hidden_size": 64,
                "intermediate_size": 176,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            }
        },
        "data": {"train": str(dataset)},
        "packing": {"sequence_length": 4096},
        "batch": {"micro_batch_size": 1, "gradient_accumulation_steps": 8},
        "train": {"max_steps": 2, "seed": 0, "device": "cpu"},
        "run": {"output_dir": str(output), "progress": False, "tensorboard": False},
    }
    path = workdir / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "unitrain", "train", str(path)], stdout=subprocess.PIPE)
    metrics, seen = output / "metrics.jsonl", []  # the time each step's metrics line appears
    while len(seen) < 2:
        if metrics.exists() and len(metrics.read_text().splitlines()) > len(seen):
            seen.append(time.perf_counter() - started)
        elif process.poll() is not None:
            raise RuntimeError(f"unitrain train exited with {process.returncode} before its second step")
        time.sleep(0.02)
    process.wait()
    plans = sorted((output / "plans").glob("plan-*.bin"))
    return {
        "first_step_s": seen[0],
        "second_step_s": seen[1] - seen[0],  # one step's compute: the rest of the first is the start-up
        "plan_file_bytes": plans[0].stat().st_size if plans else 0,
    }


def table(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--before-max", type=int, default=1_000_000, help="largest size the old planner runs on"
    )
    parser.add_argument("--workdir", help="where datasets are written (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the written datasets")
    parser.add_argument(
        "--train", action="store_true", help="time unitrain train to its first optimizer step"
    )
    parser.add_argument("--windows", action="store_true", help="fill and plan time against the window size")
    parser.add_argument(
        "--train-only", action="store_true", help="only write the largest dataset and --train"
    )
    parser.add_argument("--window", type=int, default=65536)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="unitrain-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} load: {os.getloadavg()} workdir {workdir}", flush=True)
    try:
        report(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def compile_times(workdir: Path) -> None:
    """The kernel's first call in a fresh process (numba imported, nothing cached), then with the cache."""
    path = workdir / "tiny"
    write_documents(path, 10)
    with tempfile.TemporaryDirectory() as cache:
        timings = [
            run_worker({"kind": "compile", "path": str(path)}, {"NUMBA_CACHE_DIR": cache}) for _ in range(2)
        ]
    print(f"kernel first call (import + compile): {timings[0]['first_call_s']:.2f} s; "
          f"from the cache: {timings[1]['first_call_s']:.2f} s", flush=True)  # fmt: skip


def report(args, workdir: Path) -> None:
    if args.train_only:
        largest = workdir / f"docs-{max(args.sizes)}"
        write_documents(largest, max(args.sizes))
        print("time to first optimizer step:", time_to_first_step(largest, workdir), flush=True)
        return
    compile_times(workdir)
    results: dict = {}
    for n in args.sizes:
        for name, write in (("docs", write_documents), ("pairs", write_pairs)):
            path = workdir / f"{name}-{n}"
            if not (path / "metadata.json").exists():
                started = time.perf_counter()
                write(path, n)
                results[(name, n, "write_s")] = time.perf_counter() - started
            base = {"path": str(path), "window": args.window}
            results[(name, n, "open")] = run_worker({**base, "kind": "open"})
            objectives = (
                [("pretrain", 4096), ("pretrain", 2048)]
                if name == "docs"
                else [("dpo", 4096), ("dpo", 2048), ("sft", 4096)]
            )
            for objective, S in objectives:
                task = {**base, "kind": "plan", "objective": objective, "sequence_length": S, "steps": 10}
                results[(name, n, objective, S)] = run_worker(task)
                print(name, n, objective, S, results[(name, n, objective, S)], flush=True)
            objective, S = objectives[0]
            cache = workdir / f"plans-{name}-{n}"
            run_worker(
                {
                    **base,
                    "kind": "plan",
                    "objective": objective,
                    "sequence_length": S,
                    "cache_dir": str(cache),
                }
            )
            results[(name, n, "cache")] = run_worker(
                {
                    **base,
                    "kind": "cache_read",
                    "objective": objective,
                    "sequence_length": S,
                    "cache_dir": str(cache),
                }
            )
            results[(name, n, "cache_bytes")] = sum(p.stat().st_size for p in cache.glob("*.bin"))
            shutil.rmtree(cache)
            print(name, n, "cache", results[(name, n, "cache")], flush=True)
            if n <= args.before_max:
                results[(name, n, "old")] = run_worker(
                    {**base, "kind": "old", "objective": objective, "sequence_length": S}
                )
                print(name, n, "old", results[(name, n, "old")], flush=True)
    print_tables(args, results)
    if args.windows:
        windows(args, workdir)
    if args.train:
        largest = workdir / f"docs-{max(args.sizes)}"
        print("\ntime to first optimizer step:", time_to_first_step(largest, workdir), flush=True)


def print_tables(args, results: dict) -> None:
    for name, objective in (("docs", "pretrain"), ("pairs", "dpo"), ("pairs", "sft")):
        rows = []
        for n in args.sizes:
            new = results[(name, n, objective, 4096)]
            old = results.get((name, n, "old")) if objective != "sft" else None
            opened = results[(name, n, "open")]
            rows.append(
                [
                    f"{n:,}",
                    f"{opened['open_s'] * 1e3:.0f} ms, {opened['open_bytes'] / n:.1f} B",
                    f"{old['plan_s'] / n * 1e6:.2f} µs" if old else "—",
                    f"{old['extra_bytes'] / n:.0f} B" if old else "—",
                    f"{new['plan_s'] / n * 1e6:.3f} µs",
                    f"{new['extra_bytes'] / n:.1f} B",
                    f"{new['fill']:.4f}",
                    f"{results[(name, n, objective, 2048)]['fill']:.4f}"
                    if (name, n, objective, 2048) in results
                    else "—",
                    f"{results[(name, n, 'cache')]['read_s'] * 1e3:.0f} ms" if objective != "sft" else "—",
                    f"{new['step_s'] * 1e3:.1f} ms",
                ]
            )
        header = ["items", "open (time, RSS/item)", "before: plan/item", "before: RSS/item", "plan/item",
                  "extra RSS/item", "fill S=4096", "fill S=2048", "cache read", "next_step"]  # fmt: skip
        print(f"\n## {name}, objective {objective}\n" + table(rows, header))
        seconds = [results[(name, n, objective, 4096)]["plan_s"] for n in args.sizes]
        if len(args.sizes) > 1:
            a, b = fit(args.sizes, seconds)
            print(
                f"fit: plan_s = {a:.3f} + {b * 1e6:.4f} µs · n → 10⁸: {a + b * 1e8:.1f} s, 10⁹: {a + b * 1e9:.0f} s"
            )
        if objective != "sft":
            print("cache files:", {n: results[(name, n, "cache_bytes")] for n in args.sizes})


def windows(args, workdir: Path) -> None:
    n = min(max(args.sizes), 1_000_000)
    rows = []
    for window in (1024, 4096, 16384, 65536, 262144, None):
        for name, objective in (("docs", "pretrain"), ("pairs", "dpo")):
            base = {
                "path": str(workdir / f"{name}-{n}"),
                "kind": "plan",
                "objective": objective,
                "window": window,
            }
            fills = [run_worker({**base, "sequence_length": S}) for S in (4096, 2048)]
            rows.append([window or "epoch", name, f"{fills[0]['fill']:.4f}", f"{fills[1]['fill']:.4f}",
                         f"{fills[0]['plan_s'] / n * 1e6:.3f} µs", f"{fills[0]['extra_bytes'] / n:.1f} B"])  # fmt: skip
            print(rows[-1], flush=True)
    print(
        f"\n## window ({n:,} items)\n"
        + table(rows, ["window", "data", "fill 4096", "fill 2048", "plan/item", "RSS/item"])
    )


if __name__ == "__main__":
    main()
