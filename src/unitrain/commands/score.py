"""`unitrain score`: per-pair log-probs of a model (and a reference) on a preference dataset, as JSON lines.

Evaluates a model on held-out preferences and doubles as the correctness probe of the packed layouts: whatever
`--packing` and `--share-prompt` say, the numbers are those of each prompt+response run alone. Rows grow to the
longest pair unless `--sequence-length` is given, so by default no pair is skipped; a pair that does not fit an
explicit length is skipped and counted in the summary.
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
        "--model",
        required=True,
        help="Hugging Face checkpoint directory of the model to score, or a PEFT LoRA adapter directory",
    )
    parser.add_argument(
        "--base", help="base checkpoint of adapter directories (default: their base_model_name_or_path)"
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
    parser.add_argument("--limit", type=int, help="score only the first N pairs of the dataset")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
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

    from unitrain.data.packing import plan_rows
    from unitrain.data.sampling import iterate_batches
    from unitrain.train.reference import pair_logps_of

    plan = plan_rows(dataset, indices, **packing)
    batches = iterate_batches(dataset, indices, micro_batch_size=batch_size, **packing)
    total = -(-len(plan.rows) // batch_size)
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
    from unitrain.model.adapter import adapter_base, is_adapter_dir, load_model
    from unitrain.train.lora import check_adapter_base

    started = time.perf_counter()
    dataset = GPTMemmapDataset(args.data)
    if dataset.kind != "preference":
        raise UnitrainError(f"{args.data}: score needs a preference dataset, this one is {dataset.kind}")
    if args.batch_size < 1:
        raise UnitrainError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UnitrainError(f"--limit must be at least 1, got {args.limit}")
    indices = np.arange(len(dataset) if args.limit is None else min(args.limit, len(dataset)))
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
        if is_adapter_dir(path):
            check_adapter_base(path, adapter_base(path, args.base))
        model = load_model(path, base=args.base, dtype=DTYPES[args.dtype], device=args.device).eval()
        scored[role], skipped = _score(model, dataset, indices, packing, args.batch_size, args.device, role)
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
    pairs = len(scored["policy"])
    against = "the reference's margin" if args.reference else "0"
    print(
        f"scored {pairs} pairs ({skipped} skipped: longer than --sequence-length {sequence_length}) in "
        f"{time.perf_counter() - started:.1f}s; preference accuracy {wins / max(pairs, 1):.4f} "
        f"(chosen_logp - rejected_logp above {against}); wrote {output}"
    )
    return 0
