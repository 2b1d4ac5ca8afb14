"""Reference log-probs for DPO: none, a frozen model, or a cache computed once per (dataset, reference weights).

A reference never changes during a run, so its log-prob of each response is a property of the data and the
reference weights alone. `model` runs a frozen copy (eval mode, no grad) on every batch in the policy's own packed
layout: simple, but one extra forward per step and a second model in memory. `cached` pays that forward once for
the whole dataset, stores one log-prob per response (a pair: chosen, rejected; a group: its N responses) as
safetensors keyed by the dataset fingerprints and a SHA-256 of the reference checkpoint (config.json and weight
files), and never builds the reference model again while the key matches. On a key mismatch it recomputes or
refuses (`on_mismatch`), and says which part of the key changed.

Group indices: `response_logps(batch)` reads `batch.group_index` as BatchStream writes it, i.e. offset by the
lengths of the datasets listed before (so `datasets` must be given in the order of the stream's sources); pass
`dataset_position=k` for batches of `iterate_batches` over `datasets[k]` alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from unitrain.data.batch import PackedBatch
from unitrain.data.batches.stream import iterate_batches
from unitrain.errors import UnitrainError
from unitrain.files import follow_umask
from unitrain.losses.logprobs import target_logprobs
from unitrain.losses.preference import pair_view, response_logps
from unitrain.model import from_pretrained
from unitrain.model.adapter import adapter_hash, load_merged
from unitrain.train.dist import barrier

KINDS = ("none", "model", "cached")
CACHE_FILE = "reference_logps.safetensors"
CACHE_FORMAT = "unitrain-reference-logps-2"  # one log-prob per response (version 1: a (pairs, 2) table)


def weights_hash(model_path: str | Path, progress: bool = False) -> str:
    """SHA-256 over config.json and every weight file of a checkpoint directory (names and bytes, sorted)."""
    directory = Path(model_path)
    files = sorted(
        p for p in directory.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin")
    )
    if not any(p.name == "config.json" for p in files):
        raise UnitrainError(f"{directory}: no config.json (expected a Hugging Face checkpoint directory)")
    digest = hashlib.sha256()
    size = sum(path.stat().st_size for path in files)
    with tqdm(
        total=size,
        desc="hashing reference weights",
        unit="B",
        unit_scale=True,
        leave=False,
        disable=not progress,
    ) as bar:
        for path in files:
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                while block := handle.read(1 << 24):
                    digest.update(block)
                    bar.update(len(block))
    return digest.hexdigest()


def response_logps_of(model: torch.nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (Rb,) and token counts (Rb,) of every response of a preference batch under `model`."""
    hidden = model.hidden_states(batch)  # (R, T, D)
    softcap = getattr(model, "logit_softcap", None)  # Gemma 2 (transformers backend)
    logps = target_logprobs(
        hidden, model.lm_head_weight, batch.target_positions, batch.target_tokens, softcap=softcap
    ).logps  # (N,)
    return response_logps(logps, batch.target_response, batch.num_responses)


def pair_logps_of(model: torch.nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (P, 2) and token counts (P, 2) of each pair's (preferred, other) responses."""
    sums, counts = response_logps_of(model, batch)
    return pair_view(sums, batch.pair_responses), pair_view(counts, batch.pair_responses)


class Reference:
    """`response_logps(batch) -> (Rb,) float32 tensor on the batch's device, or None` (reference-free)."""

    kind = "none"

    def response_logps(self, batch: PackedBatch, dataset_position: int | None = None) -> torch.Tensor | None:
        return None


class ModelReference(Reference):
    kind = "model"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    def response_logps(self, batch: PackedBatch, dataset_position: int | None = None) -> torch.Tensor:
        with torch.no_grad():
            return response_logps_of(self.model, batch)[0].float()


class CachedReference(Reference):
    """Every dataset's response log-probs as one flat table: group g's responses are
    `table[group_offsets[g] : group_offsets[g + 1]]`, groups numbered across datasets in stream order."""

    kind = "cached"

    def __init__(self, tables: list[tuple[np.ndarray, np.ndarray]], path: Path) -> None:
        self.path = path
        self.offsets = np.cumsum([0] + [len(offsets) - 1 for offsets, _ in tables])  # first group per dataset
        starts = np.cumsum([0] + [len(logps) for _, logps in tables])  # first response per dataset
        group_offsets = [offsets[:-1] + start for (offsets, _), start in zip(tables, starts)] + [starts[-1:]]
        self.group_offsets = torch.from_numpy(np.concatenate(group_offsets).astype(np.int64))  # (G + 1,)
        self.table = torch.from_numpy(
            np.concatenate([logps for _, logps in tables] or [np.zeros(0, np.float32)])
        )

    def response_logps(self, batch: PackedBatch, dataset_position: int | None = None) -> torch.Tensor:
        group = batch.group_index.cpu()
        if dataset_position is not None:
            group = group + int(self.offsets[dataset_position])
        if len(group) and not 0 <= int(group.min()) <= int(group.max()) < len(self.group_offsets) - 1:
            raise UnitrainError(f"{self.path}: group {int(group.max())} is outside the cached table")
        index = self.group_offsets[group][batch.response_group.cpu()] + batch.response_number.cpu()  # (Rb,)
        return self.table[index].to(batch.input_ids.device)


def make_reference(
    kind: str,
    *,
    model_path: str | Path | None = None,
    datasets=(),
    sequence_length: int = 2048,
    micro_batch_size: int = 8,
    cache_dir: str | Path | None = None,
    on_mismatch: str = "recompute",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    adapter: str | Path | None = None,
    backend: str = "auto",
    trust_remote_code: bool = False,
) -> Reference:
    """Build the reference of `kind` (none | model | cached). `datasets` and `cache_dir` matter for `cached` only;
    `on_mismatch` is `recompute` or `error`; `sequence_length` and `micro_batch_size` size the caching pass;
    `progress` shows bars (stderr) while the weights are hashed and the cache is computed. `adapter`: a PEFT LoRA
    adapter merged into the reference checkpoint (and hashed into the cache key)."""
    if kind not in KINDS:
        raise UnitrainError(f"dpo.reference must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "none":
        return Reference()
    if model_path is None:
        raise UnitrainError(f"dpo.reference: {kind} needs a reference model path")

    def load() -> torch.nn.Module:
        if adapter is None:
            return from_pretrained(
                model_path, dtype=dtype, device=device, backend=backend, trust_remote_code=trust_remote_code
            )
        return load_merged(adapter, base=model_path, dtype=dtype, device=device)

    if kind == "model":
        return ModelReference(load())
    if cache_dir is None or not datasets:
        raise UnitrainError("dpo.reference: cached needs a cache directory and the datasets to cache")
    if on_mismatch not in ("recompute", "error"):
        raise UnitrainError(f"dpo.reference_on_mismatch must be recompute or error, got {on_mismatch!r}")
    path = Path(cache_dir) / CACHE_FILE
    key = {
        "fingerprints": [str(dataset.fingerprint) for dataset in datasets],
        "paths": [
            str(getattr(dataset, "path", "")) for dataset in datasets
        ],  # named in messages, not compared
        "weights": weights_hash(model_path, progress) + (f"+{adapter_hash(adapter)}" if adapter else ""),
        "dtype": str(dtype).removeprefix("torch."),  # bf16 and fp32 log-probs differ: never mixed silently
    }
    tables, reason = _read_cache(path, key)
    if tables is not None:
        return CachedReference(tables, path)
    if reason is not None and on_mismatch == "error":
        raise UnitrainError(
            f"{path}: reference cache does not match ({reason}); delete it or allow recompute"
        )
    if reason is not None:
        print(f"reference cache {path}: {reason}; recomputing")
    model = load().eval().requires_grad_(False)
    tables = [
        _compute_table(model, dataset, sequence_length, micro_batch_size, device, progress)
        for dataset in datasets
    ]
    _write_cache(path, key, tables)
    return CachedReference(tables, path)


def _group_offsets(dataset) -> np.ndarray:
    """(N + 1,) int64: where each group's responses start in a flat table (a pair dataset: 2 per pair)."""
    if getattr(dataset, "is_groups", False):
        return dataset.group_columns[0]
    return np.arange(0, 2 * len(dataset) + 1, 2, dtype=np.int64)


def _compute_table(
    model, dataset, sequence_length: int, micro_batch_size: int, device, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(group offsets (N + 1,), log-probs (R,) float32) of every response; rows grow to the longest group so
    that none is dropped or split."""
    offsets = _group_offsets(dataset)
    table = np.full(int(offsets[-1]), np.nan, dtype=np.float32)
    longest = int(dataset.document_lengths.max()) if len(dataset) else 0
    batches = iterate_batches(
        dataset,
        np.arange(len(dataset)),
        objective="dpo",
        mode="packed",
        share_prompt=True,
        sequence_length=max(sequence_length, longest),
        micro_batch_size=micro_batch_size,
    )
    unit = "group" if getattr(dataset, "is_groups", False) else "pair"
    bar = tqdm(total=len(dataset), desc="reference log-probs", unit=unit, disable=not progress, leave=False)
    with torch.no_grad(), bar:
        for batch in batches:
            sums = response_logps_of(model, batch.to(device))[0]  # (Rb,)
            index = (
                offsets[batch.group_index.numpy()[batch.response_group.numpy()]]
                + batch.response_number.numpy()
            )
            table[index] = sums.float().cpu().numpy()
            bar.update(batch.num_groups)
    return offsets, table


def _read_cache(path: Path, key: dict) -> tuple[list[tuple[np.ndarray, np.ndarray]] | None, str | None]:
    """(tables, None) when the cache matches; (None, reason) when it exists but does not; (None, None) if absent."""
    if not path.exists():
        return None, None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != CACHE_FORMAT:
                return (
                    None,
                    f"{meta.get('format') or 'unknown format'}, not {CACHE_FORMAT} (one log-prob per response)",
                )
            cached = json.loads(meta["key"])
            tables = [
                (handle.get_tensor(f"offsets.{k}"), handle.get_tensor(f"logps.{k}"))
                for k in range(len(cached["fingerprints"]))
            ]
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        return None, f"unreadable ({error})"
    if cached["weights"] != key["weights"]:
        return None, f"reference weights changed (cached {cached['weights'][:12]}, now {key['weights'][:12]})"
    if cached.get("dtype") != key["dtype"]:
        return None, f"computed in {cached.get('dtype')}, this run's reference runs in {key['dtype']}"
    if len(cached["fingerprints"]) != len(key["fingerprints"]):
        return None, f"{len(cached['fingerprints'])} datasets cached, {len(key['fingerprints'])} given"
    for position, (old, new) in enumerate(zip(cached["fingerprints"], key["fingerprints"])):
        if old != new:
            was = cached.get("paths", [None] * len(cached["fingerprints"]))[position]
            now = key["paths"][position]
            named = now if was in (None, now) else f"{was}, now {now}"
            return (
                None,
                f"dataset {position} ({named}) changed (fingerprint cached {old[:12]}, now {new[:12]})",
            )
    return tables, None


def _write_cache(path: Path, key: dict, tables: list[tuple[np.ndarray, np.ndarray]]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")  # ranks writing at once never collide
    tensors = {}
    for k, (offsets, logps) in enumerate(tables):
        tensors[f"offsets.{k}"], tensors[f"logps.{k}"] = (
            np.ascontiguousarray(offsets),
            np.ascontiguousarray(logps),
        )
    save_file(tensors, str(partial), metadata={"format": CACHE_FORMAT, "key": json.dumps(key)})
    follow_umask(partial)
    os.replace(partial, path)  # atomic: a crash never leaves a half-written cache behind


def run_reference(trainer) -> Reference | None:
    """A Trainer's frozen reference: `dpo.reference_model`, else the starting policy (its `initial` export)."""
    dpo = trainer.config.dpo
    bf16 = trainer.config.train.dtype == "bfloat16"
    if trainer.lora is not None and dpo.reference == "model" and dpo.reference_model is None:
        # the policy's own module with its adapters off: no second model
        return trainer.lora.reference(lambda: trainer.policy)

    def build():
        return make_reference(
            dpo.reference,
            model_path=dpo.reference_model or trainer.config.model.path or trainer.output_dir / "initial",
            datasets=trainer.data.reference_datasets,
            sequence_length=trainer.config.packing.sequence_length,
            micro_batch_size=trainer.config.batch.micro_batch_size,
            cache_dir=dpo.reference_cache_dir or trainer.output_dir / "reference-cache",
            on_mismatch=dpo.reference_on_mismatch,
            device=trainer.context.device,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            progress=trainer.config.run.progress and trainer.context.is_main,
            adapter=None if dpo.reference_model or trainer.lora is None else trainer.config.lora.adapter,
            backend=trainer.config.model.backend,
            trust_remote_code=trainer.config.model.trust_remote_code,
        )

    if dpo.reference != "cached" or not trainer.context.is_distributed:
        return build()
    # Rank 0 fills the cache once; the other ranks then find it valid and never build the reference model.
    reference = build() if trainer.context.is_main else None
    barrier(trainer.context)
    return reference if reference is not None else build()
