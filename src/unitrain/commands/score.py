"""`unitrain score`: the log-prob of every response of a preference dataset under a model (and a reference),
as JSON lines: chosen/rejected fields for a pair, per-response lists for a group of ranked responses.

Evaluates a model on held-out preferences (`--held-out RUN_DIR`: the pairs or groups a training run held out for
validation) and doubles as the correctness probe of the packed layouts: whatever `--packing` and `--share-prompt`
say, the numbers are those of each prompt+response run alone. Pairs report the preference accuracy, groups the
ranking accuracy over every ordered pair of a group and the top-1 accuracy. Rows grow to the longest pair or group
unless `--sequence-length` is given, so by default nothing is skipped; a group with a response that does not fit
an explicit length (with its prompt) is skipped and counted in the summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from unitrain.errors import UnitrainError
from unitrain.model.adapter import WEIGHT_DTYPES as DTYPES

HELP = "write the log-prob of every response of a preference dataset under a model (and a reference)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="Hugging Face checkpoint directory of the model to score, a PEFT LoRA adapter directory, or a "
        "Hugging Face Hub id org/name[@revision]",
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
) -> tuple[dict[int, tuple[list, list]], int]:
    """Dataset index → (log-prob of each response, tokens of each response), in response order; and the count of
    groups skipped (a response that does not fit a row with its prompt)."""
    from tqdm import tqdm

    from unitrain.data.batches.collate import collate
    from unitrain.data.epoch.plan import plan_rows
    from unitrain.train.step.reference import response_logps_of

    plan = plan_rows(dataset, indices, **packing)
    layout = {name: packing[name] for name in ("objective", "mode", "share_prompt")}
    batches = (
        collate(dataset, plan, range(start, min(start + batch_size, len(plan))), **layout)
        for start in range(0, len(plan), batch_size)
    )
    total = -(-len(plan) // batch_size)
    rows: dict[int, tuple[list, list]] = {}
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc=f"scoring {role}", unit="batch", leave=False):
            sums, counts = response_logps_of(model, batch.to(device))  # (Rb,) each
            groups = batch.group_index.tolist()
            for group, number, logp, count in zip(
                batch.response_group.tolist(),
                batch.response_number.tolist(),
                sums.float().cpu().tolist(),
                counts.cpu().tolist(),
            ):
                size = len(dataset[groups[group]].group_scores) if groups[group] not in rows else 0
                logps, tokens = rows.setdefault(groups[group], ([0.0] * size, [0] * size))
                logps[number], tokens[number] = logp, count
    return rows, plan.dropped


def _ranking(scores: list[float], rewards: list[float]) -> tuple[int, int, int]:
    """(ordered pairs, pairs the rewards order as the scores do, 1 if the top reward is a top-scored response)."""
    from unitrain.losses.preference import ranking_counts

    counts = ranking_counts(
        torch.tensor(rewards, dtype=torch.float64),
        torch.zeros(len(scores), dtype=torch.int64),
        torch.tensor(scores, dtype=torch.float64),
        1,
    )
    return tuple(int(count) for count in counts)


def run(args: argparse.Namespace) -> int:
    from unitrain.data.memmap.reader import GPTMemmapDataset
    from unitrain.files import resolve_model
    from unitrain.model.adapter import adapter_base, is_adapter_dir, load_model
    from unitrain.train.compat import check_tokenizer, check_vocab_size
    from unitrain.train.data import held_out_indices
    from unitrain.train.dist import resolve_device
    from unitrain.train.lora import check_adapter_base

    started = time.perf_counter()
    for name in ("model", "reference", "base"):
        setattr(args, name, resolve_model(getattr(args, name), f"--{name}"))
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
    # every response fits with its prompt (a group longer than a row is split): without --sequence-length none
    # is skipped
    sequence_length = args.sequence_length or max(2048, longest)
    packing = dict(
        objective="dpo", mode=args.packing, share_prompt=args.share_prompt, sequence_length=sequence_length
    )
    scored = {}
    for role, path in (("policy", args.model), ("reference", args.reference)):
        if path is None:
            continue
        if is_adapter_dir(path):
            check_adapter_base(path, adapter_base(path, args.base))
        model = load_model(path, base=args.base, dtype=DTYPES[args.dtype], device=device).eval()
        check_vocab_size(model.config.vocab_size, dataset.vocab_size, path)
        scored[role], skipped = _score(model, dataset, indices, packing, args.batch_size, device, role)
        del model
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")  # renamed at the end: never a half-written output
    totals = [0, 0, 0]  # ordered pairs, correctly ordered pairs, top-1 hits
    pairs = []  # (reward margin, longer response's tokens, chosen log-prob minus the reference's) of each pair
    with partial.open("w") as handle:
        for index in sorted(scored["policy"]):
            logps, tokens = scored["policy"][index]
            reference = scored["reference"][index][0] if "reference" in scored else [0.0] * len(logps)
            rewards = [logp - ref for logp, ref in zip(logps, reference)]
            scores = dataset[index].group_scores.tolist()
            counts = _ranking(scores, rewards)
            totals = [total + count for total, count in zip(totals, counts)]
            if scores == [1.0, 0.0]:
                pairs.append((rewards[0] - rewards[1], max(tokens), rewards[0]))
            handle.write(json.dumps(_row(index, logps, tokens, scores, args.reference and reference)) + "\n")
    partial.replace(output)
    groups = len(scored["policy"])
    print(_summary(args, groups, skipped, totals, dataset.is_groups, time.perf_counter() - started))
    if pairs:
        from unitrain.train.logs.report import preference_report

        margins, lengths, gains = np.array(pairs).T  # (P,) each
        print(
            "\n".join(preference_report(margins, lengths.astype(np.int64), gains if args.reference else None))
        )
    return 0


def _row(index: int, logps: list, tokens: list, scores: list, reference: list | None) -> dict:
    """One output line: a pair as chosen/rejected fields, a group as per-response lists."""
    if len(scores) == 2 and scores == [1.0, 0.0]:
        row = {"index": index, "chosen_logp": logps[0], "rejected_logp": logps[1]}
        row.update(chosen_tokens=tokens[0], rejected_tokens=tokens[1])
        if reference:
            row.update(reference_chosen_logp=reference[0], reference_rejected_logp=reference[1])
        return row
    row = {"index": index, "scores": scores, "logps": logps, "tokens": tokens}
    if reference:
        row.update(reference_logps=reference, rewards=[logp - ref for logp, ref in zip(logps, reference)])
    return row


def _summary(
    args: argparse.Namespace, count: int, skipped: int, totals: list[int], groups: bool, seconds: float
) -> str:
    """What was scored, from where, and whether it was held out from training: a number measured on pairs a
    model trained on says little about pairs it did not."""
    from unitrain.text import counted

    unit = "group" if groups else "pair"
    scored = counted(count, unit)
    if args.held_out:
        scored += f" that {args.held_out} held out from training (its validation {unit}s)"
    else:
        scored += f" of {args.data}" + (f" (the first {args.limit:,})" if args.limit else "")
    if args.sequence_length:  # without it rows fit the longest response: none is skipped
        scored += f", {skipped:,} skipped (a response longer than --sequence-length {args.sequence_length})"
    against = "the reference's" if args.reference else "0"
    ordered, correct, top1 = totals
    if groups:
        accuracy = (
            f"ranking accuracy {correct / max(ordered, 1):.4f} over {counted(ordered, 'ordered pair')}, top-1 "
            f"accuracy {top1 / max(count, 1):.4f} (log-probs minus {against})"
        )
    else:
        accuracy = (
            f"preference accuracy {correct / max(count, 1):.4f} (chosen_logp - rejected_logp above {against})"
        )
    line = f"scored {scored} in {seconds:.1f}s; {accuracy}"
    if not args.held_out:
        line += f"; not known to be held out (--held-out RUN_DIR scores the {unit}s a run never trained on)"
    return f"{line}; wrote {args.output}"
