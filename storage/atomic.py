"""Crash-safe file publication: write to a temporary name, fsync, rename, fsync the directory.

A reader can therefore never observe a half-written shard or manifest: a file either exists
under its final name with all its bytes, or not at all. Temporary names start with `.tmp-` and
are ignored (and cleaned up) by everything that lists a directory.

On object storage a PUT is the atomic step: the content is built in a local scratch file and
uploaded as one object, which appears whole or not at all (an interrupted upload leaves nothing
under the final key), so no temporary key and no rename are needed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

from .fs import ObjectPath, StoreDir, local_scratch, upload_local

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


def atomic_write(path: StoreDir, write: Callable[[Path], object]) -> None:
    """Publish `path` atomically; `write(tmp)` must create the file's full content at `tmp` (its result is ignored).

    `tmp` is always a local file: next to `path`, or for an object a scratch file uploaded afterwards.
    """
    if isinstance(path, ObjectPath):
        scratch = local_scratch(path.name)
        try:
            write(scratch)
            upload_local(scratch, path)
        finally:
            scratch.unlink(missing_ok=True)
        return
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


def atomic_write_bytes(path: StoreDir, data: bytes) -> None:
    """Publish `path` atomically with content `data`."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)  # one PUT
        return
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def remove_stale_tmp(directory: StoreDir) -> int:
    """Delete temporary files left by a crashed writer; returns how many were removed (none on object storage)."""
    removed = 0
    if isinstance(directory, Path) and directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_file():
                p.unlink(missing_ok=True)
                removed += 1
    return removed
