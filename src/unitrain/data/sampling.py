"""Seeded epochs, train/validation splits, blending of several datasets, and a resumable stream of steps.

Every rank builds the same plan from (seed, epoch) and takes its own slice of each step's rows, so the global
counts that normalize the loss (pairs, targets of the whole step on every rank) are known everywhere without
communication. The trade-off: each rank reads the item lengths of the whole epoch to plan it (cheap next to a
forward pass), and a resumed run replays the plan instead of storing it.

Blending: each epoch takes from source s `round(N · w_s / Σw)` documents (N = all indices of all sources),
reshuffled from its own indices (repeating them when it needs more than it has), packs each source apart and
shuffles the rows of all sources together. The `pair_index` of a blended batch is offset by the total length of
the datasets listed before its own, so one index names one pair across sources.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from unitrain.data.batch import PackedBatch
from unitrain.data.packing import check_options, collate, collate_samples, plan_rows
from unitrain.errors import UnitrainError


def split_indices(num_documents: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split → (train indices, validation indices), each sorted; at least one validation document when the
    fraction is positive and there are two documents or more."""
    if not 0.0 <= validation_fraction < 1.0:
        raise UnitrainError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    order = np.random.default_rng([seed, 0x5EED]).permutation(num_documents)
    count = int(round(num_documents * validation_fraction))
    if validation_fraction > 0 and num_documents >= 2:
        count = min(max(count, 1), num_documents - 1)
    return np.sort(order[count:]), np.sort(order[:count])


@dataclass
class StepBatches:
    micro_batches: list[PackedBatch]  # this rank's accumulation_steps batches
    global_pairs: int  # pairs in this step over every micro-batch of every rank
    global_targets: int  # targets (loss tokens) in this step over every micro-batch of every rank
    global_chosen_targets: int  # chosen-response targets, the token count that normalizes the `sft` loss


class BatchStream:
    """Endless, seeded, resumable stream of optimizer steps over one or more blended sources."""

    def __init__(
        self,
        sources,
        *,
        objective: str,
        mode: str,
        share_prompt: bool,
        sequence_length: int,
        micro_batch_size: int,
        accumulation_steps: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_options(objective, mode, sequence_length)
        if not sources:
            raise UnitrainError("at least one data source is needed")
        if micro_batch_size < 1 or accumulation_steps < 1 or not 0 <= rank < world_size:
            raise UnitrainError(
                f"need micro_batch_size ≥ 1, accumulation_steps ≥ 1 and 0 ≤ rank < world_size, got "
                f"{micro_batch_size}, {accumulation_steps}, rank {rank} of {world_size}"
            )
        weights = np.array([float(weight) for _, _, weight in sources])
        if (weights < 0).any() or weights.sum() <= 0:
            raise UnitrainError(f"source weights must be ≥ 0 with a positive sum, got {weights.tolist()}")
        self.sources = [(dataset, np.asarray(indices, dtype=np.int64)) for dataset, indices, _ in sources]
        self.weights = weights / weights.sum()
        self.offsets = np.cumsum([0] + [len(dataset) for dataset, _ in self.sources])[:-1]
        self.packing = dict(objective=objective, mode=mode, share_prompt=share_prompt)
        self.sequence_length = sequence_length
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.row = 0  # next row of the current epoch's plan
        self.efficiency = 0.0
        self.dropped = 0
        self._plan_epoch()

    def _plan_epoch(self) -> None:
        """Rows of `self.epoch` as (source, item array) plus per-row counts, in their shuffled order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        total = sum(len(indices) for _, indices in self.sources)
        rows, counts, slots, tokens, dropped = [], [], 0, 0, 0
        for source, ((dataset, indices), weight) in enumerate(zip(self.sources, self.weights)):
            wanted = int(round(total * weight)) if len(self.sources) > 1 else len(indices)
            if wanted == 0 or len(indices) == 0:
                continue
            repeats = -(-wanted // len(indices))
            chosen = np.concatenate([rng.permutation(indices) for _ in range(repeats)])[:wanted]
            plan = plan_rows(dataset, chosen, sequence_length=self.sequence_length, **self.packing)
            rows += [(source, items) for items in plan.rows]
            counts.append(plan.row_counts)
            dropped += plan.dropped
            tokens += plan.num_tokens
            slots += plan.num_slots
        if not rows:
            raise UnitrainError(
                f"epoch {self.epoch} has no rows: every document was dropped (longer than sequence_length "
                f"{self.sequence_length}) or the sources are empty"
            )
        order = rng.permutation(len(rows))
        self._rows = [rows[k] for k in order]
        self._counts = np.concatenate(counts)[order]  # (rows, 3) pairs, targets, chosen targets
        self.efficiency = tokens / slots if slots else 0.0
        self.dropped = dropped

    @property
    def rows_per_epoch(self) -> int:
        """Rows of the current epoch's plan (over every rank)."""
        return len(self._rows)

    def _take(self, count: int) -> tuple[list, np.ndarray]:
        """The next `count` rows, crossing into the next epoch (reshuffled and repacked) when this one ends."""
        taken, counts = [], []
        while len(taken) < count:
            if self.row == len(self._rows):
                self.epoch += 1
                self.row = 0
                self._plan_epoch()
            end = min(len(self._rows), self.row + count - len(taken))
            taken += self._rows[self.row : end]
            counts.append(self._counts[self.row : end])
            self.row = end
        return taken, np.concatenate(counts)

    def next_step(self) -> StepBatches:
        per_rank = self.micro_batch_size * self.accumulation_steps
        rows, counts = self._take(per_rank * self.world_size)
        mine = rows[self.rank * per_rank : (self.rank + 1) * per_rank]
        micro_batches = [
            self._collate(mine[k : k + self.micro_batch_size])
            for k in range(0, per_rank, self.micro_batch_size)
        ]
        pairs, targets, chosen = (int(total) for total in counts.sum(axis=0))
        return StepBatches(micro_batches, pairs, targets, chosen)

    def _collate(self, rows) -> PackedBatch:
        read = [
            [
                (self.sources[source][0][int(i)], int(i) + int(self.offsets[source]), int(b), int(e))
                for i, b, e in items
            ]
            for source, items in rows
        ]
        return collate_samples(read, **self.packing)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "row": self.row,
            "seed": self.seed,
            "sequence_length": self.sequence_length,
            **self.packing,
            "fingerprints": [str(getattr(dataset, "fingerprint", "")) for dataset, _ in self.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at the exact next row; refuses a state whose plan would differ (seed, packing, data)."""
        mine = self.state_dict()
        for key in ("seed", "sequence_length", "objective", "mode", "share_prompt", "fingerprints"):
            if state.get(key) != mine[key]:
                raise UnitrainError(
                    f"cannot resume the data stream: {key} was {state.get(key)!r} and is now {mine[key]!r}"
                )
        self.epoch = int(state["epoch"])
        self._plan_epoch()
        if not 0 <= int(state["row"]) <= len(self._rows):
            raise UnitrainError(
                f"cannot resume the data stream: row {state['row']} is past epoch {self.epoch}"
            )
        self.row = int(state["row"])


def iterate_batches(
    dataset,
    indices,
    *,
    objective: str,
    mode: str,
    share_prompt: bool,
    sequence_length: int,
    micro_batch_size: int,
) -> Iterator[PackedBatch]:
    """One ordered pass (no shuffle) over `indices`: the plan's rows, `micro_batch_size` at a time."""
    packing = dict(objective=objective, mode=mode, share_prompt=share_prompt)
    plan = plan_rows(dataset, indices, sequence_length=sequence_length, **packing)
    for start in range(0, len(plan.rows), micro_batch_size):
        yield collate(dataset, plan.rows[start : start + micro_batch_size], **packing)
