"""Decoding the batch route's Arrow answers: the rows, and which dataset version they came from.

Batches travel as Arrow IPC streams: float32 log-probs arrive bit-exact and decode without a
Python loop (about 5x faster than JSON end to end). A decoded table keeps only the contract's
served columns, in their order, and records in its schema metadata (the `META_*` keys) the
dataset, version and content hash the server said it served.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx
import pyarrow as pa

from lopd.http_contract import (
    ARROW_STREAM_MEDIA_TYPE,
    CONTENT_HASH_HEADER,
    DATASET_HEADER,
    SERVED_COLUMNS,
    VERSION_HEADER,
)

from .errors import ProtocolError

# Schema metadata keys under which `StoreClient.fetch` records where a table came from.
META_DATASET = b"lopd.dataset"
META_VERSION = b"lopd.version"
META_CONTENT_HASH = b"lopd.content_hash"


def read_batch(resp: httpx.Response, columns: Sequence[str] = SERVED_COLUMNS) -> pa.Table:
    """The `columns` (what the request asked for) of an Arrow IPC batch answer; `ProtocolError` if it is not one."""
    ctype = resp.headers.get("content-type", "")
    if ARROW_STREAM_MEDIA_TYPE not in ctype:
        raise ProtocolError(f"expected {ARROW_STREAM_MEDIA_TYPE}, got {ctype!r}", url=str(resp.url))
    try:
        with pa.ipc.open_stream(resp.content) as reader:
            table = reader.read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise ProtocolError(f"unreadable Arrow IPC stream: {e}", url=str(resp.url)) from e
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ProtocolError(f"the batch lacks columns {missing}", url=str(resp.url))
    return table.select(list(columns))


def served_metadata(resp: httpx.Response, name: str, version: int | None) -> dict[bytes, bytes]:
    """The `META_*` schema metadata of a batch answer, from its `X-Lopd-*` headers (the request's when absent)."""
    return {
        META_DATASET: resp.headers.get(DATASET_HEADER, name).encode(),
        META_VERSION: resp.headers.get(VERSION_HEADER, "" if version is None else str(version)).encode(),
        META_CONTENT_HASH: resp.headers.get(CONTENT_HASH_HEADER, "").encode(),
    }
