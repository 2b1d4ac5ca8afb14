"""File-system details every stage shares: files get the mode the user's umask gives, outputs appear whole, and
a model named by a Hugging Face Hub id is found on disk.

safetensors writes its files with mode 0600 whatever the umask, so weights on a shared file system were unreadable
by anyone else while every other file of a run was not; each writer of a safetensors file calls `follow_umask`.

Hub ids (`org/name`, `org/name@revision`) where a model directory is expected (`resolve_model`): a local path
that exists always wins; anything else shaped like a Hub id is resolved through `huggingface_hub`'s cache
(`snapshot_download`: downloaded once, then read from `HF_HOME`), with no network at all under `HF_HUB_OFFLINE=1`
(the cache alone, `local_files_only`). A value that is neither is returned as it is, for the
caller's own "no such directory" message. Trade-off: resolving downloads the whole repository snapshot, weights
included, before anything is checked.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unitrain.errors import UnitrainError


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give a file the mode a plain `open(path, "w")` would have given it: 0666 less the umask."""
    os.chmod(path, 0o666 & ~_umask())


def replace_path(staging: Path, target: Path) -> None:
    """Move a completely written `staging` directory to `target`, removing what was there."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    os.replace(staging, target)


@contextmanager
def written_whole(output: Path) -> Iterator[Path]:
    """A staging directory beside `output` to write into: moved to `output` (replacing it) when the block ends,
    removed when the block raises, so `output` is either complete or what it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_path(staging, output)


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
