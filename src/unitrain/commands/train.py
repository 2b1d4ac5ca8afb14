"""`unitrain train CONFIG [key=value ...] [--resume]`: validate the config, then run the trainer.

`--resume` (anywhere on the line) continues the run in `run.output_dir` with the settings its latest checkpoint
recorded; the overrides given now apply on top, and every setting they change is listed in one line.

Works the same under `torchrun --nproc-per-node N -m unitrain train ...` (each rank runs this command). A run
stopped by SIGINT/SIGTERM saves a checkpoint and exits with 128 + the signal number; `--resume` continues it.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

from unitrain.text import counted

HELP = "train a model (pretraining, SFT or DPO) from a YAML config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML); every key is listed in docs/configuration.md")
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],  # optional: without a default, argparse lists them among the required arguments
        metavar="key=value",
        help="optional dotted overrides, e.g. dpo.beta=0.2",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint of the run, with its settings (overrides apply on top); "
        "accepted anywhere on the command line",
    )


def run(args: argparse.Namespace) -> int:
    from unitrain.config import load_config
    from unitrain.train.trainer import train

    reports = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 prints
    if args.resume:
        config, lines = load_resume_config(args.config, args.overrides)
        if reports and lines:
            print("\n".join(lines))
    else:
        config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume)
    if result.stopped_by is not None:
        if reports:
            print(
                f"stopped by {result.stopped_by} after step {result.steps}; checkpoint saved, resume with --resume"
            )
        return 128 + int(getattr(signal.Signals, result.stopped_by, signal.SIGTERM))
    if reports:
        skipped = (
            f" ({counted(result.skipped_steps, 'step')} skipped for a non-finite loss or gradient)"
            if result.skipped_steps
            else ""
        )
        print(f"done: {counted(result.steps, 'step')}{skipped}; export in {result.output_dir / 'hf'}")
        if result.memory:
            print(result.memory)
        summary = _validation_summary(result.last_metrics)
        if summary:
            print(f"validation ({_evaluated(result, config.objective)}): {summary}")
        if result.report:  # DPO: margins, accuracy by length, chosen win rate of the same pairs
            print("\n".join(result.report))
    return 0


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: value} (lists are one value)."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    dotted = lambda name: f"{prefix}.{name}" if prefix else str(name)  # noqa: E731
    return {key: leaf for name, item in value.items() for key, leaf in _leaves(item, dotted(name)).items()}


def _changes(before: dict[str, Any], after: dict[str, Any], keys) -> str:
    import json

    show = lambda value: json.dumps(value)  # noqa: E731
    return ", ".join(f"{key} {show(before.get(key))} -> {show(after.get(key))}" for key in sorted(keys))


def load_resume_config(path: str | Path, overrides: list[str] = ()) -> tuple[object, list[str]]:
    """`train --resume`: the run's own settings (its latest checkpoint's config.yaml) with the command-line
    overrides applied on top, so the overrides that started the run need not be repeated; and the lines to tell
    the user: what the overrides change, and what of the YAML file differs from the run and is not applied."""
    import yaml

    from unitrain.config import load_config
    from unitrain.train.checkpoint import latest_checkpoint

    config = load_config(path, overrides)
    latest = latest_checkpoint(config.run.output_dir)
    if latest is None or not (latest / "config.yaml").is_file():
        return config, []  # the trainer says that there is nothing to resume
    stored_path = latest / "config.yaml"
    resumed = load_config(stored_path, overrides)
    resumed.run.output_dir = config.run.output_dir  # where the run is now, should it have moved
    stored = _leaves(yaml.safe_load(stored_path.read_text()))
    stored["run.output_dir"] = config.run.output_dir
    now, given = _leaves(resumed.model_dump(mode="json")), _leaves(config.model_dump(mode="json"))
    lines = [f"resuming {latest} with the run's own settings"]
    changed = [key for key in stored.keys() | now.keys() if stored.get(key) != now.get(key)]
    if changed:
        lines[0] += f"; changed by the command line: {_changes(stored, now, changed)}"
    ignored = [key for key in given.keys() | now.keys() if given.get(key) != now.get(key)]
    if ignored:
        lines.append(
            f"{path} differs from the run's settings in {_changes(now, given, ignored)}: not applied on resume "
            "(pass them as key=value overrides to change them)"
        )
    return resumed, lines


def _evaluated(result, objective: str) -> str:
    """`all 46 held-out pairs`, or `45 of 46 held-out pairs` should validation ever leave some out."""
    metrics = result.last_metrics
    unit = ("group" if "eval/groups" in metrics else "pair") if objective == "dpo" else "document"
    evaluated = int(metrics.get("eval/groups", metrics.get("eval/pairs", result.held_out)))
    if evaluated == result.held_out:
        return f"all {counted(result.held_out, f'held-out {unit}')}"
    return f"{evaluated:,} of {counted(result.held_out, f'held-out {unit}')}"


SUMMARY_KEYS = (
    ("eval/loss", "loss"),
    ("eval/rewards/accuracies", "reward accuracy"),
    ("eval/rewards/margins", "reward margin"),
    ("eval/rewards/ranking_accuracy", "ranking accuracy"),  # preference groups
    ("eval/rewards/top1_accuracy", "top-1 accuracy"),
)


def _validation_summary(metrics: dict[str, float]) -> str:
    """The final validation metrics as one line, e.g. `loss 0.6440, reward accuracy 0.6444`; named validation sets
    (a mixed run's) each with their own, e.g. `pairs: loss 0.6440, ...; text: loss 2.5130`."""
    sets = sorted({key.split("/")[1] for key in metrics if key.startswith("eval/") and key.count("/") >= 2})
    sets = [name for name in sets if f"eval/{name}/loss" in metrics]
    if not sets:
        return ", ".join(f"{label} {metrics[key]:.4f}" for key, label in SUMMARY_KEYS if key in metrics)
    return "; ".join(
        f"{name}: "
        + _validation_summary(
            {
                "eval/" + key.removeprefix(f"eval/{name}/"): v
                for key, v in metrics.items()
                if f"/{name}/" in key
            }
        )
        for name in sets
    )
