"""`unitrain inspect DIR`: the metadata summary and decoded samples, for people (`--json`: for scripts).

Samples are decoded with the tokenizer copied into the dataset. Preference pairs print prompt / chosen /
rejected under separate headers; SFT documents mark masked text with `[masked]...[/masked]`.
"""

from __future__ import annotations

import argparse
import json

from unitrain.errors import UnitrainError
from unitrain.text import counted

HELP = "show a prepared dataset's metadata and decoded samples"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="prepared dataset directory")
    parser.add_argument("--index", type=int, default=0, help="first document to show")
    parser.add_argument(
        "--count", type=int, default=3, help="number of documents to show (0: the summary only)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per sample, no summary")


def decode_sample(sample, decode) -> dict:
    """A sample as decoded text pieces: prompt/chosen/rejected, prompt/responses with scores, or text with its
    (masked) spans."""
    if sample.is_group:
        return {
            "prompt": decode(sample.prompt_ids),
            "responses": [decode(sample.response_ids(k)) for k in range(len(sample.scores))],
            "scores": sample.scores.tolist(),
            "response_spans": sample.response_spans.tolist(),
        }
    if sample.is_preference:
        return {
            "prompt": decode(sample.prompt_ids),
            "chosen": decode(sample.chosen_ids),
            "rejected": decode(sample.rejected_ids),
            "chosen_span": list(sample.chosen_span),
            "rejected_span": list(sample.rejected_span),
        }
    decoded = {"text": decode(sample.token_ids)}
    if sample.loss_masking_spans is not None:
        decoded["loss_masking_spans"] = sample.loss_masking_spans.tolist()
        decoded["masked"] = [decode(sample.token_ids[b:e]) for b, e in sample.loss_masking_spans]
    return decoded


def _marked_text(sample, decode) -> str:
    pieces, cursor = [], 0
    for begin, end in sample.loss_masking_spans.tolist():
        pieces += [
            decode(sample.token_ids[cursor:begin]),
            f"[masked]{decode(sample.token_ids[begin:end])}[/masked]",
        ]
        cursor = end
    pieces.append(decode(sample.token_ids[cursor:]))
    return "".join(pieces)


def run(args: argparse.Namespace) -> int:
    from unitrain.data.memmap.reader import GPTMemmapDataset

    dataset = GPTMemmapDataset(args.path)
    if dataset.tokenizer_path is None:
        raise UnitrainError(f"{args.path}: no tokenizer/ directory to decode with")
    from unitrain.data.prepare.tokenize import TextTokenizer

    decode = TextTokenizer(dataset.tokenizer_path).decode
    if not 0 <= args.index < max(len(dataset), 1):
        raise UnitrainError(f"--index {args.index} out of range for {len(dataset)} documents")
    if args.count < 0:
        raise UnitrainError(f"--count {args.count}: expected 0 (the summary only) or more documents")
    indices = range(args.index, min(args.index + args.count, len(dataset)))
    if args.json:
        for index in indices:
            print(json.dumps({"index": index, **decode_sample(dataset[index], decode)}, ensure_ascii=False))
        return 0
    meta = dataset.metadata
    lengths = dataset.document_lengths
    print(
        f"{args.path}: {meta['kind']} dataset, format v{meta['format_version']}, {counted(len(dataset), 'document')}, "
        f"{counted(meta['num_tokens'], 'token')} ({meta['token_dtype']}), {counted(len(meta['shards']), 'shard')}"
    )
    if len(lengths):
        print(f"  document length: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}")
    tokenizer = meta["tokenizer"]
    print(
        f"  tokenizer: vocab {tokenizer['vocab_size']:,}, bos {tokenizer['bos_id']}, eos {tokenizer['eos_id']}"
    )
    print(
        f"  source: {meta.get('source', {}).get('input')}  schema: {meta.get('schema')}  "
        f"max_length: {meta.get('max_length')}  fingerprint: {dataset.fingerprint[:16]}"
    )
    report = meta.get("report", {})
    if report.get("dropped"):
        print(f"  dropped: {', '.join(f'{k} {v}' for k, v in report['dropped'].items())}")
    for index in indices:
        sample = dataset[index]
        print(f"\n=== document {index} ({len(sample.token_ids)} tokens)")
        if sample.is_group:
            print(f"--- prompt ({len(sample.prompt_ids)} tokens)\n{decode(sample.prompt_ids)}")
            for number, score in enumerate(sample.scores.tolist()):
                ids = sample.response_ids(number)
                print(f"--- response {number}, score {score:g} ({len(ids)} tokens)\n{decode(ids)}")
        elif sample.is_preference:
            for name, ids in (
                ("prompt", sample.prompt_ids),
                ("chosen", sample.chosen_ids),
                ("rejected", sample.rejected_ids),
            ):
                print(f"--- {name} ({len(ids)} tokens)\n{decode(ids)}")
        elif sample.loss_masking_spans is not None:
            print(_marked_text(sample, decode))
        else:
            print(decode(sample.token_ids))
    return 0
