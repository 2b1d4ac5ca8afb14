"""Plan once, share it: an epoch's plan saved beside the run, memory-mapped by every rank of a machine and by a
resumed run.

One file per (stream, epoch): a header (magic, JSON with the key and each array's dtype, shape, offset and
CRC-32) and the plan's arrays at 64-byte aligned offsets. The key holds everything that determines the plan
(the datasets' fingerprints, a digest of each source's indices, the blend weights, the packing settings, the
window, the seed, the epoch and this format's version); a file whose key, sizes or checksums do not match, or
whose header is damaged (a field missing or of the wrong type), is rebuilt, never trusted. Writes go to a
temporary file renamed into place, so a reader sees a whole file or none. The ranks of one machine take a file
lock (`fcntl.flock`): readers share it, the first rank that finds no valid plan takes it exclusively, builds
and writes, and the others then read. Trade-off: reading verifies a CRC over the whole file (57 ms for 10⁷
documents, measured), 40× cheaper than a rebuild and safe against a torn or stale file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from unitrain.data.epoch.plan import PackingPlan
from unitrain.errors import UnitrainError

MAGIC = b"UNIPLAN\0"
FORMAT = "unitrain-plan-1"
ALIGN = 64
ARRAYS = ("item_document", "item_part", "row_start", "row_items", "row_counts")
SCALARS = ("sequence_length", "dropped", "num_tokens", "num_slots")


def indices_digest(indices: np.ndarray) -> str:
    """A cheap digest of an index array (a source's train split): CRC-32 of its bytes and its length."""
    data = np.ascontiguousarray(indices, dtype="<i8")
    return f"{len(data)}:{zlib.crc32(memoryview(data).cast('B')):08x}"


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def write_plan(path: Path, key: dict, plan: PackingPlan) -> None:
    """Write `plan` under `key` to `path` atomically (temporary file + rename)."""
    arrays = {name: getattr(plan, name) for name in ARRAYS if getattr(plan, name) is not None}
    entries, offset = {}, 0
    for name, array in arrays.items():
        entries[name] = {
            "dtype": array.dtype.str,
            "shape": list(array.shape),
            "offset": offset,
            "crc": _crc(array),
        }
        offset += -(-array.nbytes // ALIGN) * ALIGN
    header = json.dumps(
        {"format": FORMAT, "key": key, "arrays": entries, **{name: getattr(plan, name) for name in SCALARS}}
    ).encode()
    start = -(-(len(MAGIC) + 8 + len(header)) // ALIGN) * ALIGN
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(partial, "wb") as handle:
        handle.write(MAGIC + len(header).to_bytes(8, "little") + header)
        for name, array in arrays.items():
            handle.seek(start + entries[name]["offset"])
            handle.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        handle.truncate(start + offset)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def read_plan(path: Path, key: dict) -> tuple[PackingPlan | None, str | None]:
    """(plan, None) when `path` holds a whole plan for `key`; (None, reason) when it exists but does not;
    (None, None) when there is no file. The arrays are read-only views of the mapped file."""
    if not path.exists():
        return None, None
    try:
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        if mapped[: len(MAGIC)] != MAGIC:
            return None, "not a unitrain plan file"
        length = int.from_bytes(mapped[len(MAGIC) : len(MAGIC) + 8], "little")
        header = json.loads(bytes(mapped[len(MAGIC) + 8 : len(MAGIC) + 8 + length]))
    except (OSError, ValueError) as error:
        return None, f"unreadable ({error})"
    try:
        return _plan_from(mapped, length, header, key)
    except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError) as error:
        # valid JSON, wrong content (a field missing, a dtype, shape or offset of the wrong type): rebuild
        return None, f"corrupted header ({type(error).__name__}: {error})"


def _plan_from(mapped: mmap.mmap, length: int, header, key: dict) -> tuple[PackingPlan | None, str | None]:
    """`read_plan` past the JSON: the header checked against `key` and the arrays mapped and verified."""
    if header.get("format") != FORMAT:
        return None, f"format {header.get('format')!r}, this unitrain writes {FORMAT!r}"
    if header.get("key") != key:
        changed = sorted(
            k for k in set(key) | set(header.get("key", {})) if header["key"].get(k) != key.get(k)
        )
        return None, f"planned for other settings ({', '.join(changed)} differ)"
    start = -(-(len(MAGIC) + 8 + length) // ALIGN) * ALIGN
    arrays = {}
    for name in ARRAYS:
        entry = header["arrays"].get(name)
        if entry is None:
            arrays[name] = None
            continue
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        count = int(np.prod(shape))
        if start + entry["offset"] + count * dtype.itemsize > len(mapped):
            return None, f"truncated: {name} runs past the end of the file"
        arrays[name] = np.frombuffer(mapped, dtype, count, start + entry["offset"]).reshape(shape)
        if _crc(arrays[name]) != entry["crc"]:
            return None, f"corrupted: the checksum of {name} does not match"
    if arrays["row_start"] is None or arrays["item_document"] is None:
        return None, "incomplete: rows or items are missing"
    return PackingPlan(**arrays, **{name: int(header[name]) for name in SCALARS}), None


def stream_digest(key: dict) -> str:
    """Names a stream's plan files: the key without the epoch."""
    rest = {k: v for k, v in key.items() if k != "epoch"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:16]


def load_or_build(
    cache_dir: str | Path, key: dict, build: Callable[[], PackingPlan], *, say: Callable[[str], None] = print
) -> PackingPlan:
    """The plan of `key` from `cache_dir`, built (by the first process to get here) and written when missing,
    stale or corrupted. Plans of epochs two or more before this one are deleted."""
    directory = Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    stream = stream_digest(key)
    path = directory / f"plan-{stream}-epoch{key['epoch']}.bin"
    with open(directory / f"plan-{stream}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        plan, _ = read_plan(path, key)
        if plan is not None:
            return plan
        fcntl.flock(lock, fcntl.LOCK_EX)  # not atomic: another process may have written it meanwhile
        plan, reason = read_plan(path, key)
        if plan is not None:
            return plan
        if reason is not None:
            say(f"plan cache {path}: {reason}; rebuilding")
        write_plan(path, key, build())
        for old in directory.glob(f"plan-{stream}-epoch*.bin"):
            epoch = old.stem.rpartition("epoch")[2]
            if epoch.isdigit() and int(epoch) < key["epoch"] - 1:
                old.unlink(missing_ok=True)
        plan, reason = read_plan(path, key)
        if plan is None:
            raise UnitrainError(f"{path}: the plan just written does not read back ({reason})")
        return plan
