"""The top-k columns in the store: their schema, checks, encoding and hash; stores without them unchanged."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lopd.errors import InvalidInput
from lopd.storage.schema import (
    PARQUET_WRITE_OPTIONS,
    SAMPLE_SCHEMA,
    TOPK_IDS,
    TOPK_LOGPROBS,
    ContentHasher,
    build_table,
    sample_schema,
    write_options,
)


def _samples(seed: int = 7, n: int = 5) -> tuple[list, ...]:
    rng = np.random.default_rng(seed)
    ids = [f"s{i}" for i in range(n)]
    prompts = [rng.integers(0, 100, rng.integers(1, 9)) for _ in ids]
    responses = [rng.integers(0, 100, rng.integers(1, 9)) for _ in ids]
    teacher = [(-rng.gamma(1, 1, len(r))).astype(np.float32) for r in responses]
    rollout = [None if i % 2 else (-rng.gamma(1, 1, len(r))).astype(np.float32) for i, r in enumerate(responses)]
    return ids, prompts, responses, teacher, rollout


def _topk(responses: list, k: int, seed: int = 0) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, 150_000, (len(r), k)).astype(np.int32) for r in responses]
    lps = [-np.sort(rng.gamma(1, 2, (len(r), k)).astype(np.float32), axis=1) for r in responses]
    return ids, lps


def test_a_store_without_top_k_keeps_its_schema_encoding_and_content_hash() -> None:
    table = build_table(*_samples())
    assert table.schema.equals(SAMPLE_SCHEMA) and sample_schema(0) is SAMPLE_SCHEMA
    assert write_options(table.schema) is PARQUET_WRITE_OPTIONS
    h = ContentHasher()
    h.update(table)
    # Pinned from the code before top-k existed: published versions keep their hash (and ETags).
    assert h.hexdigest() == "sha256:b2a875b5e2f1dc20924a7f849c7c1fea3f02d6a7342ff61e93cea2c21dae0618"


def test_top_k_columns_round_trip_bit_exact_and_enter_the_hash() -> None:
    ids, prompts, responses, teacher, rollout = _samples()
    k_ids, k_lps = _topk(responses, 3)
    table = build_table(ids, prompts, responses, teacher, rollout, k_ids, k_lps)
    assert table.schema.equals(sample_schema(3))
    buf = io.BytesIO()
    pq.write_table(table, buf, **write_options(table.schema))
    back = pq.read_table(pa.BufferReader(buf.getvalue()))
    assert back.equals(table)
    md = pq.ParquetFile(pa.BufferReader(buf.getvalue())).metadata.row_group(0)
    encodings = {md.column(i).path_in_schema: md.column(i).encodings for i in range(md.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings[f"{TOPK_LOGPROBS}.list.element"]
    assert "BYTE_STREAM_SPLIT" in encodings[f"{TOPK_IDS}.list.element"]
    np.testing.assert_array_equal(np.asarray(back[TOPK_LOGPROBS][2].as_py(), np.float32), k_lps[2].ravel())

    plain, with_k = ContentHasher(), ContentHasher(sample_schema(3))
    plain.update(table)
    with_k.update(table)
    assert plain.hexdigest() != with_k.hexdigest()
    k_lps[0] = k_lps[0].copy()
    k_lps[0].view(np.uint32)[0, 0] ^= 1  # one bit of one top-k value
    other = ContentHasher(sample_schema(3))
    other.update(build_table(ids, prompts, responses, teacher, rollout, k_ids, k_lps))
    assert other.hexdigest() != with_k.hexdigest()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda i, v: (i, None), "both be given"),
        (lambda i, v: ([a[:, :2] for a in i], v), "shaped"),
        (lambda i, v: (i, [a[:, ::-1].copy() for a in v]), "descending"),
        (lambda i, v: (i, [np.full_like(a, np.nan) for a in v]), "finite"),
        (lambda i, v: (i, [a + 100 for a in v]), "<= 0"),
    ],
)
def test_bad_top_k_arrays_are_refused(edit, message) -> None:  # type: ignore[no-untyped-def]
    ids, prompts, responses, teacher, rollout = _samples()
    k_ids, k_lps = edit(*_topk([r for r in responses], 3))
    with pytest.raises(InvalidInput, match=message):
        build_table(ids, prompts, responses, teacher, rollout, k_ids, k_lps)
