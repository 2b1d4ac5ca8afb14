#!/usr/bin/env bash
# The main job end to end on the shared HH-RLHF data, on a fresh machine, in a few minutes on 2 CPU cores:
# install into .venv/ (scripts/setup.sh) → prepare (implicit prompts split off, prompt stored once) → inspect →
# DPO-train a tiny random Llama → score the trained model against its starting point on the pairs the run held
# out (never trained on) → plot the curves.
# Everything is written under $OUT (default: ./runs/demo). Extra arguments are config overrides for training,
# e.g. `scripts/demo.sh train.max_steps=60 dpo.beta=0.2`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/demo}"
DATA="../shared/data"

source scripts/setup.sh plot
mkdir -p "$OUT"

echo "== prepare: HH-RLHF preference pairs → $OUT/hh-rlhf"
unitrain prepare --input "$DATA/hh-rlhf/harmless-base-test.jsonl.gz" \
    --tokenizer "$DATA/tokenizers/gpt2/tokenizer.json" --mode preference --max-length 512 \
    --workers 2 --output "$OUT/hh-rlhf" --overwrite

echo "== inspect: two decoded pairs"
unitrain inspect "$OUT/hh-rlhf" --count 2

echo "== train: DPO of a tiny random Llama (configs/tiny-dpo.yaml)"
rm -rf "$OUT/run"  # the demo starts a new run each time (train refuses to start over an old run's checkpoints)
unitrain train configs/tiny-dpo.yaml data.train="$OUT/hh-rlhf" run.output_dir="$OUT/run" "$@"

echo "== score: the trained policy against its starting point, on the pairs the run held out from training"
unitrain score --model "$OUT/run/hf" --reference "$OUT/run/initial" --data "$OUT/hh-rlhf" \
    --held-out "$OUT/run" --output "$OUT/scores.jsonl"

echo "== plot: $OUT/run/curves.png"
unitrain plot "$OUT/run"

echo "== done: dataset $OUT/hh-rlhf, run $OUT/run (metrics.jsonl, curves.png, hf/), scores $OUT/scores.jsonl"
