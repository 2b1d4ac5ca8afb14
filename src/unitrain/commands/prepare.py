"""`unitrain prepare`: flags or a YAML file (`--config`) → `PrepareConfig` → `unitrain.data.prepare.prepare`.

Flags given on the command line override the YAML file's values; field names are remapped with
`--field SCHEMA_FIELD=COLUMN` (repeatable) or a `fields:` mapping in the YAML file.
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
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the same settings (flags override it)")
    parser.add_argument(
        "--input", help="local .jsonl[.gz] / .json / .parquet / .csv, save_to_disk dir, or hub name"
    )
    parser.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json")
    parser.add_argument("--output", help="dataset directory to create")
    parser.add_argument("--mode", choices=["auto", "text", "sft", "preference", "conversation"])
    parser.add_argument("--workers", type=int, help="tokenizer processes (output identical for any number)")
    parser.add_argument(
        "--max-length", dest="max_length", type=int, help="truncate / split / drop beyond this"
    )
    parser.add_argument(
        "--on-error", dest="on_error", choices=["skip", "fail"], help="bad rows: drop or stop"
    )
    parser.add_argument("--chat-template", dest="chat_template", help="Jinja chat template file")
    parser.add_argument("--split", help="split of a save_to_disk dict or hub dataset (default train)")
    parser.add_argument("--field", action="append", default=[], metavar="NAME=COLUMN", help="rename a field")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def build_config(args: argparse.Namespace):
    from pydantic import ValidationError

    from unitrain.data.prepare import PrepareConfig

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
    from unitrain.data.prepare import prepare, summary

    config = build_config(args)
    report = prepare(config, progress=args.progress)
    print(summary(report, config.output))
    return 0
