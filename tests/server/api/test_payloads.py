"""Batch and sample payloads equal what is stored, in the order asked for (Arrow bit-exact, JSON via float32)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from lopd.storage.schema import SAMPLE_SCHEMA
from tests.server.api.conftest import Running

ARROW = "application/vnd.apache.arrow.stream"


def parquet_rows(root: Path, name: str) -> pa.Table:
    """The dataset read straight from its shards with pyarrow (independent of the server's reader)."""
    shards = sorted((root / name / "v1").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in shards]).replace_schema_metadata(None)


def read_stream(content: bytes) -> pa.Table:
    reader = pa.ipc.open_stream(content)
    batches = list(reader)
    assert len(batches) == 1, "the contract promises one record batch"
    return pa.Table.from_batches(batches, schema=reader.schema)


def bits(values: object) -> bytes:
    return np.asarray(values, dtype=np.float32).tobytes()


def check_json_sample(sample: dict, expected: dict[str, list], index: int) -> None:
    assert sample["index"] == index
    assert sample["sample_id"] == expected["ids"][index]
    assert sample["prompt_ids"] == expected["prompts"][index].tolist()
    assert sample["response_ids"] == expected["responses"][index].tolist()
    # JSON carries the float32 values' shortest decimals: parsing them back as float32 is bit-exact.
    assert bits(np.array(sample["teacher_logprobs"], dtype=np.float32)) == bits(expected["teacher"][index])
    rollout = expected["rollout"][index]
    if rollout is None:
        assert sample["rollout_logprobs"] is None
    else:
        assert bits(np.array(sample["rollout_logprobs"], dtype=np.float32)) == bits(rollout)


def test_arrow_batch_equals_parquet_in_requested_order(server: Running, client: httpx.Client, store) -> None:
    root, samples = store
    indices = [5, 119, 0, 5, 64, 31, 32, 5, 100]  # across shards, out of order, with repeats
    r = client.post("/v1/datasets/alpha/batch", json={"indices": indices})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == ARROW
    assert r.headers["x-lopd-dataset"] == "alpha" and r.headers["x-lopd-version"] == "1"
    manifest = client.get("/v1/datasets/alpha").json()
    assert r.headers["x-lopd-content-hash"] == manifest["content_hash"]

    table = read_stream(r.content)
    assert table.schema.equals(SAMPLE_SCHEMA)
    assert table.equals(parquet_rows(root, "alpha").take(indices))
    for row, i in enumerate(indices):  # and against the generator's own arrays, bit for bit
        assert bits(table["teacher_logprobs"][row].values) == bits(samples["alpha"]["teacher"][i])
        rollout = samples["alpha"]["rollout"][i]
        got = table["rollout_logprobs"][row]
        assert (not got.is_valid) if rollout is None else bits(got.values) == bits(rollout)


def test_json_batch_equals_parquet(client: httpx.Client, store) -> None:
    _, samples = store
    indices = [3, 3, 99, 0, 47, 48]
    r = client.post("/v1/datasets/alpha/batch", json={"indices": indices}, headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert (body["dataset"], body["version"]) == ("alpha", 1)
    assert [s["index"] for s in body["samples"]] == indices
    for sample, i in zip(body["samples"], indices):
        check_json_sample(sample, samples["alpha"], i)


def test_empty_batch_is_one_empty_record_batch(client: httpx.Client) -> None:
    r = client.post("/v1/datasets/beta/batch", json={"indices": []})
    assert r.status_code == 200
    assert read_stream(r.content).num_rows == 0


def test_explicit_version_and_arrow_accept(client: httpx.Client, store) -> None:
    root, _ = store
    r = client.post("/v1/datasets/beta/batch", json={"indices": [1, 0], "version": 1}, headers={"Accept": ARROW})
    assert r.headers["content-type"] == ARROW
    assert read_stream(r.content).equals(parquet_rows(root, "beta").take([1, 0]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(indices=st.lists(st.integers(0, 119), max_size=40), as_json=st.booleans())
def test_any_indices_any_order(client: httpx.Client, store, indices: list[int], as_json: bool) -> None:
    root, samples = store
    headers = {"Accept": "application/json"} if as_json else {}
    r = client.post("/v1/datasets/alpha/batch", json={"indices": indices}, headers=headers)
    assert r.status_code == 200, r.text
    if as_json:
        got = r.json()["samples"]
        assert len(got) == len(indices)
        for sample, i in zip(got, indices):
            check_json_sample(sample, samples["alpha"], i)
    else:
        assert read_stream(r.content).equals(parquet_rows(root, "alpha").take(pa.array(indices, pa.int64())))


def test_single_sample_and_etag(client: httpx.Client, store) -> None:
    _, samples = store
    r = client.get("/v1/datasets/alpha/samples/77")
    assert r.status_code == 200
    check_json_sample(r.json(), samples["alpha"], 77)
    etag = r.headers["etag"]
    manifest = client.get("/v1/datasets/alpha")
    m = manifest.json()
    assert (
        etag == manifest.headers["etag"] == f'"{m["content_hash"].removeprefix("sha256:")}.{m["name"]}.v{m["version"]}"'
    )
    for path in ("/v1/datasets/alpha/samples/77", "/v1/datasets/alpha", "/v1/datasets/alpha/consistency"):
        again = client.get(path, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.headers["etag"] == etag and again.content == b""
        assert client.get(path, headers={"If-None-Match": '"sha256:other"'}).status_code == 200


@pytest.mark.parametrize("index", [120, 10**30])
def test_index_out_of_range_is_named(client: httpx.Client, index: int) -> None:
    for r in (
        client.get(f"/v1/datasets/alpha/samples/{index}"),
        client.post("/v1/datasets/alpha/batch", json={"indices": [0, index, 1]}),
        client.post("/v1/datasets/alpha/batch", json={"indices": [-index]}),
    ):
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["type"] == "invalid_input" and str(index) in err["message"], err


def test_metrics_count_served_samples(server: Running, client: httpx.Client) -> None:
    def served() -> tuple[float, float]:
        text = client.get("/metrics").text
        values = {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.labels.get("dataset") == "beta" and s.labels.get("lab") == "anonymous"
        }
        return values.get("lopd_samples_served_total", 0.0), values.get("lopd_bytes_served_total", 0.0)

    samples_before, bytes_before = served()
    r = client.post("/v1/datasets/beta/batch", json={"indices": [0, 1, 2, 2, 39]})
    assert r.status_code == 200
    samples_after, bytes_after = served()
    assert samples_after - samples_before == 5
    assert bytes_after - bytes_before == len(r.content)
    text = client.get("/metrics").text
    assert (
        'lopd_http_requests_total{lab="anonymous",method="POST",route="/v1/datasets/{name}/batch",status="200"}' in text
    )
    assert "lopd_http_request_duration_seconds_bucket" in text
