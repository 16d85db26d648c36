"""Crash-safe file writes: a file is either its old complete version or its new complete one.

Write to a temporary name in the target's folder, flush it to disk, rename it over the target
(atomic on POSIX and Windows), then flush the folder so the rename itself survives a crash. A
crash or a full disk mid-write leaves the old file (or none) and no stray temporary.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path beside ``target``; when the block succeeds it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        if hasattr(os, "O_DIRECTORY"):  # folders cannot be opened for fsync on Windows
            dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
