"""`unitrain plot RUN_DIR [--output PNG]`: training curves from `metrics.jsonl` as one PNG.

Panels: loss (train and validation), and for DPO reward accuracy, margins, and chosen/rejected rewards.
matplotlib is an optional extra (`pip install unitrain[plot]`), imported only here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unitrain.errors import UnitrainError

HELP = "draw the training curves of a run as a PNG"
PANELS = (
    ("loss", ("loss",)),
    ("reward accuracy", ("rewards/accuracies",)),
    ("reward margin", ("rewards/margins",)),
    ("rewards", ("rewards/chosen", "rewards/rejected")),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run's output directory (holding metrics.jsonl)")
    parser.add_argument("--output", help="PNG path (default: RUN_DIR/curves.png)")


def series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[name]) for row in rows if name in row]
    return [step for step, _ in points], [value for _, value in points]


def run(args: argparse.Namespace) -> int:
    from unitrain.train.metrics import read_metrics

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
    panels = [(title, names) for title, names in PANELS if any(names[0] in row for row in rows)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for axis, (title, names) in zip(axes[0], panels):
        for name in names:
            for prefix, style in (("", "-"), ("eval/", "o--")):
                steps, values = series(rows, prefix + name)
                if steps:
                    axis.plot(steps, values, style, label=f"{'validation' if prefix else 'train'} {name}")
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    output = Path(args.output) if args.output else run_dir / "curves.png"
    figure.savefig(output, dpi=100)
    plt.close(figure)
    print(f"wrote {output}")
    return 0
