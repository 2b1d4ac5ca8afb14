"""`unitrain prepare`: flags or a YAML file (`--config`) → `PrepareConfig` → `unitrain.data.prepare.pipeline.prepare`.

Flags given on the command line override the YAML file's values; field names are remapped with
`--field SCHEMA_FIELD=COLUMN` (repeatable) or a `fields:` mapping in the YAML file. Under
`torchrun --nproc-per-node M [--nnodes N] -m unitrain prepare ...` (or with `--rank/--world-size` on processes
started by hand) every rank tokenizes its share of the inputs and rank 0 writes the dataset.
"""

from __future__ import annotations

import argparse

from unitrain.errors import UnitrainError

HELP = "tokenize a dataset into a memory-mapped token dataset"
FLAGS = (
    "input",
    "tokenizer",
    "output",
    "mode",
    "workers",
    "max_length",
    "on_error",
    "chat_template",
    "split",
    "chat",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the same settings (flags override it)")
    parser.add_argument(
        "--input",
        nargs="+",
        help="one or more inputs: .jsonl[.gz] / .json / .parquet / .csv / .arrow files, glob patterns (quoted), "
        "directories of such files, a save_to_disk directory, or a hub name",
    )
    parser.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json")
    parser.add_argument("--output", help="dataset directory to create")
    parser.add_argument("--mode", choices=["auto", "text", "sft", "preference", "conversation", "groups"])
    parser.add_argument("--workers", type=int, help="tokenizer processes (output identical for any number)")
    parser.add_argument(
        "--max-length", dest="max_length", type=int, help="truncate / split / drop beyond this"
    )
    parser.add_argument(
        "--on-error", dest="on_error", choices=["skip", "fail"], help="bad rows: drop or stop"
    )
    parser.add_argument("--chat-template", dest="chat_template", help="Jinja chat template file")
    parser.add_argument(
        "--chat",
        action="store_true",
        default=None,
        help='plain-text rows as chat messages (HH-style "Human:/Assistant:" turns, plain prompts) rendered '
        "with the chat template",
    )
    parser.add_argument("--split", help="split of a save_to_disk dict or hub dataset (default train)")
    parser.add_argument("--field", action="append", default=[], metavar="NAME=COLUMN", help="rename a field")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument(
        "--rank",
        type=int,
        help="this process's rank when ranks are started by hand (default: torchrun's RANK)",
    )
    parser.add_argument(
        "--world-size", dest="world_size", type=int, help="number of ranks (default: torchrun's WORLD_SIZE)"
    )


def build_config(args: argparse.Namespace):
    from pydantic import ValidationError

    from unitrain.data.prepare.pipeline import PrepareConfig

    settings: dict = {}
    if args.config:
        import yaml

        try:
            with open(args.config) as handle:
                settings = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError) as error:
            raise UnitrainError(f"{args.config}: cannot read YAML ({error})") from None
        if not isinstance(settings, dict):
            raise UnitrainError(f"{args.config}: expected a mapping of settings")
    settings.update({name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None})
    if args.overwrite:
        settings["overwrite"] = True
    for item in args.field:
        name, sep, column = item.partition("=")
        if not sep or not name or not column:
            raise UnitrainError(f"--field expects NAME=COLUMN, got {item!r}")
        settings.setdefault("fields", {})[name] = column
    try:
        return PrepareConfig(**settings)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors()
        )
        raise UnitrainError(f"prepare settings: {problems}") from None


def run(args: argparse.Namespace) -> int:
    from unitrain.data.prepare.pipeline import prepare, resolve_rank, summary

    config = build_config(args)
    rank, world_size = resolve_rank(args.rank, args.world_size)
    report = prepare(config, progress=args.progress, rank=rank, world_size=world_size)
    if report is None:
        print(f"rank {rank} of {world_size}: its inputs are tokenized; rank 0 writes {config.output}")
    else:
        print(summary(report, config.output))
    return 0
