"""Metrics: sums reduced over micro-batches and ranks, JSON lines on rank 0, optional TensorBoard, a progress bar.

Names follow TRL (`loss`, `rewards/chosen`, `rewards/accuracies`, ... and `eval/...` for validation) so runs can
be compared across tools. Every quantity is carried as a sum plus a count and divided only after the global
reduction: DPO metrics are per-pair means over the global batch, token metrics per-token means.
Trade-off: one all-reduce of one small tensor per step, instead of a reduction per metric.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from unitrain.train.dist import DistContext, all_reduce_sum


def reduce_sums(sums: dict[str, float | torch.Tensor], context: DistContext) -> dict[str, float]:
    """Sum every value over ranks with a single all-reduce; returns plain floats in the same key order."""
    values = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64).detach().cpu() for v in sums.values()]
    )  # (K,)
    if context.is_distributed:
        values = all_reduce_sum(values.to(context.device), context).cpu()
    return dict(zip(sums, values.tolist()))


def preference_metrics(totals: dict[str, float], prefix: str = "") -> dict[str, float]:
    """TRL's DPO metrics from global per-pair sums (keys `pairs`, `chosen_rewards`, ... see the trainer)."""
    pairs = max(totals["pairs"], 1.0)
    chosen, rejected = totals["chosen_rewards"] / pairs, totals["rejected_rewards"] / pairs
    return {
        f"{prefix}rewards/chosen": chosen,
        f"{prefix}rewards/rejected": rejected,
        f"{prefix}rewards/accuracies": totals["accuracies"] / pairs,
        f"{prefix}rewards/margins": chosen - rejected,
        f"{prefix}logps/chosen": totals["chosen_logps"] / pairs,
        f"{prefix}logps/rejected": totals["rejected_logps"] / pairs,
        **{f"{prefix}{key}": value / pairs for key, value in totals.items() if key.startswith("losses/")},
        **ranking_metrics(totals, prefix),
    }


def ranking_metrics(totals: dict[str, float], prefix: str = "") -> dict[str, float]:
    """How the implicit rewards rank whole groups (when the data has groups): the share of every ordered pair
    of a group (different scores) that the rewards order the same way, and of groups whose highest reward goes to
    a top-scored response."""
    if "ordered_pairs" not in totals:
        return {}
    return {
        f"{prefix}rewards/ranking_accuracy": totals["ordered_correct"] / max(totals["ordered_pairs"], 1.0),
        f"{prefix}rewards/top1_accuracy": totals["top1_correct"] / max(totals["groups"], 1.0),
    }


SAMPLES_FILE = "samples.jsonl"  # completions of eval.samples, one row per prompt and validation
# per held-out pair numbers of each DPO validation, one row per validation
PAIRS_FILE = "validation_pairs.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends `{"step": s, ...}` lines to `metrics.jsonl` (rank 0 only); mirrors scalars to TensorBoard and, when
    `wandb` (the config's section) is enabled, to Weights & Biases with `run_config`."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        tensorboard: bool,
        resume_step: int | None = None,
        wandb=None,
        run_config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.samples_path = Path(output_dir) / SAMPLES_FILE
        self.pairs_path = Path(output_dir) / PAIRS_FILE
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        if wandb is not None and wandb.enabled:
            from unitrain.train.logs.wandb_logger import WandbLogger

            self._wandb = WandbLogger(wandb, run_config or {}, Path(output_dir), resume_step is not None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:  # a new run: no line of an earlier one in this directory
            self.path.write_text("")
            self.samples_path.unlink(missing_ok=True)
            self.pairs_path.unlink(missing_ok=True)
        else:  # lines past the checkpoint came from the interrupted run; the resumed run writes them again
            for path in (self.path, self.samples_path, self.pairs_path):
                if path.exists():
                    kept = [row for row in read_metrics(path) if row["step"] <= resume_step]
                    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self._tensorboard = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def logged(self, step: int) -> dict[str, float]:
        """Every metric already written for `step` (rank 0; empty elsewhere)."""
        rows = read_metrics(self.path) if self.enabled else []
        return {
            key: value for row in rows if row["step"] == step for key, value in row.items() if key != "step"
        }

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tensorboard is not None:
            for name, value in metrics.items():
                self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(step, metrics)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Completions of `eval.samples` (rows with index, prompt, completion): appended to samples.jsonl, a
        Markdown table in TensorBoard's text tab, a table in W&B."""
        if not self.enabled or not rows:
            return
        with open(self.samples_path, "a") as handle:
            handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        if self._tensorboard is not None:
            self._tensorboard.add_text("samples", samples_markdown(rows), step)
        if self._wandb is not None:
            self._wandb.log_table(step, "samples", ["index", "prompt", "completion"], rows)

    def log_pairs(self, step: int, rows) -> None:
        """A DPO validation's per-pair table ((P, 3) array: reward margin in nats, longer response's tokens, chosen
        response's gain over the reference), appended to validation_pairs.jsonl as three lists."""
        if not self.enabled:
            return
        margins, lengths, gains = (column.tolist() for column in rows.T)
        row = {
            "step": step,
            "margins": margins,
            "longer_tokens": [int(n) for n in lengths],
            "chosen_gains": gains,
        }
        with open(self.pairs_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def summarize(self, values: dict[str, float]) -> None:
        """The run's final numbers, where a dashboard shows them (W&B's summary); metrics.jsonl has them already."""
        if self._wandb is not None:
            self._wandb.summarize(values)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.close()


def samples_markdown(rows: list[dict], prompt_chars: int = 300) -> str:
    """A Markdown table of samples (the end of each prompt), cells escaped for TensorBoard's text tab."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| index | prompt | completion |", "|---|---|---|"]
    for row in rows:
        prompt = row["prompt"] if len(row["prompt"]) <= prompt_chars else "…" + row["prompt"][-prompt_chars:]
        lines.append(f"| {row['index']} | {cell(prompt)} | {cell(row['completion'])} |")
    return "\n".join(lines)


class Progress:
    """tqdm bar on rank 0 with step, loss, reward accuracy (DPO) and tokens/s; tqdm supplies the ETA."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, metrics: dict[str, float]) -> None:
        if self._bar is None:
            return
        shown = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_second']:.0f}"}
        if "rewards/accuracies" in metrics:
            shown["acc"] = f"{metrics['rewards/accuracies']:.2f}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
