"""Prepare throughput (tokens/s) against its practical limit: raw `tokenizers` batch encoding of the same texts.

The input is the shared HH-RLHF file repeated `--repeat` times. For each worker count N and each mode, it times
`unitrain.data.prepare.pipeline.prepare` end to end (read .jsonl.gz, parse, split prompts, tokenize, write, hash) and
`Tokenizer.encode_batch_fast` over exactly the segments prepare tokenizes, in a fresh process with
`RAYON_NUM_THREADS=N` (rayon's thread count must be set before its pool starts). Best of `--trials` each, the
two interleaved.
Tokens per CPU-second (all processes) is reported too: on a shared machine it is the steadier number.
Trade-off: the baseline gets its texts already in memory, so the ratio charges prepare for all of its I/O.

    python benchmarks/prepare.py --workers 1 2 --repeat 2 --trials 5
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # prepare with 1 worker runs in this process: one thread

from unitrain.data.prepare.pipeline import PrepareConfig, prepare  # noqa: E402
from unitrain.data.rows.schemas import implicit_prompt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HH_RLHF = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2 = REPO.parent / "shared" / "data" / "tokenizers" / "gpt2" / "tokenizer.json"

BASELINE = """
import json, sys, time
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
texts = json.load(open(sys.argv[2]))
start, cpu = time.perf_counter(), time.process_time()
encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"tokens": sum(len(e.ids) for e in encodings), "seconds": seconds, "cpu": cpu}))
"""


def write_inputs(directory: Path, repeat: int) -> dict:
    """The repeated HH rows as preference (implicit prompt) and text inputs, with the segments each tokenizes."""
    with gzip.open(HH_RLHF, "rt") as handle:
        rows = [json.loads(line) for line in handle] * repeat
    segments = []
    for row in rows:
        cut = implicit_prompt(row["chosen"], row["rejected"])
        segments += [row["chosen"][:cut], row["chosen"][cut:], row["rejected"][cut:]]
    inputs = {
        "preference": (rows, segments),
        "text": ([{"text": row["chosen"]} for row in rows], [row["chosen"] for row in rows]),
    }
    paths = {}
    for mode, (mode_rows, texts) in inputs.items():
        source = directory / f"{mode}.jsonl.gz"
        with gzip.open(source, "wt") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in mode_rows)
        (directory / f"{mode}.texts.json").write_text(json.dumps(texts))
        paths[mode] = (source, directory / f"{mode}.texts.json", len(mode_rows))
    return paths


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_prepare(source: Path, output: Path, mode: str, workers: int) -> dict:
    config = PrepareConfig(
        input=str(source), tokenizer=str(GPT2), output=str(output), mode=mode, workers=workers, overwrite=True
    )
    start, cpu = time.perf_counter(), cpu_seconds()
    report = prepare(config, progress=False)
    return {"tokens": report["tokens"], "seconds": time.perf_counter() - start, "cpu": cpu_seconds() - cpu}


def time_baseline(texts: Path, workers: int) -> dict:
    env = {
        **os.environ,
        "RAYON_NUM_THREADS": str(workers),
        "TOKENIZERS_PARALLELISM": str(workers > 1).lower(),
    }
    command = [sys.executable, "-c", BASELINE, str(GPT2), str(texts)]
    return json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=2, help="copies of the 2,312 HH-RLHF rows")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    lines = [
        "| mode | workers | rows | prepare tokens/s | raw tokens/s | ratio | prepare tokens/CPU-s "
        "| raw tokens/CPU-s | CPU ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        paths = write_inputs(Path(scratch), args.repeat)
        for workers in args.workers:
            for mode, (source, texts, num_rows) in paths.items():
                ours, raw = [], []
                for _ in range(args.trials):  # interleaved, so both see the same load on a shared machine
                    ours.append(time_prepare(source, Path(scratch) / "out", mode, workers))
                    raw.append(time_baseline(texts, workers))
                rates = [
                    max(trial["tokens"] / trial[key] for trial in trials)  # best trial
                    for key in ("seconds", "cpu")
                    for trials in (ours, raw)
                ]
                lines.append(
                    f"| {mode} | {workers} | {num_rows:,} | {rates[0]:,.0f} | {rates[1]:,.0f} "
                    f"| {rates[0] / rates[1]:.2f}× | {rates[2]:,.0f} | {rates[3]:,.0f} | {rates[2] / rates[3]:.2f}× |"
                )
                print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
