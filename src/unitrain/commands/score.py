"""`unitrain score`: per-pair log-probs of a model (and a reference) on a preference dataset, as JSON lines.

Evaluates a model on held-out preferences (`--held-out RUN_DIR`: the pairs a training run held out for
validation) and doubles as the correctness probe of the packed layouts: whatever `--packing` and `--share-prompt`
say, the numbers are those of each prompt+response run alone. Rows grow to the longest pair unless
`--sequence-length` is given, so by default no pair is skipped; a pair that does not fit an explicit length is
skipped and counted in the summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from unitrain.errors import UnitrainError

HELP = "write per-pair log-probs of a model (and a reference) on a preference dataset"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="Hugging Face checkpoint directory of the model to score"
    )
    parser.add_argument("--data", required=True, help="prepared preference dataset directory")
    parser.add_argument(
        "--reference", help="checkpoint directory of a reference model, scored on the same pairs"
    )
    parser.add_argument(
        "--packing", choices=("packed", "pair", "separate"), default="packed", help="batch layout"
    )
    parser.add_argument(
        "--share-prompt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store each prompt once per pair (default) or duplicate it",
    )
    parser.add_argument(
        "--sequence-length", type=int, help="row budget in tokens (default: 2048, raised to the longest pair)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    parser.add_argument(
        "--held-out",
        metavar="RUN_DIR",
        help="score only the pairs the training run in RUN_DIR held out (its validation pairs of --data)",
    )
    parser.add_argument("--limit", type=int, help="score only the first N pairs (of the held-out ones)")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="score although a model's tokenizer.json is not the one the data was prepared with",
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32", help="weights dtype (default float32)"
    )
    parser.add_argument("--output", required=True, help="JSON-lines file to write, one object per pair")


def _score(
    model, dataset, indices: np.ndarray, packing: dict, batch_size: int, device, role: str
) -> tuple[dict[int, tuple], int]:
    """Dataset index → (chosen logp, rejected logp, chosen tokens, rejected tokens); and the skipped count."""
    from tqdm import tqdm

    from unitrain.data.packing import collate
    from unitrain.data.plan import plan_rows
    from unitrain.train.reference import pair_logps_of

    plan = plan_rows(dataset, indices, **packing)
    layout = {name: packing[name] for name in ("objective", "mode", "share_prompt")}
    batches = (
        collate(dataset, plan, range(start, min(start + batch_size, len(plan))), **layout)
        for start in range(0, len(plan), batch_size)
    )
    total = -(-len(plan) // batch_size)
    rows = {}
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc=f"scoring {role}", unit="batch", leave=False):
            sums, counts = pair_logps_of(model, batch.to(device))  # (P, 2) each
            for index, (chosen, rejected), (chosen_count, rejected_count) in zip(
                batch.pair_index.tolist(), sums.float().cpu().tolist(), counts.cpu().tolist()
            ):
                rows[index] = (chosen, rejected, chosen_count, rejected_count)
    return rows, plan.dropped


def run(args: argparse.Namespace) -> int:
    from unitrain.data.memmap import GPTMemmapDataset
    from unitrain.model import from_pretrained
    from unitrain.train.compat import check_tokenizer, check_vocab_size
    from unitrain.train.data import held_out_indices
    from unitrain.train.dist import resolve_device

    started = time.perf_counter()
    dataset = GPTMemmapDataset(args.data)
    if dataset.kind != "preference":
        raise UnitrainError(f"{args.data}: score needs a preference dataset, this one is {dataset.kind}")
    if args.batch_size < 1:
        raise UnitrainError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UnitrainError(f"--limit must be at least 1, got {args.limit}")
    device = resolve_device(args.device, setting="--device ")
    for path in (args.model, args.reference):
        if path is not None:
            check_tokenizer(path, [dataset], args.allow_tokenizer_mismatch, "--allow-tokenizer-mismatch")
    indices = held_out_indices(args.held_out, dataset) if args.held_out else np.arange(len(dataset))
    indices = indices[: args.limit]
    longest = int(dataset.document_lengths[indices].max()) if len(indices) else 0
    # a pair needs at most prompt + chosen + rejected + prompt slots; without --sequence-length every pair fits
    sequence_length = args.sequence_length or max(2048, 2 * longest)
    packing = dict(
        objective="dpo", mode=args.packing, share_prompt=args.share_prompt, sequence_length=sequence_length
    )
    scored = {}
    for role, path in (("policy", args.model), ("reference", args.reference)):
        if path is None:
            continue
        model = from_pretrained(path, dtype=DTYPES[args.dtype], device=device).eval()
        check_vocab_size(model.config.vocab_size, dataset.vocab_size, path)
        scored[role], skipped = _score(model, dataset, indices, packing, args.batch_size, device, role)
        del model
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")  # renamed at the end: never a half-written output
    wins = 0
    with partial.open("w") as handle:
        for index in sorted(scored["policy"]):
            chosen, rejected, chosen_count, rejected_count = scored["policy"][index]
            row = {
                "index": index,
                "chosen_logp": chosen,
                "rejected_logp": rejected,
                "chosen_tokens": chosen_count,
                "rejected_tokens": rejected_count,
            }
            margin = 0.0
            if "reference" in scored:
                reference_chosen, reference_rejected = scored["reference"][index][:2]
                row["reference_chosen_logp"], row["reference_rejected_logp"] = (
                    reference_chosen,
                    reference_rejected,
                )
                margin = reference_chosen - reference_rejected
            wins += chosen - rejected > margin
            handle.write(json.dumps(row) + "\n")
    partial.replace(output)
    print(_summary(args, len(scored["policy"]), skipped, wins, time.perf_counter() - started))
    return 0


def _summary(args: argparse.Namespace, pairs: int, skipped: int, wins: int, seconds: float) -> str:
    """What was scored, from where, and whether those pairs were held out from training: a number measured on
    pairs a model trained on says little about pairs it did not."""
    from unitrain.text import counted

    scored = counted(pairs, "pair")
    if args.held_out:
        scored += f" that {args.held_out} held out from training (its validation pairs)"
    else:
        scored += f" of {args.data}" + (f" (the first {args.limit:,})" if args.limit else "")
    if args.sequence_length:  # without it rows grow to the longest pair: none is skipped
        scored += f", {skipped:,} skipped (longer than --sequence-length {args.sequence_length})"
    against = "the reference's margin" if args.reference else "0"
    line = (
        f"scored {scored} in {seconds:.1f}s; preference accuracy {wins / max(pairs, 1):.4f} "
        f"(chosen_logp - rejected_logp above {against})"
    )
    if not args.held_out:
        line += "; not known to be held out (--held-out RUN_DIR scores the pairs a run never trained on)"
    return f"{line}; wrote {args.output}"
