"""Seeded epochs, train/validation splits, blending of several datasets, and a resumable stream of steps.

Every rank uses the same plan of (seed, epoch) and takes its own slice of each step's rows, so the global
counts that normalize the loss (pairs, targets of the whole step on every rank) are known everywhere without
communication: they are columns of the plan. The trade-off: an epoch is planned before its first step (a
compiled pass over the item lengths: well under a microsecond per document); with a `cache_dir` the plan is
built once, written beside the run and memory-mapped by the other ranks of the machine and by a resumed run.

Blending: each epoch takes from source s `round(N · w_s / Σw)` documents (N = all indices of all sources),
reshuffled from its own indices (repeating them when it needs more than it has), packs each source apart and
shuffles the rows of all sources together. The `group_index` of a blended batch is offset by the total length of
the datasets listed before its own, so one index names one pair across sources.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unitrain.data.batch import PackedBatch
from unitrain.data.batches.collate import collate, collate_samples, read_rows
from unitrain.data.epoch.plan import PackingPlan, build_plan, plan_rows
from unitrain.data.epoch.ranking import check_mode
from unitrain.data.epoch.rules import check_options
from unitrain.errors import UnitrainError

PLAN_VERSION = 2  # part of the plan cache key: bump when the same settings would plan differently


def split_indices(
    num_documents: int, validation_fraction: float, seed: int, content: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split → (train indices, validation indices), each sorted; at least one validation document when the
    fraction is positive and there are two documents or more.

    `content` (N,): a key per document (`GPTMemmapDataset.content_hashes`); every copy of a held-out document is
    held out with it, so that no copy of a validation item is trained on. Without copies the split is the plain
    one; with them validation grows by the copies."""
    if not 0.0 <= validation_fraction < 1.0:
        raise UnitrainError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    order = np.random.default_rng([seed, 0x5EED]).permutation(num_documents)
    count = int(round(num_documents * validation_fraction))
    if validation_fraction > 0 and num_documents >= 2:
        count = min(max(count, 1), num_documents - 1)
    if content is None or count == 0:
        return np.sort(order[count:]), np.sort(order[:count])
    held = np.isin(content, content[order[:count]])  # (N,) every copy of a held-out document
    if held.all():  # a dataset of one document's copies: nothing would be left to train on
        raise UnitrainError("every document is a copy of a held-out one: nothing is left to train on")
    return np.flatnonzero(~held), np.flatnonzero(held)


def first_copies(content: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """`indices` (sorted) less the documents whose content an earlier one of them already has."""
    _, first = np.unique(content[indices], return_index=True)
    return indices[np.sort(first)]


@dataclass
class StepBatches:
    micro_batches: list[PackedBatch]  # this rank's accumulation_steps batches
    global_pairs: int  # pairs in this step over every micro-batch of every rank
    global_targets: int  # targets (loss tokens) in this step over every micro-batch of every rank
    global_chosen_targets: int  # chosen-response targets, the token count that normalizes the `sft` loss
    global_groups: int  # preference groups (a pair is one), what normalizes a listwise loss


class BatchStream:
    """Endless, seeded, resumable stream of optimizer steps over one or more blended sources.

    `window` packs that many documents of the shuffled order at a time (None: a whole epoch per source);
    `cache_dir` shares each epoch's plan through files (see `plan_cache`); `progress` shows the planning bar.
    An epoch is planned when first needed, so a resumed stream plans only the epoch it resumes in.
    """

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
        group_pairs: str = "best_vs_rest",
        rank: int = 0,
        world_size: int = 1,
        window: int | None = None,
        cache_dir: str | Path | None = None,
        progress: bool = False,
    ) -> None:
        check_options(objective, mode, sequence_length)
        if not sources:
            raise UnitrainError("at least one data source is needed")
        if micro_batch_size < 1 or accumulation_steps < 1 or not 0 <= rank < world_size:
            raise UnitrainError(
                f"need micro_batch_size ≥ 1, accumulation_steps ≥ 1 and 0 ≤ rank < world_size, got "
                f"{micro_batch_size}, {accumulation_steps}, rank {rank} of {world_size}"
            )
        if window is not None and window < 1:
            raise UnitrainError(f"packing window must be at least 1 document, got {window}")
        weights = np.array([float(weight) for _, _, weight in sources])
        if (weights < 0).any() or weights.sum() <= 0:
            raise UnitrainError(f"source weights must be ≥ 0 with a positive sum, got {weights.tolist()}")
        self.sources = [(dataset, np.asarray(indices, dtype=np.int64)) for dataset, indices, _ in sources]
        self.weights = weights / weights.sum()
        self.offsets = np.cumsum([0] + [len(dataset) for dataset, _ in self.sources])[:-1]
        check_mode(group_pairs)
        self.packing = dict(
            objective=objective, mode=mode, share_prompt=share_prompt, group_pairs=group_pairs
        )
        self.sequence_length = sequence_length
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.window = window
        self.cache_dir = cache_dir
        self.progress = progress and rank == 0
        self.epoch = 0
        self.row = 0  # next row of the current epoch's plan
        self._plan: PackingPlan | None = None
        self._planned_epoch = -1
        self._key: dict | None = None

    def _plan_key(self) -> dict:
        """What determines an epoch's plan, but the epoch (digests of the indices computed once)."""
        from unitrain.data.epoch.plan_cache import indices_digest

        if self._key is None:
            self._key = {
                "version": PLAN_VERSION,
                "fingerprints": [str(getattr(dataset, "fingerprint", "")) for dataset, _ in self.sources],
                "indices": [indices_digest(indices) for _, indices in self.sources],
                "weights": self.weights.tolist(),
                "sequence_length": self.sequence_length,
                "window": self.window,
                "seed": self.seed,
                **self.packing,
            }
        return self._key

    @property
    def plan(self) -> PackingPlan:
        """The plan of the current epoch: rows in their shuffled order, items, per-row counts."""
        if self._planned_epoch != self.epoch:
            self._plan = None  # let the previous epoch's arrays go before the next ones are built
            if self.cache_dir is None:
                self._plan = self._build()
            else:
                from unitrain.data.epoch.plan_cache import load_or_build

                key = {**self._plan_key(), "epoch": self.epoch}
                self._plan = load_or_build(self.cache_dir, key, self._build)
            self._planned_epoch = self.epoch
            if not len(self._plan):
                raise UnitrainError(
                    f"epoch {self.epoch} has no rows: every document was dropped (longer than sequence_length "
                    f"{self.sequence_length}) or the sources are empty"
                )
        return self._plan

    def _build(self) -> PackingPlan:
        total = sum(len(indices) for _, indices in self.sources)
        planned = []
        for (dataset, indices), weight, offset in zip(self.sources, self.weights, self.offsets):
            wanted = int(round(total * weight)) if len(self.sources) > 1 else len(indices)
            if wanted and len(indices):
                planned.append((dataset, indices, wanted, int(offset)))
        return build_plan(
            planned,
            sequence_length=self.sequence_length,
            window=self.window,
            rng=np.random.default_rng([self.seed, self.epoch]),
            progress=self.progress,
            **self.packing,
        )

    @property
    def efficiency(self) -> float:
        """Real tokens / row slots of the current epoch's plan."""
        return self.plan.efficiency

    @property
    def dropped(self) -> int:
        """Documents or pairs of the current epoch longer than a row (left out)."""
        return self.plan.dropped

    @property
    def rows_per_epoch(self) -> int:
        """Rows of the current epoch's plan (over every rank)."""
        return len(self.plan)

    def _take(self, count: int) -> tuple[list, np.ndarray]:
        """The next `count` rows as (plan, row) pairs, crossing into the next epoch (reshuffled and repacked)
        when this one ends; and their counts (count, 3)."""
        taken, counts = [], []
        while len(taken) < count:
            if self.row == len(self.plan):
                self.epoch += 1
                self.row = 0
            plan = self.plan
            end = min(len(plan), self.row + count - len(taken))
            taken += [(plan, r) for r in range(self.row, end)]
            counts.append(plan.row_counts[self.row : end].astype(np.int64))
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
        pairs, targets, chosen, groups = (int(total) for total in counts.sum(axis=0))
        return StepBatches(micro_batches, pairs, targets, chosen, groups)

    def _sample(self, document: int):
        """A sample by its stream-wide document id (the source's offset + its index in the source)."""
        source = int(np.searchsorted(self.offsets, document, side="right")) - 1
        return self.sources[source][0][document - int(self.offsets[source])]

    def _collate(self, rows) -> PackedBatch:
        read = [items for plan, r in rows for items in read_rows(plan, [r], self._sample)]
        return collate_samples(read, sequence_length=self.sequence_length, **self.packing)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "row": self.row,
            "seed": self.seed,
            "sequence_length": self.sequence_length,
            "window": self.window,
            **self.packing,
            "fingerprints": [str(getattr(dataset, "fingerprint", "")) for dataset, _ in self.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at the exact next row; refuses a state whose plan would differ (seed, packing, data)."""
        mine = self.state_dict()
        state = {"group_pairs": "best_vs_rest", **state}  # saved before groups existed: pairs, one per group
        keys = ("seed", "sequence_length", "window", "objective", "mode", "share_prompt", "group_pairs")
        for key in keys:
            if state.get(key) != mine[key]:
                raise UnitrainError(
                    f"cannot resume the data stream: {key} was {state.get(key)!r} and is now {mine[key]!r}"
                )
        was, now = state.get("fingerprints") or [], mine["fingerprints"]
        if len(was) != len(now):
            raise UnitrainError(
                f"cannot resume the data stream: {len(was)} datasets were trained on, now {len(now)}"
            )
        for (dataset, _), old, new in zip(self.sources, was, now):
            if old != new:
                raise UnitrainError(
                    f"cannot resume the data stream: dataset {getattr(dataset, 'path', '?')} changed since the "
                    f"checkpoint (fingerprint {old[:12]}, now {new[:12]}): prepared again, or another dataset"
                )
        self.epoch = int(state["epoch"])
        if not 0 <= int(state["row"]) <= len(self.plan):
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
    group_pairs: str = "best_vs_rest",
) -> Iterator[PackedBatch]:
    """One ordered pass (no shuffle) over `indices`: the plan's rows, `micro_batch_size` at a time."""
    packing = dict(objective=objective, mode=mode, share_prompt=share_prompt, group_pairs=group_pairs)
    plan = plan_rows(dataset, indices, sequence_length=sequence_length, **packing)
    for start in range(0, len(plan), micro_batch_size):
        yield collate(dataset, plan, range(start, min(start + micro_batch_size, len(plan))), **packing)
