"""Writing the on-disk token format: `DatasetWriter` (one document at a time with `add`, many with `add_batch`)
and `write_dataset`.

A dataset is written into `.DIR.tmp-PID` beside the target and renamed into place only when complete (metadata
last), so an interrupted write leaves nothing that loads. Shards stream: tokens go to disk as documents arrive,
the index is written when the shard closes. Trade-off: a shard's index arrays are kept in memory until it closes
(a few bytes per document), so a shard's size, not the dataset's, bounds the writer's memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from unitrain.data.memmap.bulk import check_batch
from unitrain.data.memmap.format import (
    DEFAULT_SHARD_TOKENS,
    DTYPES,
    FLAG_GROUPS,
    FLAG_LOSS_SPANS,
    FLAG_PREFERENCE,
    FORMAT_NAME,
    GROUPS_VERSION,
    HEADER_BYTES,
    INDEX_HEADER,
    INDEX_MAGIC,
    KINDS,
    TOKENS_HEADER,
    TOKENS_MAGIC,
    sha256_file,
    token_dtype_code,
)
from unitrain.data.sample import GPTSample
from unitrain.errors import UnitrainError
from unitrain.files import replace_path


class _ShardWriter:
    """Streams one shard: tokens go to disk as documents arrive; the index is written at close."""

    def __init__(self, directory: Path, name: str, dtype_code: int, kind: str) -> None:
        self.name = name
        self.tokens_path = directory / f"{name}.tokens"
        self.index_path = directory / f"{name}.index"
        self.dtype = DTYPES[dtype_code]
        self.dtype_code = dtype_code
        self.kind = kind
        self.handle = open(self.tokens_path, "wb")
        self.handle.write(b"\0" * HEADER_BYTES)
        self.lengths: list[int] = []  # documents from `add`, not yet in `batches`
        self.loss_spans: list[np.ndarray] = []
        self.preference_spans: list[tuple[int, int]] = []
        self.groups = False  # set by the first preference sample: a shard holds pairs or groups
        self.response_begins: list[np.ndarray] = []  # groups come one by one through `add`, never `add_batch`
        self.scores: list[np.ndarray] = []
        # arrays of earlier documents, in order: (lengths (n,), span counts (n,), spans (m, 2), preference (n, 2))
        self.batches: list[tuple] = []
        self.num_documents = 0
        self.num_tokens = 0

    def add(self, sample: GPTSample) -> None:
        self.handle.write(np.ascontiguousarray(sample.token_ids, dtype=self.dtype).tobytes())
        self.lengths.append(len(sample.token_ids))
        self.num_documents += 1
        self.num_tokens += len(sample.token_ids)
        if self.kind == "sft":
            spans = sample.loss_masking_spans
            self.loss_spans.append(
                np.zeros((0, 2), np.int32) if spans is None else np.asarray(spans, np.int32).reshape(-1, 2)
            )
        elif self.groups:
            spans, scores = sample.group_spans, sample.group_scores  # a pair joins as a group scored (1, 0)
            self.response_begins.append(np.asarray(spans[:, 0], "<i4"))
            self.scores.append(np.asarray(scores, "<f4"))
        elif self.kind == "preference":
            self.preference_spans.append((sample.chosen_span[0], sample.rejected_span[0]))

    def add_batch(self, tokens: np.ndarray, lengths: np.ndarray, span_counts, spans, preference) -> None:
        """Documents already checked by `DatasetWriter.add_batch`, written with one call."""
        self._flush()
        self.handle.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)))
        self.batches.append((lengths, span_counts, spans, preference))
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def _flush(self) -> None:
        """Move the documents of `add` into `batches`, so that documents keep their order."""
        if not self.lengths:
            return
        counts = np.array([len(s) for s in self.loss_spans], np.int64) if self.kind == "sft" else None
        spans = np.concatenate(self.loss_spans).astype(np.int32) if self.kind == "sft" else None
        preference = (
            np.array(self.preference_spans, np.int32).reshape(-1, 2) if self.kind == "preference" else None
        )
        self.batches.append((np.array(self.lengths, np.int64), counts, spans, preference))
        self.lengths, self.loss_spans, self.preference_spans = [], [], []

    def close(self) -> dict:
        version = GROUPS_VERSION if self.groups else 1
        self.handle.seek(0)
        self.handle.write(TOKENS_HEADER.pack(TOKENS_MAGIC, version, self.dtype_code, self.num_tokens))
        self.handle.close()
        self._flush()

        def column(k: int, shape: tuple) -> np.ndarray:
            return np.concatenate([np.zeros(shape, np.int64)] + [batch[k] for batch in self.batches])

        offsets = np.zeros(self.num_documents + 1, np.int64)  # (n + 1,)
        np.cumsum(column(0, (0,)), out=offsets[1:])
        sections = [offsets.tobytes()]
        flags, num_spans, num_responses = 0, 0, 0
        if self.kind == "sft":
            flags |= FLAG_LOSS_SPANS
            span_offsets = np.zeros(self.num_documents + 1, np.int64)  # (n + 1,)
            np.cumsum(column(1, (0,)), out=span_offsets[1:])
            table = column(2, (0, 2)).astype("<i4")  # (m, 2)
            num_spans = len(table)
            sections += [span_offsets.tobytes(), table.tobytes(), b"\0" * (-table.nbytes % 8)]
        if self.groups:
            flags |= FLAG_GROUPS
            counts = np.array([len(b) for b in self.response_begins], np.int64)
            group_offsets = np.zeros(len(counts) + 1, np.int64)  # (n + 1,)
            np.cumsum(counts, out=group_offsets[1:])
            begins = np.concatenate(self.response_begins + [np.zeros(0, "<i4")])  # (R,)
            scores = np.concatenate(self.scores + [np.zeros(0, "<f4")])  # (R,)
            num_responses = len(begins)
            pad = b"\0" * (-begins.nbytes % 8)
            sections += [group_offsets.tobytes(), begins.tobytes(), pad, scores.tobytes(), pad]
        elif self.kind == "preference":
            flags |= FLAG_PREFERENCE
            # (n, 2): chosen begin, rejected begin (chosen ends where rejected begins; rejected ends the document)
            pairs = column(3, (0, 2)).astype("<i4")
            sections += [pairs.tobytes(), b"\0" * (-pairs.nbytes % 8)]
        header = INDEX_HEADER.pack(
            INDEX_MAGIC, version, flags, self.num_documents, self.num_tokens, num_spans, num_responses
        )
        with open(self.index_path, "wb") as handle:
            handle.write(header.ljust(HEADER_BYTES, b"\0"))
            for section in sections:
                handle.write(section)
        entry = {
            "name": self.name,
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "tokens_bytes": self.tokens_path.stat().st_size,
            "index_bytes": self.index_path.stat().st_size,
            "tokens_sha256": sha256_file(self.tokens_path),
            "index_sha256": sha256_file(self.index_path),
        }
        return entry if version == 1 else {**entry, "format_version": version}


def _remove_stale_temps(output: Path) -> None:
    """Delete temporary directories of earlier writes to `output` whose process is gone (killed mid-write)."""
    for temp in output.parent.glob(f".{output.name}.tmp-*"):
        pid = temp.name.rpartition("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(temp, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by another user


class DatasetWriter:
    """Writes a dataset into `<output>.tmp-<pid>` beside the target and renames it into place on `close()`.

    Use as a context manager: an exception inside the block removes the temporary directory, so an interrupted
    write leaves nothing that loads as a dataset; a block that ends normally closes the dataset (if `close()`
    was not called in it). `tokenizer_files` are copied into `<output>/tokenizer/`.
    """

    def __init__(
        self,
        output: str | Path,
        kind: str,
        *,
        vocab_size: int,
        eos_id: int | None,
        bos_id: int | None = None,
        tokenizer_files: Iterable[str | Path] = (),
        max_shard_tokens: int = DEFAULT_SHARD_TOKENS,
        overwrite: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise UnitrainError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
        self.output = Path(output)
        if self.output.exists() and not overwrite:
            raise UnitrainError(f"{self.output} already exists; pass --overwrite to replace it")
        self.kind = kind
        self.vocab_size = int(vocab_size)
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.max_shard_tokens = max_shard_tokens
        self.dtype_code = token_dtype_code(self.vocab_size)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(self.output)
        self.temp = self.output.parent / f".{self.output.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.temp, ignore_errors=True)
        self.temp.mkdir()
        self.tokenizer_files = [Path(f) for f in tokenizer_files]
        self.shards: list[dict] = []
        self.current: _ShardWriter | None = None
        self.groups: bool | None = None  # preference layout, set by the first sample: pairs or groups

    def add(self, sample: GPTSample) -> None:
        if self.kind == "preference" and not sample.is_preference:
            raise ValueError("a preference dataset takes only samples with chosen/rejected or response spans")
        if self.kind == "preference":
            if self.groups is None:
                self.groups = sample.is_group
            elif sample.is_group and not self.groups:
                raise ValueError(
                    "this dataset started with pairs and cannot take a group; write every sample as a group "
                    "(a pair becomes a group scored (1, 0)) or start with a group"
                )
        if len(sample.token_ids) and int(np.max(sample.token_ids)) >= self.vocab_size:
            raise ValueError(f"token id {int(np.max(sample.token_ids))} >= vocab_size {self.vocab_size}")
        if (
            len(sample.token_ids) and int(np.min(sample.token_ids)) < 0
        ):  # would wrap around in unsigned storage
            raise ValueError(f"negative token id {int(np.min(sample.token_ids))}")
        if self.current is None:
            self.current = self._new_shard()
        self.current.add(sample)
        if self.current.num_tokens >= self.max_shard_tokens:
            self.shards.append(self.current.close())
            self.current = None

    def adopt_shard(self, directory: Path, entry: dict) -> None:
        """Move a finished shard (its two files in `directory`, `entry` as `close` records it) in as the next
        shard: how a dataset written in parts (one part per input unit and rank) is assembled without a copy."""
        if self.current is not None:
            raise ValueError("adopt_shard after add: finish the documents added one by one first")
        name = f"shard-{len(self.shards):05d}"
        for suffix in (".tokens", ".index"):
            os.replace(directory / f"{entry['name']}{suffix}", self.temp / f"{name}{suffix}")
        self.shards.append({**entry, "name": name})

    def add_batch(
        self,
        token_ids: np.ndarray,
        lengths: np.ndarray,
        *,
        loss_span_counts: np.ndarray | None = None,
        loss_spans: np.ndarray | None = None,
        preference_spans: np.ndarray | None = None,
    ) -> None:
        """Add many documents at once: `token_ids` (T,) every document back to back, `lengths` (n,) their sizes.

        sft: `loss_span_counts` (n,) spans per document and `loss_spans` (m, 2) document-relative `[begin, end)`
        token ranges excluded from the loss, in document order (both optional: no span). preference:
        `preference_spans` (n, 2) chosen begin, rejected begin (chosen ends where rejected begins, rejected ends
        the document). Every check is vectorized and a document is never split across shards; a bad batch
        raises `ValueError` naming the first offending document of the batch and writes nothing.
        """
        if self.groups:
            raise ValueError("add_batch writes pairs; a dataset of groups takes them one by one through add")
        tokens = np.asarray(token_ids).reshape(-1)
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        span_counts, spans, preference = check_batch(
            self, tokens, lengths, loss_span_counts, loss_spans, preference_spans
        )
        if self.kind == "preference":
            self.groups = False  # pairs: a later group is refused by `add`
        ends = np.cumsum(lengths)  # (n,)
        span_ends = None if span_counts is None else np.cumsum(span_counts)
        first = 0
        while first < len(lengths):
            if self.current is None:
                self.current = self._new_shard()
            base = int(ends[first - 1]) if first else 0
            room = self.max_shard_tokens - self.current.num_tokens
            # like `add`: documents go in until the shard reaches max_shard_tokens, the last one whole
            last = min(int(np.searchsorted(ends, base + room, side="left")) + 1, len(lengths))
            span_range = slice(None)
            if span_counts is not None:
                span_range = slice(int(span_ends[first - 1]) if first else 0, int(span_ends[last - 1]))
            self.current.add_batch(
                tokens[base : int(ends[last - 1])],
                lengths[first:last],
                None if span_counts is None else span_counts[first:last],
                None if spans is None else spans[span_range],
                None if preference is None else preference[first:last],
            )
            if self.current.num_tokens >= self.max_shard_tokens:
                self.shards.append(self.current.close())
                self.current = None
            first = last

    def _new_shard(self) -> _ShardWriter:
        shard = _ShardWriter(self.temp, f"shard-{len(self.shards):05d}", self.dtype_code, self.kind)
        shard.groups = bool(self.groups)
        return shard

    def close(self, metadata_extra: dict | None = None) -> Path:
        """Finish the shards, write metadata.json, and move the dataset into place. Returns its path."""
        if self.current is not None or not self.shards:
            if self.current is None:
                self.current = self._new_shard()
            self.shards.append(self.current.close())
            self.current = None
        tokenizer_hashes = {}
        if self.tokenizer_files:
            (self.temp / "tokenizer").mkdir(exist_ok=True)
            for source in self.tokenizer_files:
                shutil.copyfile(source, self.temp / "tokenizer" / source.name)
                tokenizer_hashes[source.name] = sha256_file(source)
        version = max(shard.get("format_version", 1) for shard in self.shards)
        fingerprint = hashlib.sha256(f"{FORMAT_NAME}/{version}/{self.kind}".encode())
        for shard in self.shards:
            fingerprint.update(f"{shard['tokens_sha256']}{shard['index_sha256']}".encode())
        metadata = {
            "format": FORMAT_NAME,
            "format_version": version,
            "kind": self.kind,
            "num_documents": sum(s["num_documents"] for s in self.shards),
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "token_dtype": DTYPES[self.dtype_code].name,
            "fingerprint": fingerprint.hexdigest(),
            "tokenizer": {
                "vocab_size": self.vocab_size,
                "bos_id": self.bos_id,
                "eos_id": self.eos_id,
                "files_sha256": tokenizer_hashes,
            },
            "shards": self.shards,
            **(metadata_extra or {}),
        }
        (self.temp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        replace_path(self.temp, self.output)
        return self.output

    def abort(self) -> None:
        if self.current is not None:
            self.current.handle.close()
        shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        elif self.temp.exists():  # the block ended without close(): finish the dataset rather than lose it
            self.close()


def write_dataset(
    path: str | Path,
    samples: Iterable[GPTSample],
    kind: str,
    *,
    vocab_size: int | None = None,
    eos_id: int | None = None,
    bos_id: int | None = None,
    metadata_extra: dict | None = None,
    max_shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
) -> Path:
    """Write GPTSamples straight to a dataset (for tests and tools that need no tokenizer).

    `vocab_size` defaults to the largest token id + 1.
    """
    samples = list(samples)
    if vocab_size is None:
        vocab_size = 1 + max((int(np.max(s.token_ids)) for s in samples if len(s.token_ids)), default=0)
    with DatasetWriter(
        path,
        kind,
        vocab_size=vocab_size,
        eos_id=eos_id,
        bos_id=bos_id,
        max_shard_tokens=max_shard_tokens,
        overwrite=overwrite,
    ) as writer:
        for sample in samples:
            writer.add(sample)
        return writer.close(metadata_extra)
