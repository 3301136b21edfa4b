"""Integrity of published files after they were first verified: what changed on disk, and re-hashing.

A published version is immutable, so any change to one of its files is damage (or an operator
restoring it). Three checks keep a reader from serving damaged bytes, cheapest first:

- every Parquet page carries a CRC32 (`schema.PARQUET_WRITE_OPTIONS`) that readers verify as they
  decode it (`page_checksum_verification`): bit rot inside the pages read is caught on the read;
- every read first `stat`s the file (about a microsecond): a changed size, mtime, ctime, inode or
  device since its last good sha256 re-hashes the whole file against the manifest before any byte
  is used (in-place writes, a replaced file);
- a scrub re-hashes every file at a bounded rate (`hash_file(bytes_per_s=...)`), for damage that
  changes neither the stat nor the pages read so far (or shards written before page checksums).

On object storage the stamp is what a HEAD request says (size and last-modified; an overwritten or
deleted object changes it), and hashing streams the object.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass

from lopd.errors import Corrupt

from .fs import ObjectPath, StoreDir, entries, open_binary, unreachable
from .manifest import FileEntry

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileStamp:
    """What `stat` says about a file; any difference means its bytes may have changed."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: StoreDir) -> FileStamp:
        if isinstance(path, ObjectPath):
            size, mtime_ns = path.size_and_mtime()
            return cls(0, 0, size, mtime_ns, mtime_ns)
        st = os.stat(path)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_file(path: StoreDir, *, bytes_per_s: float | None = None, stop: threading.Event | None = None) -> str | None:
    """sha256 (hex) of `path`, reading at most `bytes_per_s` (unbounded when None); None if `stop` was set."""
    h = hashlib.sha256()
    started = time.monotonic()
    done = 0
    with open_binary(path) as f:
        while block := f.read(_CHUNK):
            h.update(block)
            done += len(block)
            if bytes_per_s:
                ahead = done / bytes_per_s - (time.monotonic() - started)
                if stop is not None and stop.wait(ahead if ahead > 0 else 0):
                    return None
                if stop is None and ahead > 0:
                    time.sleep(ahead)
    return h.hexdigest()


def verify_file(
    path: StoreDir, entry: FileEntry, *, bytes_per_s: float | None = None, stop: threading.Event | None = None
) -> FileStamp | None:
    """Check `path`'s size and sha256 against `entry`; the stamp it had before hashing (None if stopped).

    Raises `Corrupt` naming the file. The stamp is taken first, so a change while hashing shows as a
    changed stamp on the next check.
    """
    try:
        stamp = FileStamp.of(path)
    except FileNotFoundError:
        raise Corrupt(f"{path.name} is listed in the manifest of {path.parent} but missing") from None
    except OSError as e:
        raise (unreachable(path, e) or e) from e
    if stamp.size != entry.bytes:
        raise Corrupt(f"{path}: {stamp.size} bytes, the manifest says {entry.bytes}: the shard is damaged")
    try:
        digest = hash_file(path, bytes_per_s=bytes_per_s, stop=stop)
    except OSError as e:
        raise (unreachable(path, e) or Corrupt(f"{path}: unreadable ({e})")) from e
    if digest is None:
        return None
    if digest != entry.sha256:
        raise Corrupt(f"{path}: sha256 {digest[:16]}… does not match the manifest ({entry.sha256[:16]}…)")
    return stamp


def directory_stamps(directory: StoreDir) -> tuple[tuple[str, FileStamp], ...]:
    """Stamps of every file in `directory`, by name: changes when any file is written, replaced or removed."""
    out = []
    try:
        for p in entries(directory):
            try:
                out.append((p.name, FileStamp.of(p)))
            except OSError:
                continue
    except OSError:
        pass
    return tuple(out)
