"""StoreClient: the routes against a served store, and the retry policy against scripted failures."""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import numpy as np
import pyarrow as pa
import pytest

from lopd.client.errors import (
    RemoteInvalidInput,
    RemoteNotFound,
    RemoteUnauthorized,
    RetryBudgetExhausted,
    ServerError,
)
from lopd.client.http import StoreClient
from lopd.client.payloads import META_CONTENT_HASH, META_DATASET, META_VERSION
from lopd.errors import InvalidInput, NotFound, Unauthorized
from lopd.storage.reader import Store


def _rows(table: pa.Table) -> list[dict]:
    return table.select(["sample_id", "prompt_ids", "response_ids", "teacher_logprobs", "rollout_logprobs"]).to_pylist()


def test_catalogue_and_manifest(store_client, served):
    names = {d.name for d in store_client.datasets()}
    assert {"alpha", "beta", "scored"} <= names
    store = Store(served.store.root)
    m = store.manifest("alpha")
    info = store_client.manifest("alpha")
    assert (info.name, info.version, info.content_hash, info.num_samples) == ("alpha", m.version, m.content_hash, 100)
    assert info.verdict == "consistent" and info.sft_teacher_fingerprint == m.provenance.sft_teacher_fingerprint
    assert store_client.manifest("alpha", version=m.version).content_hash == m.content_hash
    summary = next(d for d in store_client.datasets() if d.name == "alpha")
    assert summary.content_hash == m.content_hash and summary.versions == (m.version,)


def test_fetch_returns_the_requested_rows_in_order_bit_exact(store_client, served):
    indices = [5, 3, 99, 5, 0, 64]
    expected = Store(served.store.root).open("alpha").take(indices)
    table = store_client.fetch("alpha", indices)
    assert _rows(table) == _rows(expected)
    assert table.schema.metadata[META_CONTENT_HASH] == store_client.manifest("alpha").content_hash.encode()
    assert table.schema.metadata[META_VERSION] == b"1" and table.schema.metadata[META_DATASET] == b"alpha"
    assert table.column_names == ["sample_id", "prompt_ids", "response_ids", "teacher_logprobs", "rollout_logprobs"]
    # Requests above the per-request limit are split and put back together in order.
    with served.client(max_indices_per_request=4) as small:
        assert _rows(small.fetch("alpha", np.array(indices))) == _rows(expected)


def test_json_routes_carry_the_same_float32_values(store_client):
    table = store_client.fetch("alpha", [7, 8, 9])
    samples = store_client.fetch_json("alpha", [7, 8, 9])
    for row, s in zip(table.to_pylist(), samples):
        assert s.sample_id == row["sample_id"]
        assert s.teacher_logprobs.dtype == np.float32
        assert np.array_equal(s.teacher_logprobs, np.asarray(row["teacher_logprobs"], dtype=np.float32))
        assert (s.rollout_logprobs is None) == (row["rollout_logprobs"] is None)
    one = store_client.sample("alpha", 8)
    assert one.index == 8 and one.sample_id == samples[1].sample_id
    assert np.array_equal(one.prompt_ids, samples[1].prompt_ids)


def test_stats_routes(store_client):
    cov = store_client.coverage("beta")
    assert cov["scored"] == 37 and cov["dataset"] == "beta"
    con = store_client.consistency("beta")
    assert con["verdict"] == "consistent"


def test_unknown_dataset_and_bad_index_are_not_retried(store_client):
    with pytest.raises(RemoteNotFound) as e:
        store_client.manifest("no-such-dataset")
    assert isinstance(e.value, NotFound) and e.value.status == 404 and "no-such-dataset" in str(e.value)
    with pytest.raises(RemoteInvalidInput) as e2:
        store_client.fetch("alpha", [100])
    assert isinstance(e2.value, InvalidInput) and e2.value.status == 422 and "100" in e2.value.message


def test_dataset_names_are_one_path_segment(store_client):
    with pytest.raises((RemoteNotFound, RemoteInvalidInput)):
        store_client.manifest("../alpha")


def test_pickled_client_reconnects(served):
    c = StoreClient(served.url, token="t", retries=1)
    names = [d.name for d in c.datasets()]  # an open connection pool, which cannot be pickled
    clone = pickle.loads(pickle.dumps(c))
    assert (clone.url, clone.token, clone.retries) == (c.url, "t", 1)
    assert [d.name for d in clone.datasets()] == names


# -- retries against scripted failures ---------------------------------------------------------


class Scripted(httpx.BaseTransport):
    """Plays `script` (exceptions to raise or responses to return) first, then forwards to the real server."""

    def __init__(self, script):
        self.real = httpx.HTTPTransport()
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            return step
        return self.real.handle_request(request)


def _client(served, script, **kw):
    handler = Scripted(script)
    sleeps: list[float] = []
    kw.setdefault("retries", 3)
    client = StoreClient(served.url, transport=handler, sleep=sleeps.append, **kw)
    return client, handler, sleeps


def _err(status, message, **headers):
    return httpx.Response(status, json={"error": {"type": "internal", "message": message}}, headers=headers)


def test_connection_errors_are_retried_with_growing_jittered_backoff(served):
    failures = [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("cut")]
    client, handler, sleeps = _client(served, failures, backoff_s=1.0, max_backoff_s=100)
    table = client.fetch("alpha", [1, 2])
    assert table.num_rows == 2 and len(handler.requests) == 4
    for k, s in enumerate(sleeps):  # equal jitter: between half and all of 1, 2, 4 seconds
        assert 2**k / 2 <= s <= 2**k
    capped, _, capped_sleeps = _client(served, failures, backoff_s=1.0, max_backoff_s=1.5)
    capped.manifest("alpha")
    assert max(capped_sleeps) <= 1.5


def test_retry_after_is_honoured_in_seconds_and_as_a_date(served):
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    script = [
        _err(503, "warming up", **{"Retry-After": "7"}),
        _err(429, "slow down", **{"Retry-After": format_datetime(when, usegmt=True)}),
    ]
    client, handler, sleeps = _client(served, script)
    assert client.manifest("alpha").name == "alpha"
    assert sleeps[0] == 7.0 and 25 <= sleeps[1] <= 30
    long, _, long_sleeps = _client(served, [_err(503, "later", **{"Retry-After": "9999"})], max_retry_after_s=60)
    long.manifest("alpha")
    assert long_sleeps == [60]


def test_exhausted_budget_raises_with_the_last_failure(served):
    client, handler, sleeps = _client(served, [_err(500, f"boom {i}") for i in range(10)], retries=2)
    with pytest.raises(RetryBudgetExhausted) as e:
        client.fetch("alpha", [0])
    err = e.value
    assert isinstance(err, ServerError)
    assert (err.status, err.message, err.attempts, err.error_type) == (500, "boom 2", 3, "internal")
    assert len(handler.requests) == 3 and len(sleeps) == 2
    down, _, _ = _client(served, [httpx.ConnectError("refused")] * 5, retries=1)
    with pytest.raises(RetryBudgetExhausted) as e2:
        down.datasets()
    assert e2.value.status is None and "ConnectError" in e2.value.message


def test_408_429_and_5xx_are_retried_other_4xx_are_not(served):
    script = [_err(408, "timeout"), _err(429, "busy"), _err(502, "gateway"), _err(503, "down")]
    client, handler, sleeps = _client(served, script, retries=4, backoff_s=0.001)
    assert client.manifest("alpha").name == "alpha"
    assert len(handler.requests) == 5 and len(sleeps) == 4
    for status in (400, 403, 409, 413, 422):
        refused, handler2, sleeps2 = _client(served, [_err(status, "no")], backoff_s=0.001)
        with pytest.raises(ServerError) as e:
            refused.manifest("alpha")
        assert e.value.status == status and not isinstance(e.value, RetryBudgetExhausted)
        assert len(handler2.requests) == 1 and sleeps2 == []


def test_client_errors_raise_at_once_with_the_servers_message(served):
    client, handler, sleeps = _client(served, [])
    with pytest.raises(RemoteNotFound, match="no dataset 'nope'"):
        client.manifest("nope")
    assert len(handler.requests) == 1 and sleeps == []
    denied, handler2, _ = _client(
        served, [httpx.Response(401, json={"error": {"type": "unauthorized", "message": "bad token"}})]
    )
    with pytest.raises(RemoteUnauthorized, match="bad token") as e:
        denied.datasets()
    assert isinstance(e.value, Unauthorized) and e.value.status == 401 and e.value.error_type == "unauthorized"
    assert len(handler2.requests) == 1


def test_token_is_sent_as_bearer(served):
    client, handler, _ = _client(served, [], token="s3cret")
    client.datasets()
    assert handler.requests[0].headers["authorization"] == "Bearer s3cret"


def test_content_hash_change_under_a_pinned_version_is_refused(served, store_client):
    from lopd.client.errors import ProtocolError

    with pytest.raises(ProtocolError, match="content hash"):
        store_client.fetch("alpha", [0], 1, expected_content_hash="sha256:" + "0" * 64)


def test_cancel_stops_a_retrying_request(served):
    import threading
    import time

    from lopd.errors import Cancelled

    client, handler, _ = _client(served, [httpx.ConnectError("refused")] * 10, retries=5, backoff_s=20)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    start = time.monotonic()
    with pytest.raises(Cancelled):
        client.fetch("alpha", [0], cancel=stop)
    assert time.monotonic() - start < 5 and len(handler.requests) == 1
    with pytest.raises(Cancelled):  # an already-set event sends nothing
        client.fetch("alpha", [0], cancel=stop)
    assert len(handler.requests) == 1
