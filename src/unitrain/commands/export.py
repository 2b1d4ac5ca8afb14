"""`unitrain export CHECKPOINT --output DIR [--merge]`: a training checkpoint → a Hugging Face directory.

CHECKPOINT is one `checkpoints/step-*` directory, or a run directory (its latest checkpoint is used). A LoRA
checkpoint gives a PEFT adapter directory; `--merge` gives its base with the adapters merged in instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unitrain.errors import UnitrainError

HELP = "write a Hugging Face checkpoint from a training checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="a checkpoints/step-* directory, or a run directory (latest checkpoint)"
    )
    parser.add_argument(
        "--output", required=True, help="directory for config.json, weights and tokenizer files"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="LoRA: write the base with the adapters merged in, not an adapter",
    )


def run(args: argparse.Namespace) -> int:
    from unitrain.train.checkpoint import export_hf, latest_checkpoint

    if Path(args.output).exists() and not args.overwrite:
        raise UnitrainError(f"{args.output} already exists; pass --overwrite to replace it")
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "meta.json").is_file():
        latest = latest_checkpoint(checkpoint)
        if latest is None:
            raise UnitrainError(f"{checkpoint}: neither a checkpoint nor a run directory with checkpoints")
        checkpoint = latest
    output = export_hf(checkpoint, args.output, merge=args.merge)
    print(f"exported {checkpoint} to {output}")
    return 0
