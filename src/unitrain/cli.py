"""`unitrain` command line: one subcommand per module in `unitrain.commands`, imported only when used.

Each command module exposes `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
A `UnitrainError` is printed as one line (`error: ...`) with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from unitrain.errors import UnitrainError

COMMANDS = {
    "prepare": "tokenize a dataset into a memory-mapped token dataset",
    "inspect": "show a prepared dataset's metadata and decoded samples",
    "train": "train a model (pretraining, SFT or DPO) from a YAML config",
    "score": "write the log-prob of every response of a preference dataset under a model (and a reference)",
    "export": "write a Hugging Face checkpoint from a training checkpoint",
    "generate": "write completions of prompts from a checkpoint, an adapter or a run (and from its start)",
    "plot": "draw the training curves of a run as a PNG",
    "import-gguf": "write a Hugging Face checkpoint (weights, tokenizer, chat template) from a GGUF file",
}


def _module(command: str):
    return importlib.import_module(f"unitrain.commands.{command.replace('-', '_')}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    from unitrain import __version__

    parser = argparse.ArgumentParser(
        prog="unitrain", description="Pretraining, SFT and DPO from one token format."
    )
    parser.add_argument("--version", action="version", version=f"unitrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _module(name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in COMMANDS else None
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    if (
        extra
        and isinstance(getattr(args, "overrides", None), list)
        and not any(a.startswith("-") for a in extra)
    ):
        args.overrides += (
            extra  # `train run.yaml a=1 --resume b=2`: key=value overrides before and after a flag
        )
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        build_parser().print_help()
        return 1
    module = _module(args.command)
    try:
        return int(module.run(args) or 0)
    except UnitrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
