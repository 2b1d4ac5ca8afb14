"""`unitrain import-gguf FILE.gguf --output DIR`: a GGUF model as a Hugging Face checkpoint for `model.path`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from unitrain.errors import UnitrainError

HELP = "write a Hugging Face checkpoint (weights, tokenizer, chat template) from a GGUF file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the .gguf file (llama, qwen2 or qwen3 architecture; quantized or not)")
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from unitrain.model.gguf import import_gguf

    if Path(args.output).exists() and not args.overwrite:
        raise UnitrainError(f"{args.output} already exists; pass --overwrite to replace it")
    started = time.perf_counter()
    output = import_gguf(args.file, args.output)
    print(f"imported {args.file} to {output} in {time.perf_counter() - started:.1f}s")
    return 0
