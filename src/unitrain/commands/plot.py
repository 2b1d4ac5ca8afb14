"""`unitrain plot RUN_DIR [--output PNG]`: training curves from `metrics.jsonl` as one PNG.

Panels: loss (train and validation), and for DPO reward accuracy, margins, and chosen/rejected rewards, and for
preference groups ranking and top-1 accuracy; the histogram of the per-pair reward margins of the run's last
validation (`validation_pairs.jsonl`), or with `--scores` of a score's pairs. Colour says what a line measures (chosen green, rejected red),
style says where (train: a line; validation: dashed with markers, from the step-0 evaluation on); dotted grey lines mark chance (accuracy 0.5, and ln 2 for the sigmoid
DPO loss, its value while the policy equals the reference). The title names the run and its objective, read
from the config saved with its latest checkpoint. A mixed run adds a line per objective (`lm/loss`, `sft/loss`,
`dpo/loss`) and per validation set (`eval/NAME/loss`, `eval/NAME/rewards/...`). matplotlib is an optional extra (`pip install unitrain[plot]`),
imported only here.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from unitrain.errors import UnitrainError

HELP = "draw the training curves of a run as a PNG"
PANELS = (  # title, y-axis label, metric names
    ("loss", "loss", ("loss",)),
    ("reward accuracy", "fraction of pairs, chosen reward > rejected", ("rewards/accuracies",)),
    ("reward margin", "chosen − rejected reward", ("rewards/margins",)),
    ("rewards", "β · (policy − reference) log-prob", ("rewards/chosen", "rewards/rejected")),
    (  # preference groups: every ordered pair of a group, and its best response ranked first
        "ranking",
        "fraction of ordered pairs / groups",
        ("rewards/ranking_accuracy", "rewards/top1_accuracy"),
    ),
)
COLOURS = {
    "rewards/chosen": "tab:green",
    "rewards/rejected": "tab:red",
    "rewards/ranking_accuracy": "tab:purple",
    "rewards/top1_accuracy": "tab:brown",
}
STYLES = {"train": {"linestyle": "-", "alpha": 0.6}, "validation": {"linestyle": "--", "marker": "o"}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run's output directory (holding metrics.jsonl)")
    parser.add_argument("--output", help="PNG path (default: RUN_DIR/curves.png)")
    parser.add_argument(
        "--scores",
        help="a `unitrain score --reference` output: its pairs' reward margins are the histogram drawn (default: "
        "the run's last validation)",
    )


def series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[name]) for row in rows if name in row]
    return [step for step, _ in points], [value for _, value in points]


def lines(rows: list[dict], name: str) -> list[tuple[str, str]]:
    """(where, metric) of every line of metric `name`: the training line, in a mixed run each objective's loss,
    the validation line and each named validation set's."""
    keys = sorted({key for row in rows for key in row})
    found = [("train", name)]
    if name == "loss":
        found += [("train", f"{prefix}/loss") for prefix in ("lm", "sft", "dpo") if f"{prefix}/loss" in keys]
    found.append(("validation", f"eval/{name}"))
    depth = name.count("/") + 2  # eval/NAME/<name>
    found += [
        ("validation", key)
        for key in keys
        if key.startswith("eval/") and key.endswith(f"/{name}") and key.count("/") == depth
    ]
    return found


def _run_config(run_dir: Path) -> dict:
    """The run config saved with the latest checkpoint, or {} when there is none."""
    import yaml

    from unitrain.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    if latest is None or not (latest / "config.yaml").is_file():
        return {}
    return yaml.safe_load((latest / "config.yaml").read_text()) or {}


def _title(run_dir: Path, config: dict, rows: list[dict]) -> str:
    parts = [str(run_dir), config.get("objective") or ""]
    if config.get("objectives"):
        parts.append(" + ".join(f"{weight:g}·{name}" for name, weight in config["objectives"].items()))
    if config.get("objective") == "dpo":
        dpo = config.get("dpo", {})
        loss = dpo.get("loss")
        loss = " + ".join(str(name) for name in loss) if isinstance(loss, list) else loss
        parts.append(f"{loss} loss, β {dpo.get('beta')}, reference {dpo.get('reference')}")
    parts.append(f"{max(row['step'] for row in rows)} steps")
    return ", ".join(part for part in parts if part)


def _chance_lines(axis, title: str, config: dict) -> None:
    if title == "reward accuracy":
        axis.axhline(0.5, color="grey", linestyle=":", label="chance (0.5)")
    if (
        title == "loss"
        and config.get("objective") == "dpo"
        and config.get("dpo", {}).get("loss") == "sigmoid"
    ):
        axis.axhline(math.log(2), color="grey", linestyle=":", label="ln 2 (policy = reference)")


def _score_margins(path: Path) -> list[float]:
    """Reward margins ((chosen − reference) − (rejected − reference) log-prob, β = 1) of a score's pairs."""
    import json

    if not path.is_file():
        raise UnitrainError(f"{path}: no such scores file")
    keys = ("chosen_logp", "rejected_logp", "reference_chosen_logp", "reference_rejected_logp")
    margins = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        row = json.loads(line)
        if not all(key in row for key in keys):
            raise UnitrainError(
                f"{path}:{number}: not a pair scored with --reference (needs {', '.join(keys)})"
            )
        chosen, rejected, ref_chosen, ref_rejected = (row[key] for key in keys)
        margins.append((chosen - ref_chosen) - (rejected - ref_rejected))
    if not margins:
        raise UnitrainError(f"{path}: no scored pairs")
    return margins


def _validation_margins(run_dir: Path) -> tuple[list[float], str] | None:
    """The reward margins of the run's last DPO validation and what they are, or None when it logged none."""
    from unitrain.train.logs.metrics import PAIRS_FILE, read_metrics

    rows = [row for row in read_metrics(run_dir / PAIRS_FILE) if row["margins"]]
    if not rows:
        return None
    return rows[-1]["margins"], f"validation at step {rows[-1]['step']}"


def _margin_histogram(axis, margins: list[float], source: str) -> None:
    import numpy as np

    from unitrain.train.logs.report import margin_histogram

    counts, edges = margin_histogram(np.array(margins))
    axis.stairs(counts, edges, fill=True, color="tab:purple", alpha=0.6, label=f"{len(margins)} pairs")
    axis.axvline(0.0, color="grey", linestyle=":", label="0 (no preference)")
    axis.set_title("reward margins")
    axis.set_xlabel(f"chosen − rejected reward (β = 1), {source}")
    axis.set_ylabel("pairs")
    axis.legend(fontsize=7)


def run(args: argparse.Namespace) -> int:
    from unitrain.train.logs.metrics import read_metrics

    run_dir = Path(args.run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise UnitrainError(f"{run_dir / 'metrics.jsonl'}: no metrics to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UnitrainError("plot needs matplotlib: pip install 'unitrain[plot]'") from None
    config = _run_config(run_dir)
    panels = [panel for panel in PANELS if any(panel[2][0] in row for row in rows)]
    margins = (
        (_score_margins(Path(args.scores)), Path(args.scores).name)
        if args.scores
        else _validation_margins(run_dir)
    )
    count = len(panels) + (margins is not None)
    figure, axes = plt.subplots(1, count, figsize=(4.5 * count, 3.8), squeeze=False)
    if margins is not None:
        _margin_histogram(axes[0][-1], *margins)
    for axis, (title, ylabel, names) in zip(axes[0], panels):
        for name in names:
            for where, key in lines(rows, name):
                steps, values = series(rows, key)
                if steps:
                    base = key in (name, f"eval/{name}")  # the run's own lines keep their colours
                    default = (
                        ("tab:blue" if where == "train" else "tab:orange") if base else None
                    )  # None: cycle
                    colour = COLOURS.get(name, default)
                    label = f"{where} {name}" if base else f"{where} {key.removeprefix('eval/')}"
                    axis.plot(steps, values, color=colour, label=label, **STYLES[where])
        _chance_lines(axis, title, config)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=7)
    figure.suptitle(_title(run_dir, config, rows))
    figure.tight_layout()
    output = Path(args.output) if args.output else run_dir / "curves.png"
    figure.savefig(output, dpi=100)
    plt.close(figure)
    print(f"wrote {output}")
    return 0
