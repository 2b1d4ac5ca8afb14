"""The on-disk token format: one writer (`DatasetWriter`, `write_dataset`) and one reader (`GPTMemmapDataset`).

A dataset is a directory: `metadata.json`, optional `tokenizer/`, and shards `shard-NNNNN.tokens` (a header, then
every token of the shard back to back) + `shard-NNNNN.index` (a header, then document offsets and the optional span
sections). Layout byte by byte: docs/data-format.md. Trade-off: documents are read with zero copies through
`mmap`, so every size is checked once at open (a truncated file fails there, naming the file), and the spans are
validated vectorized at open rather than trusted at read time.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from unitrain.data import columns
from unitrain.data.bulk import check_batch
from unitrain.data.sample import GPTSample
from unitrain.errors import UnitrainError

FORMAT_NAME = "unitrain-memmap"
FORMAT_VERSION = 2  # the newest this reads; a dataset is written at the lowest version that holds it
GROUPS_VERSION = 2  # version 2 added the groups section; everything else is still written as version 1
TOKENS_MAGIC = b"UNITOKNS"
INDEX_MAGIC = b"UNIINDEX"
HEADER_BYTES = 64
# tokens header: magic, version, dtype code, num_tokens; index header: magic, version, flags, docs, tokens, spans,
# responses (version 2; zero in version 1 files).
TOKENS_HEADER = struct.Struct("<8sIIQ")
INDEX_HEADER = struct.Struct("<8sIIQQQQ")
FLAG_LOSS_SPANS = 1
FLAG_PREFERENCE = 2
FLAG_GROUPS = 4
DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
KINDS = ("pretraining", "sft", "preference")
DEFAULT_SHARD_TOKENS = 1 << 30


def token_dtype_code(vocab_size: int) -> int:
    """uint16 (code 1) when every id fits, else uint32 (code 2)."""
    return 1 if vocab_size <= 1 << 16 else 2


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
            "tokens_sha256": _sha256_file(self.tokens_path),
            "index_sha256": _sha256_file(self.index_path),
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
        self.overwrite = overwrite
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
                tokenizer_hashes[source.name] = _sha256_file(source)
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
        if self.output.exists():
            shutil.rmtree(self.output)
        os.replace(self.temp, self.output)
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
            sizes += [(num_docs + 1) * 8, _pad8(num_spans * 8)]
        if flags & FLAG_PREFERENCE:
            sizes.append(_pad8(num_docs * 8))
        if flags & FLAG_GROUPS:
            sizes += [(num_docs + 1) * 8, _pad8(num_responses * 4), _pad8(num_responses * 4)]
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
        begins = self.response_begins
        lengths = np.repeat(self.lengths(), counts)  # (R,) length of each response's document
        last = np.zeros(num_responses, dtype=bool)
        last[self.group_offsets[1:] - 1] = True  # the last response of each group ends its document
        ends = np.where(last, lengths, np.roll(begins, -1))
        if ((begins < 0) | (begins >= ends)).any():
            raise UnitrainError(f"{self.index_path}: group response spans out of range")
        if not np.isfinite(self.scores).all():
            raise UnitrainError(f"{self.index_path}: a group score is not finite")

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


def _pad8(nbytes: int) -> int:
    return nbytes + (-nbytes % 8)


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
            raise UnitrainError(f"{self.path}: not a prepared dataset (no metadata.json)")
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

    @property
    def preference_spans(self) -> np.ndarray:
        """(N, 2) int32 chosen begin, rejected begin of each pair (zero-copy for one shard); preference only."""
        if self.kind != "preference":
            raise UnitrainError(f"{self.path}: a {self.kind} dataset has no preference spans")
        return self._column("preference", lambda shard: shard.preference)

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
                if _sha256_file(path) != entry[key]:
                    raise UnitrainError(f"{path}: content differs from the sha256 recorded in metadata.json")

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])
