"""Hugging Face Hub ids where a model directory is expected: `org/name` or `org/name@revision`.

A local path that exists always wins; anything else shaped like a Hub id is resolved through `huggingface_hub`'s
cache (`snapshot_download`: downloaded once, then read from `HF_HOME`), with no network at all under
`HF_HUB_OFFLINE=1` (the cache alone, `local_files_only`). A value that is neither is returned as it is, for the
caller's own "no such directory" message. Trade-off: resolving downloads the whole repository snapshot, weights
included, before anything is checked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from unitrain.errors import UnitrainError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(value: str | None, what: str) -> str | None:
    """`value` itself when it is a local path (or not a Hub id), else the directory of the Hub snapshot it
    names; a Hub id that cannot be found is one line naming `what` (the setting or flag)."""
    if value is None or Path(value).exists():
        return value
    match = HUB_ID.match(str(value))
    if match is None:
        return value
    repo, revision = match.group("repo"), match.group("revision")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise UnitrainError(
            f"{what} {value}: not a local directory (huggingface_hub is not installed)"
        ) from None
    try:
        return snapshot_download(repo, revision=revision, local_files_only=offline())
    except Exception as error:  # huggingface_hub's errors: not cached offline, not found, no network, bad id
        where = "the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline() else "the Hugging Face Hub"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnitrainError(
            f"{what} {value}: neither a local directory nor a model found in {where} "
            f"({type(error).__name__}: {reason})"
        ) from None
