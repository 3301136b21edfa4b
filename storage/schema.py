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

# The teacher's top K next tokens at every response position, in stores built with `--top-k K`
# (the manifest's `provenance.top_k`; stores without them have exactly `SAMPLE_SCHEMA`). Each row
# holds `len(response_ids) * K` values, row-major [position, rank]: rank 0 is the most likely token,
# ties broken by the lower id. Flat lists rather than list<fixed_size_list<K>>: the same bytes on
# disk (bench/bench_topk_storage.py) and every Parquet reader decodes them.
TOPK_IDS = "teacher_topk_ids"
TOPK_LOGPROBS = "teacher_topk_logprobs"
TOPK_COLUMNS = (TOPK_IDS, TOPK_LOGPROBS)
TOPK_FIELDS = (
    pa.field(TOPK_IDS, _list_of(pa.int32()), nullable=False),
    pa.field(TOPK_LOGPROBS, _list_of(pa.float32()), nullable=False),
)
MAX_TOP_K = 1024


def sample_schema(top_k: int = 0) -> pa.Schema:
    """The schema of a store's shards: `SAMPLE_SCHEMA`, plus the `TOPK_COLUMNS` when `top_k` > 0."""
    return SAMPLE_SCHEMA if not top_k else pa.schema([*SAMPLE_SCHEMA, *TOPK_FIELDS])


def sample_columns(top_k: int = 0) -> tuple[str, ...]:
    return tuple(sample_schema(top_k).names)


def column_type(name: str) -> pa.DataType:
    """The stored Arrow type of column `name` (any column of any store)."""
    return sample_schema(1).field(name).type


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


def write_options(schema: pa.Schema) -> dict[str, Any]:
    """The Parquet writer options for shards of `schema` (`PARQUET_WRITE_OPTIONS`, read at call time).

    Top-k columns: BYTE_STREAM_SPLIT on both. The ids are < 2**18 in any real vocabulary, so their
    high bytes are near constant and the split saves ~20% (BYTE_STREAM_SPLIT on INT32 needs a
    Parquet reader of 2023 or later; these columns are new, so no older reader meets them).
    """
    if TOPK_IDS not in schema.names:
        return PARQUET_WRITE_OPTIONS
    encoding = {f"{c}.list.{_ELEMENT}": "BYTE_STREAM_SPLIT" for c in TOPK_COLUMNS}
    return {**PARQUET_WRITE_OPTIONS, "column_encoding": {**PARQUET_WRITE_OPTIONS["column_encoding"], **encoding}}


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
    topk_ids: Sequence[np.ndarray] | None = None,
    topk_logprobs: Sequence[np.ndarray] | None = None,
) -> pa.Table:
    """Assemble samples into a table of `sample_schema(K)`, checking the invariants readers rely on.

    `topk_ids` / `topk_logprobs`: one [len(response), K] array per sample (int ids, float32 log-probs
    in descending order), or both None for a store without top-k.
    """
    n = len(sample_ids)
    top_k = _check_topk(sample_ids, response_ids, topk_ids, topk_logprobs)
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
    columns = {
        "sample_id": pa.array(sample_ids, pa.string()),
        "prompt_ids": _list_array(prompt_ids, np.int32),
        "response_ids": _list_array(response_ids, np.int32),
        "teacher_logprobs": _list_array(teacher_logprobs, np.float32),
        "rollout_logprobs": _list_array(rollout_logprobs, np.float32),
    }
    if top_k:
        assert topk_ids is not None and topk_logprobs is not None
        columns[TOPK_IDS] = _list_array([np.ravel(a) for a in topk_ids], np.int32)
        columns[TOPK_LOGPROBS] = _list_array([np.ravel(a) for a in topk_logprobs], np.float32)
    return pa.table(columns, schema=sample_schema(top_k))


def _check_topk(
    sample_ids: Sequence[str],
    response_ids: Sequence[Any],
    topk_ids: Sequence[np.ndarray] | None,
    topk_logprobs: Sequence[np.ndarray] | None,
) -> int:
    """K of the samples' top-k arrays (0 when there are none), after checking their shapes and order."""
    if topk_ids is None and topk_logprobs is None:
        return 0
    if topk_ids is None or topk_logprobs is None or not (len(topk_ids) == len(topk_logprobs) == len(sample_ids)):
        raise InvalidInput("top-k ids and log-probs must both be given, one array each per sample")
    top_k = int(np.shape(topk_ids[0])[1]) if len(topk_ids) and np.ndim(topk_ids[0]) == 2 else 0
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidInput(f"top-k arrays must be [response length, K] with 1 <= K <= {MAX_TOP_K}")
    for i, (ids, lps) in enumerate(zip(topk_ids, topk_logprobs)):
        shape = (len(response_ids[i]), top_k)
        if np.shape(ids) != shape or np.shape(lps) != shape:
            raise InvalidInput(
                f"sample {sample_ids[i]!r}: top-k arrays shaped {np.shape(ids)} and {np.shape(lps)}, expected {shape}"
            )
        lps = np.asarray(lps)
        if not np.all(np.isfinite(lps)) or np.any(lps > 0):
            raise InvalidInput(f"sample {sample_ids[i]!r}: top-k log-probs must be finite and <= 0")
        if np.any(np.diff(lps, axis=1) > 0):
            raise InvalidInput(f"sample {sample_ids[i]!r}: top-k log-probs are not in descending order")
    return top_k


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

    Each column of the store's schema (`sample_schema(K)`; a store without top-k hashes exactly as it
    did before top-k existed) is hashed as three streams: row validity (1 byte per row), row
    lengths (int64; bytes for `sample_id`, values for the list columns) and the values (little-endian,
    float32 bit-exact). Streams concatenate across tables, so the hash does not depend on how the
    samples are split into parts or row groups, on the Parquet encoding, or on footer metadata
    (`FOOTER_KEYS`: run key, teacher fingerprint, part index, scoring settings). Equal samples (every
    value bit-equal, same order) give an equal hash, whichever run or import produced them.
    """

    def __init__(self, schema: pa.Schema = SAMPLE_SCHEMA) -> None:
        self.schema = schema
        self._streams = {c: (hashlib.sha256(), hashlib.sha256(), hashlib.sha256()) for c in schema.names}
        self.rows = 0

    def update(self, table: pa.Table) -> None:
        """Add the rows of `table` (which holds the columns of `schema`, in its types or castable to them)."""
        for field in self.schema:
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
