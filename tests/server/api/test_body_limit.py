"""Oversized request bodies are refused from their headers, before anything reads them."""

from __future__ import annotations

import json

from lopd.server.api.settings import ServerSettings
from tests.server.api.conftest import running_server


def test_body_limits(store):
    root = store[0]
    with running_server(ServerSettings(store=root, max_body_bytes=2_000)) as srv, srv.client() as client:
        ok = client.post("/v1/datasets/alpha/batch", json={"indices": [0, 1]}, headers={"Accept": "application/json"})
        assert ok.status_code == 200, ok.text
        big = json.dumps({"indices": list(range(1000))})  # ~5 kB, above the 2 kB limit
        r = client.post("/v1/datasets/alpha/batch", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"]["type"] == "too_large" and "2000 bytes" in r.json()["error"]["message"]
        chunked = client.post(
            "/v1/datasets/alpha/batch",
            content=iter([b'{"indices": [0]}']),
            headers={"Content-Type": "application/json"},
        )
        assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]["message"]
