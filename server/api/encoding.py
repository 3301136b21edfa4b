"""Turning a table of samples into response bytes: Arrow IPC stream (default) or JSON.

Arrow is the fast path a trainer uses (~5x faster than JSON end to end, float32 bit-exact).
JSON is for people and tools without Arrow; orjson prints numpy float32 in the shortest form
that reads back to the same float32, which is what the contract promises.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson
import pyarrow as pa

from lopd.storage.schema import SAMPLE_SCHEMA

ARROW_STREAM = "application/vnd.apache.arrow.stream"
JSON = "application/json"
_LIST_COLUMNS = ("prompt_ids", "response_ids", "teacher_logprobs", "rollout_logprobs")


def wants_json(accept: str | None) -> bool:
    """JSON only when asked for by name; Arrow for no Accept, `*/*` or Arrow itself."""
    if not accept:
        return False
    types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    return JSON in types and ARROW_STREAM not in types


def arrow_stream(table: pa.Table) -> bytes:
    """The table as an Arrow IPC stream of exactly one record batch, with the store schema."""
    table = table.select(list(SAMPLE_SCHEMA.names)).cast(SAMPLE_SCHEMA).combine_chunks()
    batches = table.to_batches()
    batch = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=SAMPLE_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SAMPLE_SCHEMA) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _rows(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """A list column as one numpy view per row (None for a null row), without a Python loop over values."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(arr) == 0:
        return []
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(arr))]


def sample_dicts(table: pa.Table, indices: Sequence[int] | np.ndarray) -> list[dict[str, object]]:
    """The rows of `table` as `Sample` dicts, `indices` being the dataset index of each row."""
    lists = {c: _rows(table[c]) for c in _LIST_COLUMNS}
    ids = table["sample_id"].to_pylist()
    return [
        {
            "index": int(index),
            "sample_id": ids[i],
            **{c: lists[c][i] for c in _LIST_COLUMNS},
        }
        for i, index in enumerate(indices)
    ]


def dumps(obj: object) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
