"""Reading the on-disk token format: `GPTMemmapDataset`, every shard opened once and read with zero copies.

A dataset is a directory: `metadata.json`, optional `tokenizer/`, and shards `shard-NNNNN.tokens` (a header, then
every token of the shard back to back) + `shard-NNNNN.index` (a header, then document offsets and the optional span
sections). Layout byte by byte: docs/data-format.md; the writer is `writer.py`. Trade-off: documents are read
with zero copies through `mmap`, so every size is checked once at open (a truncated file fails there, naming the
file), and the spans are validated vectorized at open rather than trusted at read time.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np

from unitrain.data.memmap import columns
from unitrain.data.memmap.format import (
    DTYPES,
    FLAG_GROUPS,
    FLAG_LOSS_SPANS,
    FLAG_PREFERENCE,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_BYTES,
    INDEX_HEADER,
    INDEX_MAGIC,
    KINDS,
    TOKENS_HEADER,
    TOKENS_MAGIC,
    pad8,
    sha256_file,
)
from unitrain.data.sample import GPTSample
from unitrain.errors import UnitrainError


class _Shard:
    """One opened, size-checked shard: token and index arrays are zero-copy views of the mapped files."""

    def __init__(self, directory: Path, entry: dict, kind: str) -> None:
        self.tokens_path = directory / f"{entry['name']}.tokens"
        self.index_path = directory / f"{entry['name']}.index"
        tokens_map = _map(self.tokens_path, TOKENS_MAGIC, TOKENS_HEADER.size)
        _, version, dtype_code, num_tokens = TOKENS_HEADER.unpack_from(tokens_map)
        _check_version(self.tokens_path, version)
        if dtype_code not in DTYPES:
            raise UnitrainError(f"{self.tokens_path}: unknown token dtype code {dtype_code}")
        dtype = DTYPES[dtype_code]
        _check_size(self.tokens_path, len(tokens_map), HEADER_BYTES + num_tokens * dtype.itemsize)
        self.tokens = np.frombuffer(tokens_map, dtype, num_tokens, HEADER_BYTES)  # (T,)
        index_map = _map(self.index_path, INDEX_MAGIC, INDEX_HEADER.size)
        _, version, flags, num_docs, index_tokens, num_spans, num_responses = INDEX_HEADER.unpack_from(
            index_map
        )
        _check_version(self.index_path, version)
        if index_tokens != num_tokens:
            raise UnitrainError(
                f"{self.index_path}: counts {index_tokens} tokens but {self.tokens_path} has {num_tokens}"
            )
        sizes = [(num_docs + 1) * 8]
        if flags & FLAG_LOSS_SPANS:
            sizes += [(num_docs + 1) * 8, pad8(num_spans * 8)]
        if flags & FLAG_PREFERENCE:
            sizes.append(pad8(num_docs * 8))
        if flags & FLAG_GROUPS:
            sizes += [(num_docs + 1) * 8, pad8(num_responses * 4), pad8(num_responses * 4)]
        _check_size(self.index_path, len(index_map), HEADER_BYTES + sum(sizes))
        offset = HEADER_BYTES
        self.offsets = np.frombuffer(index_map, "<i8", num_docs + 1, offset)  # (n + 1,)
        offset += sizes[0]
        self.num_documents = num_docs
        self.num_tokens = num_tokens
        if not columns.check_offsets(self.offsets, num_tokens):
            raise UnitrainError(
                f"{self.index_path}: document offsets do not add up to the {num_tokens} tokens"
            )
        self.span_offsets = self.span_table = self.preference = None
        self.group_offsets = self.response_begins = self.scores = None
        if flags & FLAG_LOSS_SPANS:
            self.span_offsets = np.frombuffer(index_map, "<i8", num_docs + 1, offset)  # (n + 1,)
            self.span_table = np.frombuffer(index_map, "<i4", num_spans * 2, offset + sizes[1]).reshape(-1, 2)
            offset += sizes[1] + sizes[2]
            self._check_loss_spans(num_spans)
        if flags & FLAG_PREFERENCE:
            self.preference = np.frombuffer(index_map, "<i4", num_docs * 2, offset).reshape(-1, 2)  # (n, 2)
            chosen, rejected = self.preference[:, 0], self.preference[:, 1]
            if ((chosen < 0) | (chosen >= rejected) | (rejected >= self.lengths())).any():
                raise UnitrainError(f"{self.index_path}: preference spans out of range")
        if flags & FLAG_GROUPS:
            self.group_offsets = np.frombuffer(index_map, "<i8", num_docs + 1, offset)  # (n + 1,)
            offset += sizes[-3]
            self.response_begins = np.frombuffer(index_map, "<i4", num_responses, offset)  # (R,)
            self.scores = np.frombuffer(index_map, "<f4", num_responses, offset + sizes[-2])  # (R,)
            self._check_groups(num_responses)
        preference = self.preference is not None or self.group_offsets is not None
        if (kind == "preference") != preference or (kind == "sft") != (self.span_table is not None):
            raise UnitrainError(
                f"{self.index_path}: span sections (flags {flags}) do not match kind {kind!r}"
            )
        if (
            entry.get("num_documents", num_docs) != num_docs
            or entry.get("num_tokens", num_tokens) != num_tokens
        ):
            raise UnitrainError(f"{self.index_path}: counts differ from metadata.json")
        self._maps = (tokens_map, index_map)

    def _check_groups(self, num_responses: int) -> None:
        """Every group: ≥ 2 responses, each non-empty and inside its document, back to back; finite scores."""
        counts = np.diff(self.group_offsets)  # (n,)
        if self.group_offsets[0] != 0 or self.group_offsets[-1] != num_responses or (counts < 2).any():
            raise UnitrainError(
                f"{self.index_path}: group offsets do not add up to {num_responses} responses of ≥ 2 per group"
            )
        if ((self.response_begins < 0) | (self.response_lengths() <= 0)).any():
            raise UnitrainError(f"{self.index_path}: group response spans out of range")
        if not np.isfinite(self.scores).all():
            raise UnitrainError(f"{self.index_path}: a group score is not finite")

    def response_lengths(self) -> np.ndarray:
        """(R,) int32 tokens of every group response: to the next response's begin, the last to its document's
        end (negative or zero when the spans are broken, which the open-time check refuses)."""
        begins = self.response_begins.astype(np.int64)
        counts = np.diff(self.group_offsets)
        ends = np.repeat(self.lengths(), counts).astype(np.int64)  # (R,) document length, right for each last
        not_last = np.ones(len(begins), dtype=bool)
        not_last[self.group_offsets[1:][counts > 0] - 1] = False
        ends[not_last] = begins[1:][not_last[:-1]]
        return (ends - begins).astype(np.int32)

    def lengths(self) -> np.ndarray:
        """Document lengths (n,), int32 unless the shard is too large for it; computed, not kept."""
        return columns.lengths_of(self.offsets, columns.length_dtype(self.num_tokens))

    def _check_loss_spans(self, num_spans: int) -> None:
        counts = np.diff(self.span_offsets)  # (n,)
        if self.span_offsets[0] != 0 or self.span_offsets[-1] != num_spans or (counts < 0).any():
            raise UnitrainError(
                f"{self.index_path}: loss-span offsets do not add up to the {num_spans} spans"
            )
        doc_lengths = np.repeat(self.lengths(), counts)  # (m,) length of each span's document
        begin, end = self.span_table[:, 0], self.span_table[:, 1]
        if ((begin < 0) | (begin >= end) | (end > doc_lengths)).any():
            raise UnitrainError(f"{self.index_path}: loss-masking spans out of range")


def _map(path: Path, magic: bytes, header_size: int) -> mmap.mmap:
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < HEADER_BYTES:
                raise UnitrainError(f"{path}: {size} bytes is too short for a unitrain header (truncated?)")
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise UnitrainError(f"{path}: shard file is missing") from None
    if mapped[: len(magic)] != magic:
        raise UnitrainError(
            f"{path}: not a unitrain file (bad magic {bytes(mapped[:8])!r}, expected {magic!r})"
        )
    return mapped


def _check_version(path: Path, version: int) -> None:
    if version > FORMAT_VERSION:
        raise UnitrainError(
            f"{path}: format version {version} is newer than this unitrain reads ({FORMAT_VERSION}); upgrade unitrain"
        )


def _check_size(path: Path, actual: int, expected: int) -> None:
    if actual != expected:
        raise UnitrainError(
            f"{path}: {actual} bytes but its header describes {expected} (truncated or corrupted)"
        )


class GPTMemmapDataset:
    """A prepared dataset opened read-only; all shards read as one sequence of documents."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        metadata_path = self.path / "metadata.json"
        if not metadata_path.is_file():
            raw = self.path.is_file() or any(self.path.glob("*.json*")) or any(self.path.glob("*.parquet"))
            hint = "; run `unitrain prepare` first to tokenize it" if raw else ""
            raise UnitrainError(f"{self.path}: not a prepared dataset (no metadata.json){hint}")
        try:
            self.metadata = json.loads(metadata_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UnitrainError(f"{metadata_path}: unreadable JSON ({error})") from None
        if not isinstance(self.metadata, dict) or self.metadata.get("format") != FORMAT_NAME:
            raise UnitrainError(f"{metadata_path}: not a unitrain dataset (format is not {FORMAT_NAME!r})")
        _check_version(metadata_path, int(self.metadata.get("format_version", 0)))
        self.kind = self.metadata.get("kind")
        if self.kind not in KINDS:
            raise UnitrainError(f"{metadata_path}: unknown kind {self.kind!r}")
        self._shards = [_Shard(self.path, entry, self.kind) for entry in self.metadata["shards"]]
        if len({shard.group_offsets is None for shard in self._shards}) > 1:
            raise UnitrainError(
                f"{self.path}: shards mix preference pairs and groups (every shard must be one)"
            )
        counts = [shard.num_documents for shard in self._shards]
        self._shard_starts = np.zeros(len(counts) + 1, np.int64)  # (S + 1,) first document of each shard
        np.cumsum(counts, out=self._shard_starts[1:])
        self._columns: dict[str, np.ndarray] = {}
        tokenizer = self.metadata.get("tokenizer", {})
        self.vocab_size: int = tokenizer.get("vocab_size")
        self.eos_id: int | None = tokenizer.get("eos_id")
        self.bos_id: int | None = tokenizer.get("bos_id")
        self.fingerprint: str = self.metadata["fingerprint"]
        tokenizer_dir = self.path / "tokenizer"
        self.tokenizer_path: Path | None = tokenizer_dir if tokenizer_dir.is_dir() else None

    def __len__(self) -> int:
        return int(self._shard_starts[-1])

    def _column(self, name: str, of_shard) -> np.ndarray:
        """A per-document column over all shards, computed on first use and kept (one shard: no copy)."""
        if name not in self._columns:
            parts = [of_shard(shard) for shard in self._shards]
            self._columns[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._columns[name]

    @property
    def document_lengths(self) -> np.ndarray:
        """Tokens of each document (N,), int32 (int64 for shards of 2³¹ tokens or more); read on first use, so
        that opening costs no memory per document."""
        return self._column("lengths", _Shard.lengths)

    def lengths_of(self, indices: np.ndarray) -> np.ndarray:
        """Lengths (n,) int64 of the documents `indices`, read from the mapped offsets: nothing kept per
        document (the planner's path; `document_lengths` keeps a column)."""
        indices = np.asarray(indices, np.int64)
        if len(self._shards) == 1:
            offsets = self._shards[0].offsets
            return offsets[indices + 1] - offsets[indices]
        shard = np.searchsorted(self._shard_starts, indices, side="right") - 1  # (n,)
        order = np.argsort(shard.astype(np.int32), kind="stable")  # grouped by shard, one gather per shard
        bounds = np.searchsorted(shard[order], np.arange(len(self._shards) + 1))
        lengths = np.empty(len(indices), np.int64)
        for k in np.flatnonzero(np.diff(bounds)):
            at = order[bounds[k] : bounds[k + 1]]
            local = indices[at] - self._shard_starts[k]
            lengths[at] = self._shards[k].offsets[local + 1] - self._shards[k].offsets[local]
        return lengths

    def content_hashes(self) -> np.ndarray:
        """(N,) uint64 hash of each document's tokens (and of where a pair's responses begin): equal for copies of
        one document or pair, so duplicates are found, and held out together, without reading a sample."""

        def of_shard(shard: _Shard) -> np.ndarray:
            return columns.content_hashes(shard.tokens, shard.offsets, shard.preference)

        return self._column("content_hashes", of_shard)

    @property
    def preference_spans(self) -> np.ndarray:
        """(N, 2) int32 chosen begin, rejected begin of each pair (zero-copy for one shard); preference only."""
        if self.kind != "preference":
            raise UnitrainError(f"{self.path}: a {self.kind} dataset has no preference spans")
        return self._column("preference", lambda shard: shard.preference)

    @property
    def is_groups(self) -> bool:
        """A preference dataset of groups (format version 2) rather than pairs."""
        return bool(self._shards) and self._shards[0].group_offsets is not None

    @property
    def group_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(group_offsets (N + 1,) int64, response_lengths (R,) int32, scores (R,) float32)` over every shard:
        document i's responses are `[group_offsets[i], group_offsets[i + 1])` of the flat arrays; groups only."""
        if not self.is_groups:
            raise UnitrainError(f"{self.path}: not a dataset of preference groups")
        if "groups" not in self._columns:
            counts, lengths, scores = [], [], []
            for shard in self._shards:
                counts.append(np.diff(shard.group_offsets))
                lengths.append(shard.response_lengths())
                scores.append(shard.scores)
            offsets = np.zeros(len(self) + 1, np.int64)  # (N + 1,)
            np.cumsum(np.concatenate(counts), out=offsets[1:])
            self._columns["groups"] = (offsets, np.concatenate(lengths), np.concatenate(scores))
        return self._columns["groups"]

    @property
    def sft_target_counts(self) -> np.ndarray:
        """(N,) int32 tokens trained on by SFT per document: positions 1..L-1 outside the loss-masking spans."""
        if self.kind == "preference":
            raise UnitrainError(f"{self.path}: SFT targets of a preference dataset come from its spans")

        def of_shard(shard: _Shard) -> np.ndarray:
            if shard.span_table is None:
                return np.maximum(shard.lengths() - 1, 0).astype(np.int32)
            return columns.sft_target_counts(shard.offsets, shard.span_offsets, shard.span_table)

        return self._column("sft_targets", of_shard)

    def __getitem__(self, index: int) -> GPTSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} out of range for {len(self)} documents")
        index = int(index) % len(self)
        shard_id = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
        shard, local = self._shards[shard_id], index - int(self._shard_starts[shard_id])
        begin, end = int(shard.offsets[local]), int(shard.offsets[local + 1])
        token_ids = shard.tokens[begin:end]  # (L,) zero-copy view
        if shard.preference is not None:
            chosen, rejected = (int(v) for v in shard.preference[local])
            return GPTSample(token_ids, chosen_span=(chosen, rejected), rejected_span=(rejected, end - begin))
        if shard.group_offsets is not None:
            first, stop = int(shard.group_offsets[local]), int(shard.group_offsets[local + 1])
            begins = shard.response_begins[first:stop].astype(np.int64)  # (N,)
            spans = np.stack([begins, np.append(begins[1:], end - begin)], axis=1)  # (N, 2)
            return GPTSample(token_ids, response_spans=spans, scores=shard.scores[first:stop])
        if shard.span_table is not None:
            spans = shard.span_table[shard.span_offsets[local] : shard.span_offsets[local + 1]]  # (k, 2)
            return GPTSample(token_ids, loss_masking_spans=spans)
        return GPTSample(token_ids)

    def verify(self) -> None:
        """Re-hash every shard file against metadata.json (slow: reads everything); raises on a mismatch."""
        for entry, shard in zip(self.metadata["shards"], self._shards):
            for path, key in ((shard.tokens_path, "tokens_sha256"), (shard.index_path, "index_sha256")):
                if sha256_file(path) != entry[key]:
                    raise UnitrainError(f"{path}: content differs from the sha256 recorded in metadata.json")

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])
