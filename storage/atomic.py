"""Crash-safe file publication: write to a temporary name, fsync, rename, fsync the directory.

A reader can therefore never observe a half-written shard or manifest: a file either exists
under its final name with all its bytes, or not at all. Temporary names start with `.tmp-` and
are ignored (and cleaned up) by everything that lists a directory.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Publish `path` atomically; `write(tmp)` must create the file's full content at `tmp` (its result is ignored)."""
    tmp = tmp_path_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only or vanished directory: the write's own error is the one to report
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Publish `path` atomically with content `data`."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def remove_stale_tmp(directory: Path) -> int:
    """Delete temporary files left by a crashed writer; returns how many were removed."""
    removed = 0
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_file():
                p.unlink(missing_ok=True)
                removed += 1
    return removed
