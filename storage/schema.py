"""The one definition of what a stored sample is, and how its columns are encoded on disk.

Reader, writer, stats and (later) the HTTP API all take the columns from here, so there is a
single source of truth for the store schema. `docs/store-format.md` describes the same thing
for humans; change both together and bump `FORMAT_VERSION` on any incompatible change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from lopd.arrow import list_lengths
from lopd.errors import InvalidInput

FORMAT_VERSION = 1

# Parquet's compliant nested naming (`<col>.list.element`) so every Parquet reader agrees on paths.
_ELEMENT = "element"


def _list_of(value_type: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field(_ELEMENT, value_type, nullable=False))


SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_ids", _list_of(pa.int32()), nullable=False),
        pa.field("response_ids", _list_of(pa.int32()), nullable=False),
        pa.field("teacher_logprobs", _list_of(pa.float32()), nullable=False),
        # Null when the rollouts came without the sampling policy's log-probs and none were computed.
        pa.field("rollout_logprobs", _list_of(pa.float32()), nullable=True),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SAMPLE_SCHEMA.names)
FLOAT_COLUMNS = ("teacher_logprobs", "rollout_logprobs")
# The columns a sample's tokens are counted in (see `token_lengths`).
TOKEN_COLUMNS = ("prompt_ids", "response_ids")

# Samples per row group: the unit of random access. Small enough that fetching one sample reads
# ~64 sequences, not DuckDB's default 122,880 rows.
ROW_GROUP_SAMPLES = 64

# Log-probs: no dictionary (it makes float32 bigger than raw) and BYTE_STREAM_SPLIT, which puts the
# sign/exponent bytes together so zstd can squeeze them; lossless. Token ids stay PLAIN + zstd:
# BYTE_STREAM_SPLIT on INT32 saves 6-9% more (bench/bench_precompute.py) but older Parquet readers
# cannot decode it.
PARQUET_WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": ["sample_id"],
    "column_encoding": {f"{c}.list.{_ELEMENT}": "BYTE_STREAM_SPLIT" for c in FLOAT_COLUMNS},
    "write_statistics": ["sample_id"],
    "row_group_size": ROW_GROUP_SAMPLES,
    "write_page_checksum": True,  # a CRC32 per page, verified by readers on every decode (storage/integrity.py)
}

# Key-value metadata written into every shard's Parquet footer, so a shard found on its own still
# says which run and teacher produced it (finalize checks these before publishing).
META_FORMAT = b"lopd.format_version"
META_RUN_KEY = b"lopd.run_key"
META_TEACHER = b"lopd.teacher_fingerprint"
META_PART = b"lopd.part_index"
# JSON of the settings a part was scored with that may change on resume without changing the run key
# (batch budgets): parts scored with other budgets may differ within float rounding. Absent on imports.
META_SCORED_WITH = b"lopd.scored_with"
# The footer metadata above is what the content hash leaves out (see `ContentHasher`).
FOOTER_KEYS = (META_FORMAT, META_RUN_KEY, META_TEACHER, META_PART, META_SCORED_WITH)


def build_table(
    sample_ids: Sequence[str],
    prompt_ids: Sequence[np.ndarray | Sequence[int]],
    response_ids: Sequence[np.ndarray | Sequence[int]],
    teacher_logprobs: Sequence[np.ndarray],
    rollout_logprobs: Sequence[np.ndarray | None],
) -> pa.Table:
    """Assemble samples into a table of `SAMPLE_SCHEMA`, checking the invariants readers rely on."""
    n = len(sample_ids)
    if not (len(prompt_ids) == len(response_ids) == len(teacher_logprobs) == len(rollout_logprobs) == n):
        raise InvalidInput("columns have different numbers of samples")
    for i in range(n):
        r = len(response_ids[i])
        if r == 0 or len(prompt_ids[i]) == 0:
            raise InvalidInput(f"sample {sample_ids[i]!r}: empty prompt or response")
        if len(teacher_logprobs[i]) != r:
            raise InvalidInput(
                f"sample {sample_ids[i]!r}: {len(teacher_logprobs[i])} teacher log-probs for {r} response tokens"
            )
        rl = rollout_logprobs[i]
        if rl is not None and len(rl) != r:
            raise InvalidInput(f"sample {sample_ids[i]!r}: {len(rl)} rollout log-probs for {r} response tokens")
        if not np.all(np.isfinite(teacher_logprobs[i])):
            raise InvalidInput(f"sample {sample_ids[i]!r}: non-finite teacher log-prob")
    return pa.table(
        {
            "sample_id": pa.array(sample_ids, pa.string()),
            "prompt_ids": _list_array(prompt_ids, np.int32),
            "response_ids": _list_array(response_ids, np.int32),
            "teacher_logprobs": _list_array(teacher_logprobs, np.float32),
            "rollout_logprobs": _list_array(rollout_logprobs, np.float32),
        },
        schema=SAMPLE_SCHEMA,
    )


def token_lengths(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and response tokens of every row of `table` (which holds the `TOKEN_COLUMNS`), int64.

    The one rule for counting tokens: the manifest's token counts and the per-sample counts a
    server's batch token limit uses both come from here.
    """
    prompt, response = TOKEN_COLUMNS
    return list_lengths(table[prompt]), list_lengths(table[response])


def _list_array(rows: Sequence[Any], dtype: type) -> pa.ListArray:
    """Build a list array from numpy rows without a Python loop over elements (None rows stay null)."""
    lengths = np.fromiter((0 if r is None else len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present: list[np.ndarray] = [np.asarray(r, dtype=dtype) for r in rows if r is not None]
    values = np.concatenate(present) if present else np.zeros(0, dtype=dtype)
    mask = np.fromiter((r is None for r in rows), dtype=bool, count=len(rows))
    value_type = pa.from_numpy_dtype(np.dtype(dtype))
    arr = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(values, value_type), mask=pa.array(mask) if mask.any() else None
    )
    return arr.cast(_list_of(value_type))


_CONTENT_TAG = b"lopd-content-v1\0"


class ContentHasher:
    """The content hash of a dataset: a function of its samples only, fed table by table in dataset order.

    Each column of `SAMPLE_SCHEMA` is hashed as three streams: row validity (1 byte per row), row
    lengths (int64; bytes for `sample_id`, values for the list columns) and the values (little-endian,
    float32 bit-exact). Streams concatenate across tables, so the hash does not depend on how the
    samples are split into parts or row groups, on the Parquet encoding, or on footer metadata
    (`FOOTER_KEYS`: run key, teacher fingerprint, part index, scoring settings). Equal samples (every
    value bit-equal, same order) give an equal hash, whichever run or import produced them.
    """

    def __init__(self) -> None:
        self._streams = {c: (hashlib.sha256(), hashlib.sha256(), hashlib.sha256()) for c in COLUMNS}
        self.rows = 0

    def update(self, table: pa.Table) -> None:
        """Add the rows of `table` (which holds the `COLUMNS`, in `SAMPLE_SCHEMA` types or castable to them)."""
        for field in SAMPLE_SCHEMA:
            arr = table.column(field.name).combine_chunks()
            if pa.types.is_dictionary(arr.type):
                arr = arr.dictionary_decode()
            arr = arr.cast(field.type)
            valid, lengths, values = self._streams[field.name]
            valid.update(np.asarray(arr.is_valid(), dtype=np.uint8).tobytes())
            if pa.types.is_string(field.type):
                binary = arr.cast(pa.large_binary())
                start = binary.offset
                offsets = np.frombuffer(binary.buffers()[1], dtype="<i8")[start : start + len(binary) + 1]
                lengths.update(np.diff(offsets).astype("<i8").tobytes())
                data = binary.buffers()[2]
                if data is not None and len(offsets):
                    values.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])])
            else:
                lengths.update(list_lengths(arr).astype("<i8").tobytes())
                dtype = np.dtype(field.type.value_type.to_pandas_dtype()).newbyteorder("<")
                values.update(np.ascontiguousarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=dtype).tobytes())
        self.rows += table.num_rows

    def hexdigest(self) -> str:
        h = hashlib.sha256(_CONTENT_TAG)
        h.update(f"{self.rows}\0".encode())
        for name, streams in self._streams.items():
            h.update(name.encode() + b"\0")
            for stream in streams:
                h.update(stream.digest())
        return "sha256:" + h.hexdigest()
