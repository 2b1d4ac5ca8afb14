"""Per-document columns computed vectorized from a shard's index: lengths and SFT target counts.

The planner needs one number or two per document, for every document of an epoch; these functions produce them
in chunks of documents, so the temporaries stay small however large the shard, and the results use the
narrowest dtype that holds them (int32 lengths: 4 bytes per document instead of 8).
"""

from __future__ import annotations

import numpy as np

CHUNK = 1 << 20  # documents per vectorized pass


def length_dtype(num_tokens: int) -> np.dtype:
    """int32 when no document of `num_tokens` tokens in all can overflow it, else int64."""
    return np.dtype(np.int32) if num_tokens < 1 << 31 else np.dtype(np.int64)


def check_offsets(offsets: np.ndarray, num_tokens: int) -> bool:
    """True when `offsets` (n + 1,) start at 0, never decrease and end at `num_tokens` (read in chunks)."""
    if offsets[0] != 0 or offsets[-1] != num_tokens:
        return False
    for begin in range(0, len(offsets) - 1, CHUNK):
        if (np.diff(offsets[begin : begin + CHUNK + 1]) < 0).any():
            return False
    return True


def lengths_of(offsets: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Document lengths (n,) from offsets (n + 1,), in `dtype`."""
    lengths = np.empty(len(offsets) - 1, dtype)
    for begin in range(0, len(lengths), CHUNK):
        end = min(begin + CHUNK, len(lengths))
        np.subtract(
            offsets[begin + 1 : end + 1], offsets[begin:end], out=lengths[begin:end], casting="unsafe"
        )
    return lengths


def sft_target_counts(offsets: np.ndarray, span_offsets: np.ndarray, span_table: np.ndarray) -> np.ndarray:
    """Tokens trained on per SFT document (n,) int32: positions 1..L-1 outside every loss-masking span.

    Spans may overlap or come in any order within a document: the masked positions are their union. Spans are
    shifted to global token positions so that one running maximum over all spans (sorted by start) gives, for
    each span, the part not already covered by an earlier one of the same document.
    """
    num_documents = len(offsets) - 1
    counts = np.empty(num_documents, np.int32)
    for first in range(0, num_documents, CHUNK):
        last = min(first + CHUNK, num_documents)
        lengths = np.diff(offsets[first : last + 1])  # (d,)
        span_begin, span_end = int(span_offsets[first]), int(span_offsets[last])
        per_document = np.diff(span_offsets[first : last + 1])  # (d,)
        document = np.repeat(np.arange(last - first), per_document)  # (m,) chunk-local
        base = offsets[first:last][document]  # (m,) global position of each span's document
        begin = span_table[span_begin:span_end, 0].astype(np.int64)
        first_masked = np.zeros(last - first, bool)
        first_masked[document[begin == 0]] = True  # position 0 is never a target: do not count it twice
        begin += base
        end = span_table[span_begin:span_end, 1].astype(np.int64) + base
        if len(begin) > 1 and (np.diff(begin) < 0).any():
            order = np.argsort(begin, kind="stable")
            begin, end, document = begin[order], end[order], document[order]
        covered_before = np.maximum.accumulate(end)  # (m,) only spans of the same document reach past `base`
        covered_before = np.concatenate([[0], covered_before[:-1]])
        new = np.maximum(end - np.maximum(begin, covered_before), 0)
        masked = np.bincount(document, weights=new, minlength=last - first).astype(np.int64)
        counts[first:last] = np.maximum(lengths - 1 - masked + first_masked, 0)
    return counts


HASH_TOKENS = 1 << 24  # tokens per vectorized hashing pass
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def content_hashes(tokens: np.ndarray, offsets: np.ndarray, spans: np.ndarray | None = None) -> np.ndarray:
    """A 64-bit hash of each document's tokens (n,) uint64, and of its `spans` (n, k) when given (where a pair's
    responses begin): equal documents hash equal, and different ones collide with probability ~n²/2⁶⁴.

    Each token is mixed with its position in its document and the mixed values are summed per document
    (`np.add.reduceat`), over passes of at most HASH_TOKENS tokens: no Python object per document."""
    num_documents = len(offsets) - 1
    hashes = np.zeros(num_documents, np.uint64)
    first = 0
    while first < num_documents:
        last = int(np.searchsorted(offsets, offsets[first] + HASH_TOKENS, side="right")) - 1
        last = min(max(last, first + 1), num_documents)
        begin, end = int(offsets[first]), int(offsets[last])
        lengths = np.diff(offsets[first : last + 1])  # (d,)
        starts = offsets[first:last] - begin  # (d,) chunk-relative
        position = np.arange(end - begin, dtype=np.int64) - np.repeat(starts, lengths)  # (t,) within document
        mixed = _mix(tokens[begin:end].astype(np.uint64) * _GOLDEN ^ _mix(position.astype(np.uint64) + 1))
        filled = lengths > 0
        if filled.any():  # reduceat needs non-empty segments
            hashes[first:last][filled] = np.add.reduceat(mixed, starts[filled])
        hashes[first:last] = _mix(hashes[first:last] ^ _mix(lengths.astype(np.uint64)))
        first = last
    if spans is not None:
        for column in np.asarray(spans, np.int64).reshape(num_documents, -1).T:
            hashes = _mix(hashes ^ _mix(column.astype(np.uint64) + _GOLDEN))
    return hashes
