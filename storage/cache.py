"""A bounded in-memory cache of decoded row groups, shared by the versions a reader serves.

On object storage every read is a ranged GET (milliseconds, and billed per request), so a server
keeps the row groups it decoded: a hit serves from memory without touching the bucket. Entries are
keyed by the shard's sha256 from the manifest (the content, not the object, so nothing stale can
ever be returned), the row group and the columns, and evicted least recently used once their Arrow
buffers pass `max_bytes`. Only bytes that passed every read check (page CRC32s, decode checks, the
stamp check of their shard) are cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import pyarrow as pa


class RowGroupCache:
    """Thread-safe LRU of `pa.Table`s bounded by their `nbytes` (0 bytes: caches nothing)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache size is {max_bytes} bytes; it must be 0 (off) or more")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, pa.Table] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> pa.Table | None:
        with self._lock:
            table = self._entries.get(key)
            if table is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return table

    def put(self, key: Hashable, table: pa.Table) -> None:
        size = table.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = table
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
