"""The on-disk token format's constants and small helpers, shared by the writer (`writer.py`) and the reader
(`reader.py`). Layout byte by byte: docs/data-format.md.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def pad8(nbytes: int) -> int:
    return nbytes + (-nbytes % 8)
