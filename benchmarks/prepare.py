"""Prepare throughput (tokens/s) against its practical limit: raw `tokenizers` batch encoding of the same texts.

The input is the shared HH-RLHF file repeated `--repeat` times. For each worker count N and each mode, it times
`unitrain.data.prepare.prepare` end to end (read .jsonl.gz, parse, split prompts, tokenize, write, hash) and
`Tokenizer.encode_batch_fast` over exactly the segments prepare tokenizes, in a fresh process with
`RAYON_NUM_THREADS=N` (rayon's thread count must be set before its pool starts). Best of `--trials` each.
Trade-off: the baseline gets its texts already in memory, so the ratio charges prepare for all of its I/O.

    python benchmarks/prepare.py --workers 1 2 --repeat 8
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # prepare with 1 worker runs in this process: one thread

from unitrain.data.prepare import PrepareConfig, prepare  # noqa: E402
from unitrain.data.sources import implicit_prompt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HH_RLHF = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2 = REPO.parent / "shared" / "data" / "tokenizers" / "gpt2" / "tokenizer.json"

BASELINE = """
import json, sys, time
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
texts = json.load(open(sys.argv[2]))
best = float("inf")
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    best = min(best, time.perf_counter() - start)
print(json.dumps({"tokens": sum(len(e.ids) for e in encodings), "seconds": best}))
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


def time_prepare(source: Path, output: Path, mode: str, workers: int, trials: int) -> tuple[int, float]:
    best = float("inf")
    for _ in range(trials):
        config = PrepareConfig(
            input=str(source),
            tokenizer=str(GPT2),
            output=str(output),
            mode=mode,
            workers=workers,
            overwrite=True,
        )
        start = time.perf_counter()
        report = prepare(config, progress=False)
        best = min(best, time.perf_counter() - start)
    return report["tokens"], best


def time_baseline(texts: Path, workers: int, trials: int) -> tuple[int, float]:
    env = {
        **os.environ,
        "RAYON_NUM_THREADS": str(workers),
        "TOKENIZERS_PARALLELISM": str(workers > 1).lower(),
    }
    result = subprocess.run(
        [sys.executable, "-c", BASELINE, str(GPT2), str(texts), str(trials)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    measured = json.loads(result.stdout)
    return measured["tokens"], measured["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=8, help="copies of the 2,312 HH-RLHF rows")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    lines = [
        "| mode | workers | rows | prepare tokens/s | raw encode_batch tokens/s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        paths = write_inputs(Path(scratch), args.repeat)
        for workers in args.workers:
            for mode, (source, texts, num_rows) in paths.items():
                tokens, seconds = time_prepare(source, Path(scratch) / "out", mode, workers, args.trials)
                raw_tokens, raw_seconds = time_baseline(texts, workers, args.trials)
                ours, limit = tokens / seconds, raw_tokens / raw_seconds
                lines.append(
                    f"| {mode} | {workers} | {num_rows:,} | {ours:,.0f} | {limit:,.0f} | {ours / limit:.2f}× |"
                )
                print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
