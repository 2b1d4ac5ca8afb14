"""`unitrain export CHECKPOINT --output DIR`: a training checkpoint → a Hugging Face checkpoint directory.

CHECKPOINT is one `checkpoints/step-*` directory, or a run directory (its latest checkpoint is used).
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
    output = export_hf(checkpoint, args.output)
    print(f"exported {checkpoint} to {output}")
    return 0
