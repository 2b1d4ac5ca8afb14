"""File-system details every stage shares: files get the mode the user's umask gives, and outputs appear whole.

safetensors writes its files with mode 0600 whatever the umask, so weights on a shared file system were unreadable
by anyone else while every other file of a run was not; each writer of a safetensors file calls `follow_umask`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
