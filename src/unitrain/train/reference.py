"""Reference log-probs for DPO: none, a frozen model, or a cache computed once per (dataset, reference weights).

A reference never changes during a run, so its per-pair log-probs are a property of the data and the reference
weights alone. `model` runs a frozen copy (eval mode, no grad) on every batch in the policy's own packed layout:
simple, but one extra forward per step and a second model in memory. `cached` pays that forward once for the
whole dataset, stores the (pairs, 2) table as safetensors keyed by the dataset fingerprints and a SHA-256 of the
reference checkpoint (config.json and weight files), and never builds the reference model again while the key
matches. On a key mismatch it recomputes or refuses (`on_mismatch`), and says which part of the key changed.

Pair indices: `pair_logps(batch)` reads `batch.pair_index` as BatchStream writes it, i.e. offset by the lengths of
the datasets listed before (so `datasets` must be given in the order of the stream's sources); pass
`dataset_position=k` for batches of `iterate_batches` over `datasets[k]` alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from unitrain.data.batch import PackedBatch
from unitrain.data.sampling import iterate_batches
from unitrain.errors import UnitrainError
from unitrain.losses.logprobs import target_logprobs
from unitrain.losses.preference import response_logps
from unitrain.model import from_pretrained
from unitrain.model.adapter import adapter_hash, load_merged

KINDS = ("none", "model", "cached")
CACHE_FILE = "reference_logps.safetensors"
CACHE_FORMAT = "unitrain-reference-logps-1"


def weights_hash(model_path: str | Path) -> str:
    """SHA-256 over config.json and every weight file of a checkpoint directory (names and bytes, sorted)."""
    directory = Path(model_path)
    files = sorted(
        p for p in directory.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin")
    )
    if not any(p.name == "config.json" for p in files):
        raise UnitrainError(f"{directory}: no config.json (expected a Hugging Face checkpoint directory)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def pair_logps_of(model: torch.nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (P, 2) and token counts (P, 2) of `model` on a preference batch."""
    hidden = model.hidden_states(batch)  # (R, T, D)
    logps = target_logprobs(
        hidden, model.lm_head_weight, batch.target_positions, batch.target_tokens
    ).logps  # (N,)
    return response_logps(logps, batch.target_pair, batch.target_response, batch.num_pairs)


class Reference:
    """`pair_logps(batch) -> (P, 2) float32 tensor on the batch's device, or None` (reference-free)."""

    kind = "none"

    def pair_logps(self, batch: PackedBatch, dataset_position: int | None = None) -> torch.Tensor | None:
        return None


class ModelReference(Reference):
    kind = "model"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    def pair_logps(self, batch: PackedBatch, dataset_position: int | None = None) -> torch.Tensor:
        with torch.no_grad():
            return pair_logps_of(self.model, batch)[0].float()


class CachedReference(Reference):
    kind = "cached"

    def __init__(self, tables: list[np.ndarray], path: Path) -> None:
        self.path = path
        self.offsets = np.cumsum([0] + [len(table) for table in tables])
        self.table = torch.from_numpy(np.concatenate(tables)) if tables else torch.zeros(0, 2)

    def pair_logps(self, batch: PackedBatch, dataset_position: int | None = None) -> torch.Tensor:
        index = batch.pair_index.cpu()
        if dataset_position is not None:
            index = index + int(self.offsets[dataset_position])
        if len(index) and not 0 <= int(index.min()) <= int(index.max()) < len(self.table):
            raise UnitrainError(f"{self.path}: pair index {int(index.max())} is outside the cached table")
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
    adapter: str | Path | None = None,
) -> Reference:
    """Build the reference of `kind` (none | model | cached). `datasets` and `cache_dir` matter for `cached` only;
    `on_mismatch` is `recompute` or `error`; `sequence_length` and `micro_batch_size` size the caching pass.
    `adapter`: a PEFT LoRA adapter merged into the reference checkpoint (and hashed into the cache key)."""
    if kind not in KINDS:
        raise UnitrainError(f"dpo.reference must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "none":
        return Reference()
    if model_path is None:
        raise UnitrainError(f"dpo.reference: {kind} needs a reference model path")

    def load() -> torch.nn.Module:
        if adapter is None:
            return from_pretrained(model_path, dtype=dtype, device=device)
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
        "weights": weights_hash(model_path) + (f"+{adapter_hash(adapter)}" if adapter else ""),
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
        _compute_table(model, dataset, sequence_length, micro_batch_size, device) for dataset in datasets
    ]
    _write_cache(path, key, tables)
    return CachedReference(tables, path)


def _compute_table(model, dataset, sequence_length: int, micro_batch_size: int, device) -> np.ndarray:
    """(len(dataset), 2) float32 reference log-probs; rows grow to the longest pair so that none is dropped."""
    table = np.full((len(dataset), 2), np.nan, dtype=np.float32)
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
    with torch.no_grad():
        for batch in batches:
            sums = pair_logps_of(model, batch.to(device))[0]  # (P, 2)
            table[batch.pair_index.numpy()] = sums.float().cpu().numpy()
    return table


def _read_cache(path: Path, key: dict) -> tuple[list[np.ndarray] | None, str | None]:
    """(tables, None) when the cache matches; (None, reason) when it exists but does not; (None, None) if absent."""
    if not path.exists():
        return None, None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != CACHE_FORMAT:
                return None, f"not a {CACHE_FORMAT} file"
            cached = json.loads(meta["key"])
            tables = [handle.get_tensor(f"logps.{k}") for k in range(len(cached["fingerprints"]))]
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
            return None, f"dataset {position} changed (fingerprint cached {old[:12]}, now {new[:12]})"
    return tables, None


def _write_cache(path: Path, key: dict, tables: list[np.ndarray]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")  # ranks writing at once never collide
    tensors = {f"logps.{k}": np.ascontiguousarray(table) for k, table in enumerate(tables)}
    save_file(tensors, str(partial), metadata={"format": CACHE_FORMAT, "key": json.dumps(key)})
    os.replace(partial, path)  # atomic: a crash never leaves a half-written cache behind
