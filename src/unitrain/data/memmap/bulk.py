"""Checks of `DatasetWriter.add_batch`: many documents at once, validated vectorized before a byte is written.

The bulk path exists for token data that is already tokenized (other tools' token files, benchmarks): one call
per million documents instead of one Python call and a few small arrays per document.
"""

from __future__ import annotations

import numpy as np


def check_batch(writer, tokens, lengths, span_counts, spans, preference):
    """Vectorized checks of one `add_batch` call → (span counts, spans, preference) as the shard writer takes
    them (empty spans when an sft batch gives none)."""
    n = len(lengths)

    def first(bad: np.ndarray) -> int:
        return int(np.argmax(bad))

    if tokens.dtype.kind not in "iu":
        raise ValueError(f"token_ids must be integers, got {tokens.dtype}")
    if (lengths < 0).any():
        raise ValueError(f"document {first(lengths < 0)} of the batch has a negative length")
    if int(lengths.sum()) != len(tokens):
        raise ValueError(f"lengths add up to {int(lengths.sum())} tokens but token_ids has {len(tokens)}")
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= writer.vocab_size):
        bad = (tokens < 0) | (tokens >= writer.vocab_size)
        raise ValueError(f"token id {int(tokens[first(bad)])} is outside [0, vocab_size {writer.vocab_size})")
    if (preference is not None) != (writer.kind == "preference"):
        raise ValueError(
            f"preference_spans are required by, and only by, a preference dataset ({writer.kind})"
        )
    if (span_counts is not None or spans is not None) and writer.kind != "sft":
        raise ValueError(f"loss-masking spans belong to an sft dataset, not a {writer.kind} one")
    if preference is not None:
        preference = np.asarray(preference, np.int64).reshape(n, 2)
        chosen, rejected = preference[:, 0], preference[:, 1]
        bad = (chosen < 0) | (chosen >= rejected) | (rejected >= lengths)
        if bad.any():
            raise ValueError(
                f"document {first(bad)} of the batch: need 0 <= chosen begin < rejected begin < length"
            )
        return None, None, preference.astype(np.int32)
    if writer.kind != "sft":
        return None, None, None
    span_counts = (
        np.zeros(n, np.int64) if span_counts is None else np.asarray(span_counts, np.int64).reshape(n)
    )
    spans = np.zeros((0, 2), np.int64) if spans is None else np.asarray(spans, np.int64).reshape(-1, 2)
    if (span_counts < 0).any() or int(span_counts.sum()) != len(spans):
        raise ValueError(
            f"loss_span_counts add up to {int(span_counts.sum())} but {len(spans)} spans are given"
        )
    owner = np.repeat(np.arange(n), span_counts)  # (m,) document of each span
    bad = (spans[:, 0] < 0) | (spans[:, 0] >= spans[:, 1]) | (spans[:, 1] > lengths[owner])
    if bad.any():
        raise ValueError(f"document {int(owner[first(bad)])} of the batch: loss-masking span out of range")
    return span_counts, spans.astype(np.int32), None
