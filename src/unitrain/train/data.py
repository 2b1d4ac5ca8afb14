"""The training run's data: datasets opened and checked against the objective, validation held out, the stream.

Each rank builds the same seeded stream and reads its own share of every step (`BatchStream`); the epoch plans
are shared through `run.output_dir/plans/` (built by the first rank of a machine, memory-mapped by the others and
by a resumed run); validation is a separate dataset or a seeded fraction held out from each training dataset.
Trade-off: a run given `epochs` plans one epoch up front to turn it into a step count, so the schedule and the
ETA are exact from step one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unitrain.config import TrainConfig
from unitrain.errors import UnitrainError
from unitrain.text import counted
from unitrain.train.dist import DistContext


@dataclass
class TrainingData:
    stream: object  # unitrain.data.batches.stream.BatchStream
    datasets: list  # training datasets in stream order, then a separate validation dataset if any
    validation: list[tuple[int, np.ndarray]]  # (position in `datasets`, document indices)
    total_steps: int
    packing: dict  # objective, mode, share_prompt, sequence_length, group_pairs
    micro_batch_size: int
    vocab_size: int
    eos_id: int | None
    tokenizer_path: Path | None

    @property
    def groups(self) -> bool:
        """Preference groups (not only pairs) among the datasets: the ranking metrics then apply."""
        return any(getattr(dataset, "is_groups", False) for dataset in self.datasets)

    @property
    def preference_unit(self) -> str:
        return "group" if self.groups else "pair"

    @property
    def held_out(self) -> int:
        """Validation documents (or pairs) over every validation dataset."""
        return sum(len(indices) for _, indices in self.validation)

    def validation_batches(self):
        """(position of the dataset in `datasets`, PackedBatch) over every validation document, in order. Rows
        grow to fit every held-out document, and every response of a group with its prompt (a longer group is
        split over a wide row), so none is left out."""
        from unitrain.data.batches.stream import iterate_batches
        from unitrain.data.epoch.plan_items import fit_length

        for position, indices in self.validation:
            dataset, packing = self.datasets[position], self.packing
            # a pretraining document is cut into pieces that always fit; other documents and pairs are whole
            fitting = max(packing["sequence_length"], fit_length(dataset, indices, packing))
            packing = {**packing, "sequence_length": fitting}
            batches = iterate_batches(dataset, indices, micro_batch_size=self.micro_batch_size, **packing)
            yield from ((position, batch) for batch in batches)


def describe_rows(data: TrainingData) -> list[str]:
    """Lines for the user: how full the rows are, how many documents/pairs do not fit a row (they are never
    trained on) and which row length would fit them; how many held-out ones validation evaluates (all)."""
    stream, length = data.stream, data.packing["sequence_length"]
    unit = data.preference_unit if data.packing["objective"] == "dpo" else "document"
    lines = [f"packing: {stream.efficiency:.1%} of row slots hold tokens"]
    if stream.dropped:
        from unitrain.data.epoch.plan_items import fit_length

        fitting = max(fit_length(dataset, indices, data.packing) for dataset, indices in stream.sources)
        need = "a response with its prompt needs" if unit != "document" else "need"
        lines[0] += (
            f"; {counted(stream.dropped, unit)} of this epoch are not trained on: {need} more than "
            f"packing.sequence_length={length} slots (packing.sequence_length={fitting} would keep them all)"
        )
    if data.validation:
        lines.append(f"validation: all {counted(data.held_out, f'held-out {unit}')} are evaluated")
    return lines


VALIDATION_RECORD = "validation.json"


def write_validation_record(output_dir: Path, data: TrainingData, config: TrainConfig) -> None:
    """`output_dir/validation.json`: which pairs/documents of which dataset (by fingerprint) the run held out,
    as the rule that picks them, so `unitrain score --held-out` scores exactly those."""
    entries = []
    for position, indices in data.validation:
        dataset = data.datasets[position]
        entry = {"path": str(dataset.path), "fingerprint": dataset.fingerprint, "documents": len(dataset)}
        entry["held_out"] = len(indices)
        if isinstance(config.data.validation, float):
            entry.update(fraction=config.data.validation, seed=config.train.seed, copies_held_out=True)
        entry["drop_duplicates"] = config.data.drop_duplicates
        entries.append(entry)
    output_dir.mkdir(parents=True, exist_ok=True)
    partial = output_dir / f".{VALIDATION_RECORD}.partial"
    partial.write_text(json.dumps({"datasets": entries}, indent=2) + "\n")
    partial.replace(output_dir / VALIDATION_RECORD)


def held_out_indices(run_dir: str | Path, dataset) -> np.ndarray:
    """The indices of `dataset` the run in `run_dir` held out from training (its validation documents/pairs)."""
    from unitrain.data.batches.stream import first_copies, split_indices

    path = Path(run_dir) / VALIDATION_RECORD
    if not path.is_file():
        raise UnitrainError(f"{path} not found: {run_dir} is not the output directory of a training run")
    entries = json.loads(path.read_text())["datasets"]
    if not entries:
        raise UnitrainError(f"{run_dir} held nothing out (its data.validation is not set)")
    entry = next((entry for entry in entries if entry["fingerprint"] == dataset.fingerprint), None)
    if entry is None:
        validated = ", ".join(entry["path"] for entry in entries)
        raise UnitrainError(
            f"{dataset.path} is not a dataset {run_dir} held pairs out of (it validated on {validated})"
        )
    indices = np.arange(len(dataset))
    if "fraction" in entry:  # runs before copies were held out together split by position alone
        content = dataset.content_hashes() if entry.get("copies_held_out") else None
        _, indices = split_indices(entry["documents"], entry["fraction"], entry["seed"], content)
    if entry.get("drop_duplicates"):
        indices = first_copies(dataset.content_hashes(), indices)
    if len(indices) != entry["held_out"]:
        raise UnitrainError(f"{path}: {entry['held_out']} held out, but its rule now picks {len(indices)}")
    return indices


def _open_dataset(path: str, key: str, objective: str):
    from unitrain.data.memmap.reader import GPTMemmapDataset

    dataset = GPTMemmapDataset(path)
    if objective == "dpo" and dataset.kind != "preference":
        raise UnitrainError(
            f"{key} {path}: objective dpo needs a preference dataset, got a {dataset.kind} dataset"
        )
    if objective == "pretrain" and dataset.kind == "preference":
        raise UnitrainError(
            f"{key} {path}: objective pretrain needs a pretraining or sft dataset, got a preference dataset "
            "(use objective sft to train on prompt+chosen)"
        )
    if objective == "sft" and dataset.kind == "pretraining":
        raise UnitrainError(
            f"{key} {path}: objective sft needs an sft dataset (prompt masked by its loss-masking spans) or a "
            "preference dataset (prompt + chosen), got a pretraining dataset; use objective pretrain to train on "
            "every token"
        )
    return dataset


def _validation_paths(config: TrainConfig) -> list[str]:
    return [config.data.validation] if isinstance(config.data.validation, str) else []


def _check_same_tokenizer(datasets, paths: list[str]) -> None:
    """Every dataset prepared with a tokenizer must have been prepared with the same one (same file hashes):
    token ids of different tokenizers mean different things to one model."""
    from unitrain.train.compat import tokenizer_file_name

    def by_role(
        hashes: dict | None,
    ) -> dict | None:  # the tokenizer file as tokenizer.json, whatever its name
        name = tokenizer_file_name(hashes or {})
        return {("tokenizer.json" if key == name else key): value for key, value in (hashes or {}).items()}

    tokenized = [
        (path, by_role(dataset.metadata.get("tokenizer", {}).get("files_sha256")))
        for dataset, path in zip(datasets, paths)
    ]
    tokenized = [(path, hashes) for path, hashes in tokenized if hashes]
    for path, hashes in tokenized[1:]:
        if hashes != tokenized[0][1]:
            raise UnitrainError(
                f"{path} was prepared with a different tokenizer than {tokenized[0][0]} "
                "(tokenizer file hashes differ in metadata.json); prepare both with the same tokenizer"
            )


def load_training_data(config: TrainConfig, context: DistContext) -> TrainingData:
    """Open and check the datasets, hold out validation, and build this rank's batch stream."""
    from unitrain.data.batches.stream import BatchStream, first_copies, split_indices

    objective = config.objective
    packing = {
        "objective": objective,
        "mode": config.packing.mode,
        "share_prompt": config.packing.share_prompt,
        "sequence_length": config.packing.sequence_length,
        "group_pairs": config.dpo.group_pairs,
    }
    sources, validation = [], []
    for index, source in enumerate(config.data.sources):
        dataset = _open_dataset(source.path, f"data.train[{index}]", objective)
        indices = np.arange(len(dataset))
        if isinstance(config.data.validation, float):
            content = dataset.content_hashes()  # every copy of a held-out item is held out with it
            indices, held_out = split_indices(
                len(dataset), config.data.validation, config.train.seed, content
            )
            held_out = first_copies(content, held_out) if config.data.drop_duplicates else held_out
            validation.append((index, held_out))
        if config.data.drop_duplicates:
            indices = first_copies(dataset.content_hashes(), indices)
        sources.append((dataset, indices, source.weight))
    datasets = [dataset for dataset, _, _ in sources]
    if isinstance(config.data.validation, str):
        datasets.append(_open_dataset(config.data.validation, "data.validation", objective))
        held_out = np.arange(len(datasets[-1]))
        if config.data.drop_duplicates:
            held_out = first_copies(datasets[-1].content_hashes(), held_out)
        validation.append((len(sources), held_out))
    first = sources[0][0]
    _check_same_tokenizer(
        datasets, [source.path for source in config.data.sources] + _validation_paths(config)
    )
    stream = BatchStream(
        sources,
        **packing,
        micro_batch_size=config.batch.micro_batch_size,
        accumulation_steps=config.batch.gradient_accumulation_steps,
        seed=config.train.seed,
        rank=context.rank,
        world_size=context.world_size,
        window=config.packing.window,
        cache_dir=Path(config.run.output_dir) / "plans",
        progress=context.is_main and config.run.progress,
    )
    total_steps = config.train.max_steps
    if total_steps is None:
        # Rows of the stream's first epoch (already planned, blend included) over the rows of one step.
        rows = stream.rows_per_epoch
        per_step = (
            config.batch.micro_batch_size * config.batch.gradient_accumulation_steps * context.world_size
        )
        total_steps = max(1, math.ceil(config.train.epochs * rows / per_step))
    return TrainingData(
        stream,
        datasets,
        validation,
        total_steps,
        packing,
        config.batch.micro_batch_size,
        max(int(dataset.vocab_size) for dataset in datasets),  # validation ids must fit the model too
        first.eos_id,
        first.tokenizer_path,
    )
