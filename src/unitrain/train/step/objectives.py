"""A mixed run's loss, metrics and validation: each objective's loss normalized over its own units, weighted.

    loss = Σ_o w_o · L_o,   L_pretrain = Σ -log p / T_lm,   L_sft = Σ -log p / T_sft,
                            L_dpo = Σ_pairs ℓ / P  (+ Σ_groups ℓ_listwise / G)

where T_lm, T_sft, P and G are the pretraining targets, SFT targets, pairs and groups of the whole optimizer step
(every micro-batch, every rank), read from the plan's row counts, so a micro-batch contributes its own sums
divided by the step's counts and accumulation and data parallelism give one big batch's gradient, exactly as a
single objective does. An objective without an example in a step contributes 0 and reports its count (0), not a
NaN loss. The reference (model or cache) scores only the preference documents of a batch (`preference_part`),
and the cache covers the preference datasets only. Validation reports every set under its name.

Trade-off: every objective's metric sums are reduced every step (zeros included), so all ranks reduce the same
keys in one all-reduce whatever their micro-batches hold.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import torch

from unitrain.data.batch import OBJECTIVE_CODES, SEGMENT_PROMPT, PackedBatch
from unitrain.train.logs.metrics import preference_metrics, reduce_sums

PREFIX = {"pretrain": "lm", "sft": "sft", "dpo": "dpo"}


def preference_part(batch: PackedBatch) -> PackedBatch:
    """The preference documents of a batch alone: their slots moved left in each row (rows without one left out),
    target positions renumbered, the other targets dropped. Per-document attention makes their log-probs those of
    the full batch."""
    keep = batch.segment >= SEGMENT_PROMPT  # (R, T) prompt and response slots
    rows = keep.any(dim=1).nonzero().squeeze(1)  # (R',)
    column = keep.long().cumsum(dim=1) - 1  # (R, T) new column of a kept slot
    width = int(keep.sum(dim=1).max()) if len(rows) else 0
    new_row = torch.full((batch.num_rows,), -1, dtype=torch.long, device=keep.device)
    new_row[rows] = torch.arange(len(rows), device=keep.device)
    where = keep[rows]
    row_index = torch.arange(len(rows), device=keep.device)[:, None].expand_as(where)[where]
    col_index = column[rows][where]

    def moved(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = values.new_full((len(rows), width), fill)
        out[row_index, col_index] = values[rows][where]
        return out

    chosen = batch.target_response >= 0
    positions = batch.target_positions[chosen]
    old_row, old_column = positions // batch.row_length, positions % batch.row_length
    return replace(
        batch,
        input_ids=moved(batch.input_ids, 0),
        position_ids=moved(batch.position_ids, 0),
        document_id=moved(batch.document_id, -1),
        segment=moved(batch.segment, -1),
        target_tokens=batch.target_tokens[chosen],
        target_positions=new_row[old_row] * width + column[old_row, old_column],
        target_response=batch.target_response[chosen],
        target_objective=None,
    )


class PreferenceReference:
    """A reference built over the preference datasets only: training batches' group ids (numbered across every
    source of the stream) and validation positions (among every dataset) are renumbered among those datasets, and
    a model reference runs on the preference slots alone."""

    def __init__(self, reference, data) -> None:
        self.reference = reference
        self.kind = reference.kind
        preference = [dataset.kind == "preference" for dataset in data.datasets]
        self.position = {k: int(np.sum(preference[:k])) for k in range(len(preference)) if preference[k]}
        sizes = np.array([len(dataset) for dataset, _ in data.stream.sources], np.int64)
        other = np.where(preference[: len(sizes)], 0, sizes)
        self.offsets = torch.from_numpy(np.asarray(data.stream.offsets, np.int64))
        self.shift = torch.from_numpy(np.cumsum(other) - other)  # other sources' documents before each source

    def response_logps(
        self, batch: PackedBatch, position: int | None = None, whole: bool = False
    ) -> torch.Tensor | None:
        """`whole`: run on the whole batch (a collective forward that every rank must make, even without pairs)."""
        part = batch if whole or self.kind in ("none", "cached") else preference_part(batch)
        if position is not None:
            return self.reference.response_logps(part, self.position[position])
        group = batch.group_index.cpu()
        source = torch.searchsorted(self.offsets, group, right=True) - 1
        renumbered = (group - self.shift[source]).to(batch.group_index.device)
        return self.reference.response_logps(replace(part, group_index=renumbered))


class MixedObjectives:
    """The mixed-run side of a Trainer: `batch_loss`, the step's `metrics`, and `evaluate` (per validation set)."""

    @classmethod
    def attach(cls, trainer) -> MixedObjectives | None:
        """The mixed side of `trainer` when it has several objectives or named validation sets, else None; wraps
        the trainer's reference in a mixed run so that it sees the preference datasets only."""
        if not (trainer.config.mixed or trainer.data.validation_names):
            return None
        if trainer.config.mixed and trainer.reference is not None:
            trainer.reference = PreferenceReference(trainer.reference, trainer.data)
        return cls(trainer)

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.weights = trainer.config.loss_weights
        self.counts: dict[str, int] = {}  # the step's (or validation set's) global counts
        self.listwise = False
        sharded = trainer.config.parallel.fsdp and trainer.context.is_distributed
        self.collective = (
            sharded and trainer.lora is not None and "dpo" in self.weights and trainer.config.mixed
        )
        if "dpo" in self.weights:
            from unitrain.losses.preference import GROUP_LOSSES

            self.listwise = bool(set(trainer.loss_config.losses) & set(GROUP_LOSSES))

    def sum_keys(self, objectives) -> list[str]:
        """The metric sums of these objectives, in a fixed order (the same on every rank)."""
        from unitrain.train.step.preference import RANKING_SUMS, pair_sum_keys

        keys = []
        for objective in objectives:
            if objective != "dpo":
                keys += [f"{objective}_loss", f"{objective}_targets"]
                continue
            keys += ["dpo_loss", *pair_sum_keys(self.trainer.loss_config), "dpo_targets"]
            keys += list(RANKING_SUMS) if self.trainer.data.groups else []
            keys += ["group_loss"] if self.listwise else []
        return keys

    def set_step(self, step) -> int:
        """Keep the step's global counts for `batch_loss`, which divides each objective's sum by its own count;
        returns 1, the trainer's denominator for the already normalized loss."""
        self.counts = {
            "pretrain": step.global_lm_targets,
            "sft": step.global_sft_targets,
            "pairs": step.global_pairs,
            "chosen": step.global_chosen_targets,
            "groups": step.global_groups,
        }
        return 1

    def batch_loss(self, module, batch: PackedBatch, position=None, objective=None):
        """(Σ_o w_o · this micro-batch's sum_o / the step's count_o, None, metric sums). `objective` names the one
        objective of a batch without `target_objective` (a validation set's)."""
        trainer, counts = self.trainer, self.counts
        sums = {"tokens": batch.num_tokens, "slots": batch.input_ids.numel(), "targets": batch.num_targets}
        codes = batch.target_objective
        if codes is None:
            codes = torch.full((batch.num_targets,), OBJECTIVE_CODES[objective], dtype=torch.long)
        batch = batch.to(trainer.context.device)
        codes = codes.to(trainer.context.device)
        # a validation set (`objective` given) is evaluated with its own objective, unweighted
        active = self.weights if objective is None else {objective: 1.0}
        preference = "dpo" in active and batch.num_responses > 0
        # the reference first, so its buffers are gone before the policy keeps its activations; an adapter-off
        # reference under FSDP is a collective forward: every rank makes it on every micro-batch
        collective = self.collective and position is None
        reference = None
        if preference or collective:
            reference = trainer.reference.response_logps(
                batch, position, **({"whole": True} if collective else {})
            )
        logps = module(batch).float()  # (N,)
        loss = logps.new_zeros(())
        sums.update(dict.fromkeys(self.sum_keys(self.weights), 0.0))
        for name in ("pretrain", "sft"):
            if name in active:
                mine = codes == OBJECTIVE_CODES[name]
                total = -logps[mine].sum()
                loss = loss + active[name] * total / max(counts[name], 1)
                sums[f"{name}_loss"], sums[f"{name}_targets"] = total.detach(), int(mine.sum())
        if preference:
            from unitrain.train.step.preference import preference_loss_sums

            chosen_per_pair = counts["chosen"] / max(counts["pairs"], 1)
            pair_loss, group_loss, preference_sums = preference_loss_sums(
                logps, batch, reference, trainer.loss_config, chosen_per_pair, trainer.data.groups
            )
            term = pair_loss / max(counts["pairs"], 1)
            if group_loss is not None:
                term = term + group_loss / max(counts["groups"], 1)
            loss = loss + active["dpo"] * term
            sums.update(preference_sums, dpo_loss=pair_loss.detach())
            sums["dpo_targets"] = int((batch.target_response >= 0).sum())
        return loss, None, sums

    def metrics(self, reduced: dict[str, float], elapsed: float) -> dict[str, float]:
        """Per objective: its loss (when the step had an example of it), its units, and their rate."""
        metrics = {}
        for name in self.weights:
            prefix = PREFIX[name]
            unit = "pairs" if name == "dpo" else f"{name}_targets"
            count = reduced[unit]
            metrics[f"{prefix}/{'pairs' if name == 'dpo' else 'targets'}"] = count
            metrics[f"{prefix}/targets_per_second"] = reduced[f"{name}_targets"] / elapsed
            if name == "dpo":
                metrics["pairs_per_second"] = count / elapsed
                if count:
                    loss = reduced["dpo_loss"] / count
                    if self.listwise:
                        loss += reduced["group_loss"] / max(self.counts["groups"], 1)
                    metrics["dpo/loss"] = loss
                    metrics.update(preference_metrics(reduced))
            elif count:
                metrics[f"{prefix}/loss"] = reduced[f"{name}_loss"] / count
        return metrics

    @functools.cached_property
    def set_counts(self) -> list[dict[str, int]]:
        """Per validation set, its global counts (computed once: validation never changes)."""
        data = self.trainer.data
        set_counts = [
            dict.fromkeys(("pretrain", "sft", "pairs", "chosen", "groups"), 0) for _ in data.validation
        ]
        where = {position: k for k, (position, _) in enumerate(data.validation)}
        for position, batch in data.validation_batches():
            counts = set_counts[where[position]]
            counts["chosen"] += batch.num_chosen_targets
            counts["pairs"] += batch.num_pairs
            counts["groups"] += batch.num_groups
        return set_counts

    def evaluate(self) -> dict[str, float]:
        """`eval/NAME/loss` (and for preference sets the DPO metrics under `eval/NAME/`) for every set."""
        trainer = self.trainer
        data, context, config = trainer.data, trainer.context, trainer.config
        if not data.validation:
            return {}
        shard = not config.parallel.fsdp
        module = trainer.wrapped if config.parallel.fsdp else trainer.policy
        module.eval()
        where = {position: k for k, (position, _) in enumerate(data.validation)}
        set_counts = self.set_counts
        totals: dict[str, float | torch.Tensor] = {}
        for name, (position, _) in zip(data.validation_names, data.validation):
            keys = self.sum_keys([data.objective_of(position)])
            totals.update({f"{name}/{key}": 0.0 for key in keys})
        step_counts = self.counts
        for index, (position, batch) in enumerate(data.validation_batches()):
            if shard and index % context.world_size != context.rank:
                continue
            objective, name = data.objective_of(position), data.validation_names[where[position]]
            self.counts = {**set_counts[where[position]], "pretrain": 1, "sft": 1}
            with torch.no_grad(), trainer.autocast:
                _, _, sums = self.batch_loss(module, batch, position, objective)
            for key in self.sum_keys([objective]):
                totals[f"{name}/{key}"] = totals[f"{name}/{key}"] + sums[key]
        self.counts = step_counts
        reduced = reduce_sums(totals, context) if shard else {k: float(v) for k, v in totals.items()}
        metrics = {}
        for name, (position, _) in zip(data.validation_names, data.validation):
            objective = data.objective_of(position)
            values = {
                key.split("/", 1)[1]: value for key, value in reduced.items() if key.startswith(f"{name}/")
            }
            if objective != "dpo":
                targets = values[f"{objective}_targets"]
                metrics[f"eval/{name}/loss"] = values[f"{objective}_loss"] / max(targets, 1)
                metrics[f"eval/{name}/targets"] = targets
                continue
            loss = values["dpo_loss"] / max(values["pairs"], 1)
            if self.listwise:
                loss += values["group_loss"] / max(set_counts[where[position]]["groups"], 1)
            metrics[f"eval/{name}/loss"] = loss
            metrics.update(preference_metrics(values, f"eval/{name}/"))
            metrics[f"eval/{name}/pairs"] = values["pairs"]
        return metrics
