"""The batch route's `columns` selection: top-k only when asked for, from datasets that have it; the
client fetches and collates it to [B, T, K] aligned with `teacher_logprobs`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lopd.client.collate import collate_arrays
from lopd.client.http import StoreClient
from lopd.client.loader import OPDLoader
from lopd.http_contract import ALL_COLUMNS, SERVED_COLUMNS, TOPK_COLUMNS, Column, served_columns
from lopd.server.api.settings import ServerSettings
from lopd.storage.reader import Store
from tests.server.api.conftest import Running, running_server, wait_ready
from tests.utils.factories import add_topk, provenance, publish_samples, random_samples

K = 3
TOPK = (*SERVED_COLUMNS, *TOPK_COLUMNS)


@pytest.fixture(scope="module")
def topk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, dict[str, list]]]:
    root = tmp_path_factory.mktemp("topk-store")
    samples = add_topk(random_samples(20, seed=9), K, seed=9)
    publish_samples(root, "topk", samples, prov=provenance().model_copy(update={"top_k": K}), per_part=8)
    publish_samples(root, "plain", random_samples(5, seed=1), per_part=8)
    with running_server(ServerSettings(store=root)) as server:
        with server.client() as c:
            assert wait_ready(c).status_code == 200
        yield server, samples


def _arrow(resp) -> pa.Table:  # type: ignore[no-untyped-def]
    with pa.ipc.open_stream(resp.content) as reader:
        return reader.read_all()


def test_the_column_literal_is_the_contracts_columns() -> None:
    from typing import get_args

    assert get_args(Column) == ALL_COLUMNS
    assert served_columns(None) == SERVED_COLUMNS
    assert served_columns(["teacher_topk_ids", "response_ids"]) == ("sample_id", "response_ids", "teacher_topk_ids")


def test_top_k_is_served_only_when_asked_for(topk_server) -> None:  # type: ignore[no-untyped-def]
    server, samples = topk_server
    with server.client() as c:
        plain = c.post("/v1/datasets/topk/batch", json={"indices": [3, 0]})
        full = c.post("/v1/datasets/topk/batch", json={"indices": [3, 0], "columns": list(TOPK)})
        only = c.post("/v1/datasets/topk/batch", json={"indices": [3], "columns": ["teacher_topk_logprobs"]})
        as_json = c.post(
            "/v1/datasets/topk/batch",
            json={"indices": [3], "columns": ["teacher_topk_ids", "response_ids"]},
            headers={"Accept": "application/json"},
        )
    assert plain.status_code == full.status_code == only.status_code == as_json.status_code == 200
    assert _arrow(plain).column_names == list(SERVED_COLUMNS)
    assert len(plain.content) < len(full.content) / 2  # a Lightning OPD batch does not carry the top-k bytes
    table = _arrow(full)
    assert table.column_names == list(TOPK)
    assert table.schema.field("teacher_topk_ids").type == pa.list_(pa.field("element", pa.int32(), nullable=False))
    np.testing.assert_array_equal(np.asarray(table["teacher_topk_ids"][0].as_py()), samples["topk_ids"][3].ravel())
    got = np.asarray(table["teacher_topk_logprobs"][1].as_py(), dtype=np.float32)
    np.testing.assert_array_equal(got, samples["topk_logprobs"][0].ravel())  # bit-exact
    assert _arrow(only).column_names == ["sample_id", "teacher_topk_logprobs"]
    sample = as_json.json()["samples"][0]
    assert list(sample) == ["index", "sample_id", "response_ids", "teacher_topk_ids"]
    assert sample["teacher_topk_ids"] == samples["topk_ids"][3].ravel().tolist()


def test_top_k_of_a_dataset_without_it_and_unknown_columns_are_refused(topk_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = topk_server
    with server.client() as c:
        none = c.post("/v1/datasets/plain/batch", json={"indices": [0], "columns": ["teacher_topk_ids"]})
        bad = c.post("/v1/datasets/topk/batch", json={"indices": [0], "columns": ["logits"]})
    assert none.status_code == 422 and none.json()["error"]["type"] == "invalid_input"
    assert "--top-k" in none.json()["error"]["message"]
    assert bad.status_code == 422


def test_the_client_collates_top_k_aligned_with_teacher_logprobs(topk_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, samples = topk_server
    with StoreClient(server.base_url) as client:
        assert client.manifest("topk").top_k == K and client.manifest("plain").top_k == 0
        table = client.fetch("topk", [5, 2, 5], columns=TOPK)
        batch = collate_arrays(table)
        assert "teacher_topk_ids" not in collate_arrays(client.fetch("topk", [5]))
        loader = OPDLoader(client, "topk", 4, arrays="numpy", columns=TOPK, prefetch=0)
        first = next(iter(loader))
    b, t = batch["input_ids"].shape
    assert batch["teacher_topk_ids"].shape == (b, t, K) and batch["teacher_topk_logprobs"].dtype == np.float32
    for row, i in enumerate([5, 2, 5]):
        p, r = len(samples["prompts"][i]), len(samples["responses"][i])
        np.testing.assert_array_equal(batch["teacher_topk_ids"][row, p : p + r], samples["topk_ids"][i])
        np.testing.assert_array_equal(batch["teacher_topk_logprobs"][row, p : p + r], samples["topk_logprobs"][i])
        assert (batch["teacher_topk_logprobs"][row, ~batch["response_mask"][row]] == 0).all()
        # The same positions as the sampled token's log-prob.
        np.testing.assert_array_equal(np.nonzero(batch["teacher_logprobs"][row])[0], np.arange(p, p + r))
    assert first["teacher_topk_ids"].shape[2] == K
    assert Store(server.store).open("topk").manifest.provenance.top_k == K
