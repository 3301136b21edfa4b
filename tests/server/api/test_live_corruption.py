"""Damage to a published shard while the server runs is never served as data (issue 13).

One byte of a live server's shard is flipped at many offsets, in place (the inode stays, as with
bit rot or a stray write). After each flip a batch from that shard is either byte-identical to the
original answer or 503 `corrupt`; never other data and never a 500. /readyz names the shard and
/metrics counts it; restoring the byte makes the version verified and served again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import numpy as np

from lopd.http_contract import ARROW_STREAM_MEDIA_TYPE
from lopd.server.api.settings import ServerSettings
from tests.server.api.conftest import running_server, wait_ready
from tests.utils.factories import build_dataset

OFFSETS = 40


def _write_at(path: Path, offset: int, value: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([value]), offset)
    finally:
        os.close(fd)


def _wait(c: httpx.Client, status: int, timeout: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = c.get("/readyz")
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.02)


def test_flipped_bytes_in_a_live_shard_are_never_served(tmp_path: Path) -> None:
    build_dataset(tmp_path, "ds", n=192, per_part=128, seed=5)  # part 0: 128 samples in 2 row groups
    shard = tmp_path / "ds" / "v1" / "part-000000.parquet"
    original = shard.read_bytes()
    indices = {"indices": [0, 63, 64, 127, 5, 100]}
    outcomes = {"same": 0, "corrupt": 0}
    settings = ServerSettings(store=tmp_path, catalog_ttl_s=0.05, scrub_bytes_per_s=0)
    with running_server(settings) as srv, srv.client() as c:
        assert wait_ready(c).status_code == 200
        want = {}
        for accept in ("application/json", ARROW_STREAM_MEDIA_TYPE):
            r = c.post("/v1/datasets/ds/batch", json=indices, headers={"Accept": accept})
            assert r.status_code == 200
            want[accept] = r.content
        for k, offset in enumerate(np.linspace(0, len(original) - 1, OFFSETS).astype(int)):
            accept = ("application/json", ARROW_STREAM_MEDIA_TYPE)[k % 2]
            time.sleep(0.02)  # past the file system's timestamp granularity
            _write_at(shard, int(offset), original[offset] ^ 0xFF)
            for _ in range(2):  # the same connection stays usable after a 503
                r = c.post("/v1/datasets/ds/batch", json=indices, headers={"Accept": accept})
                assert r.status_code in (200, 503), (offset, r.status_code, r.text)
                if r.status_code == 200:
                    assert r.content == want[accept], f"offset {offset}: other data served"
                    outcomes["same"] += 1
                else:
                    assert r.json()["error"]["type"] == "corrupt", r.text
                    outcomes["corrupt"] += 1
            if r.status_code == 503:
                ready = c.get("/readyz")
                assert ready.status_code == 503
                assert any("'ds' v1" in p and "part-000000.parquet" in p for p in ready.json()["problems"]), ready.text
                metrics = c.get("/metrics").text
                assert 'lopd_damaged_versions{dataset="ds",version="1"} 1.0' in metrics
            time.sleep(0.02)
            _write_at(shard, int(offset), original[offset])
            assert _wait(c, 200).status_code == 200, f"offset {offset}: not served again after the restore"
            r = c.post("/v1/datasets/ds/batch", json=indices, headers={"Accept": accept})
            assert r.status_code == 200 and r.content == want[accept]
        metrics = c.get("/metrics").text
    assert shard.read_bytes() == original
    assert outcomes["corrupt"] > 0, outcomes
    assert 'lopd_integrity_failures_total{found="read"}' in metrics
