import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lopd.errors import InvalidInput
from lopd.storage.schema import PARQUET_WRITE_OPTIONS, SAMPLE_SCHEMA, build_table, token_lengths


def _one(teacher, rollout=None, response=(5, 6)):
    return build_table(["x"], [np.array([1, 2])], [np.array(response)], [teacher], [rollout])


def test_float32_roundtrip_is_bit_exact_including_edge_values():
    edge = np.array([-0.0, -1e-45, -1.17549435e-38, -3.4028235e38, -1e-7, -0.6931472, -88.72], dtype=np.float32)
    table = build_table(["e"], [np.array([1])], [np.arange(len(edge))], [edge], [edge[::-1].copy()])
    buf = io.BytesIO()
    pq.write_table(table, buf, **PARQUET_WRITE_OPTIONS)
    back = pq.read_table(io.BytesIO(buf.getvalue()))
    got = np.asarray(back["teacher_logprobs"][0].values, dtype=np.float32)
    assert got.tobytes() == edge.tobytes()
    assert back.schema.equals(SAMPLE_SCHEMA)


def test_log_probs_use_byte_stream_split_without_dictionary():
    table = _one(np.array([-0.5, -1.5], np.float32), np.array([-0.1, -0.2], np.float32))
    buf = io.BytesIO()
    pq.write_table(table, buf, **PARQUET_WRITE_OPTIONS)
    md = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata.row_group(0)
    encodings = {md.column(i).path_in_schema: md.column(i).encodings for i in range(md.num_columns)}
    for col in ("teacher_logprobs.list.element", "rollout_logprobs.list.element"):
        assert "BYTE_STREAM_SPLIT" in encodings[col]
        assert not any("DICTIONARY" in e for e in encodings[col])
    assert md.column(0).compression == "ZSTD"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(teacher=np.array([-0.5], np.float32)), "1 teacher log-probs for 2 response tokens"),
        (dict(teacher=np.array([-0.5, np.nan], np.float32)), "non-finite"),
        (dict(teacher=np.array([-0.5, -1], np.float32), rollout=np.array([-1.0], np.float32)), "rollout log-probs"),
        (dict(teacher=np.array([], np.float32), response=()), "empty"),
    ],
)
def test_build_table_rejects_broken_samples(kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        _one(**kwargs)


def test_token_lengths_count_prompt_and_response_tokens_across_chunks():
    a = build_table(["a", "b"], [np.array([1]), np.array([1, 2, 3])], [np.array([4, 5]), np.array([6])],
                    [np.array([-1, -1], np.float32), np.array([-1], np.float32)], [None, None])  # fmt: skip
    b = build_table(["c"], [np.array([7, 8])], [np.array([9, 9, 9, 9])], [np.full(4, -1, np.float32)], [None])
    table = pa.concat_tables([a, b.slice(0, 1)])
    assert table["prompt_ids"].num_chunks == 2
    prompt, response = token_lengths(table)
    assert prompt.dtype == response.dtype == np.int64
    assert prompt.tolist() == [1, 3, 2] and response.tolist() == [2, 1, 4]
    assert token_lengths(table.slice(1, 2))[1].tolist() == [1, 4]
