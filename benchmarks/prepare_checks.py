"""What the tokenization checks cost `unitrain prepare`: the merge check across prompt/response boundaries
(`unitrain.data.prepare.checks.merged_boundaries`, the only one that tokenizes again) on and off, interleaved in
one process on the shared HH-RLHF file (GPT-2 tokenizer, one worker). Reports the ratio of the best times, the
steadier number on a shared machine.

    python benchmarks/prepare_checks.py --trials 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import unitrain.data.prepare.tokenize as tokenize
from unitrain.data.prepare.pipeline import PrepareConfig, prepare

REPO = Path(__file__).resolve().parents[1]
HH_RLHF = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2 = REPO.parent / "shared" / "data" / "tokenizers" / "gpt2" / "tokenizer.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    checked = tokenize.merged_boundaries
    variants = {"merge check on": checked, "merge check off": lambda *arguments: []}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as work:
        config = PrepareConfig(input=str(HH_RLHF), tokenizer=str(GPT2), output=f"{work}/out", overwrite=True)
        for _ in range(args.trials):
            for name, function in variants.items():
                tokenize.merged_boundaries = function
                started = time.perf_counter()
                prepare(config, progress=False)
                times[name].append(time.perf_counter() - started)
    for name, values in times.items():
        print(f"{name}: best {min(values):.3f} s, median {statistics.median(values):.3f} s")
    print(
        f"cost of the check: {min(times['merge check on']) / min(times['merge check off']):.2f}x (best times)"
    )


if __name__ == "__main__":
    main()
