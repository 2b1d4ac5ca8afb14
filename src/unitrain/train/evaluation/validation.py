"""Validation: the loss and DPO metrics over every held-out document, pair or group, reduced over ranks.

The validation set never changes during a run, so what normalizes its loss (the chosen-response tokens per pair
of the `sft` term, the groups of a listwise loss) is counted once from the batch metadata and kept. Trade-off:
that first pass collates the validation set once more than the evaluations themselves need.

Neither does the reference: its log-probs of the held-out responses are computed at the first validation and
remembered (one float per response), so later validations run the policy alone, half the forward passes with an
online reference. Each DPO validation also keeps a per-pair table (reward margin, longer response's tokens, the
chosen response's gain over the reference): the chosen win rate is logged, the table of every validation goes to
`validation_pairs.jsonl` (what `unitrain plot` draws the margin histogram of), and the final one's report (margin
quantiles and histogram, accuracy by length, win rate) is printed at the end of the run, as `score` prints it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from tqdm import tqdm

from unitrain.train.logs.metrics import preference_metrics, reduce_sums


class RememberedReference:
    """The run's reference, asked once per validation batch: its log-probs (Rb,) are kept, keyed by the dataset
    position and the batch's group indices (the same batch at every validation)."""

    def __init__(self, reference) -> None:
        self.reference = reference
        self.known: dict[tuple[int | None, bytes], torch.Tensor | None] = {}

    def response_logps(self, batch, position: int | None = None) -> torch.Tensor | None:
        key = (position, batch.group_index.cpu().numpy().tobytes())
        if key not in self.known:
            self.known[key] = self.reference.response_logps(batch, position)
        return self.known[key]


class Validation:
    """`evaluate()` for a Trainer: its data, config, modules, autocast and batch loss."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.pairs = np.zeros((0, 3))  # the last validation's `pair_table` rows, every rank's

    @property
    def reference_free(self) -> bool:
        return self.trainer.reference is None or self.trainer.reference.kind == "none"

    @property
    def report(self) -> list[str]:
        """`preference_report` lines of the last validation's pairs (none before one ran)."""
        from unitrain.train.logs.report import preference_report

        margins, lengths, gains = self.pairs.T
        return preference_report(margins, lengths.astype(np.int64), None if self.reference_free else gains)

    @functools.cached_property
    def reference(self) -> RememberedReference | None:
        return RememberedReference(self.trainer.reference) if self.trainer.reference is not None else None

    @functools.cached_property
    def plan(self) -> tuple[int, float, int]:
        """Micro-batches of the whole validation set (the progress bar's total), its chosen-response targets per
        pair (so the `sft` term of a loss list is normalized as in training, by the global count, not per
        micro-batch) and its groups (which a listwise loss is averaged over)."""
        batches = chosen = pairs = groups = 0
        for _, batch in self.trainer.data.validation_batches():
            batches += 1
            chosen += batch.num_chosen_targets
            pairs += batch.num_pairs
            groups += batch.num_groups
        return batches, chosen / max(pairs, 1), groups

    def sum_keys(self) -> tuple[str, ...]:
        """The metric sums of an evaluation, the same on every rank (they are reduced together)."""
        keys = ("loss", "tokens", "slots", "targets")
        if self.trainer.config.objective == "dpo":
            from unitrain.losses.preference import GROUP_LOSSES
            from unitrain.train.step.preference import RANKING_SUMS, pair_sum_keys

            keys += pair_sum_keys(self.trainer.loss_config) + (
                RANKING_SUMS if self.trainer.data.groups else ()
            )
            keys += ("group_loss",) if set(self.trainer.loss_config.losses) & set(GROUP_LOSSES) else ()
        return keys

    def evaluate(self) -> dict[str, float]:
        trainer = self.trainer
        config, context, data = trainer.config, trainer.context, trainer.data
        if not data.validation:
            return {}
        if trainer.mixed is not None:  # a mixed run, or named validation sets: each set under its name
            return trainer.mixed.evaluate()
        # Under FSDP every rank runs every batch (the forward is collective); otherwise ranks split the batches.
        shard = not config.parallel.fsdp
        module = trainer.wrapped if config.parallel.fsdp else trainer.policy
        module.eval()
        # the same keys on every rank
        totals: dict[str, float | torch.Tensor] = dict.fromkeys(self.sum_keys(), 0.0)
        num_batches, chosen_per_pair, groups = self.plan
        chosen_per_pair = chosen_per_pair if config.objective == "dpo" else None
        shown = config.run.progress and context.is_main
        batches = tqdm(
            data.validation_batches(), desc="validation", total=num_batches, unit="batch", leave=False,
            disable=not shown,
        )  # fmt: skip
        table: list[torch.Tensor] | None = [] if config.objective == "dpo" else None
        for index, (position, batch) in enumerate(batches):
            if shard and index % context.world_size != context.rank:
                continue
            # no graph: one micro-batch's forward buffers at a time, nothing kept across batches
            with torch.no_grad(), trainer.autocast:
                loss_sum, _, sums = trainer.batch_loss(
                    module, batch, chosen_per_pair, position, self.reference, table
                )
            for key, value in {"loss": loss_sum, **sums}.items():
                totals[key] = totals[key] + value
            del loss_sum, sums, batch
        reduced = reduce_sums(totals, context) if shard else {k: float(v) for k, v in totals.items()}
        if config.objective != "dpo":
            return {"eval/loss": reduced["loss"] / max(reduced["targets"], 1)}
        loss = reduced["loss"] / max(reduced["pairs"], 1) + reduced.get("group_loss", 0.0) / max(groups, 1)
        counts = {"eval/pairs": reduced["pairs"]}  # every held-out pair or group: rows fit every response
        if data.groups:
            counts["eval/groups"] = groups
        return {
            "eval/loss": loss,
            **preference_metrics(reduced, "eval/"),
            **counts,
            **self._pairs(table, shard),
        }

    def _pairs(self, table: list[torch.Tensor], shard: bool) -> dict[str, float]:
        """Keep this validation's per-pair table (every rank's), log it, and return the chosen win rate."""
        trainer = self.trainer
        rows = torch.cat(table).numpy() if table else np.zeros((0, 3))  # (P, 3)
        if shard and trainer.context.is_distributed:
            import torch.distributed as dist

            gathered: list = [None] * trainer.context.world_size
            dist.all_gather_object(gathered, rows)
            rows = np.concatenate(gathered)
        self.pairs = rows
        writer = getattr(trainer, "writer", None)  # the run's MetricsWriter, made when training starts
        if writer is not None:
            writer.log_pairs(trainer.step, rows)
        if self.reference_free or not len(rows):
            return {}
        return {"eval/rewards/chosen_win_rate": float((rows[:, 2] > 0).mean())}
