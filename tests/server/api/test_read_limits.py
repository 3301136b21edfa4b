"""Read slots (`max_concurrent_reads`) on a real server: reads beyond them wait, health checks do not.

The reads are held inside `Dataset.take` (patched in this process, where the server runs), so the
test sees exactly how many run at once, what /metrics says meanwhile, and that /readyz still answers.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lopd.server.api.settings import ServerSettings
from lopd.storage.reader import Dataset
from tests.server.api.conftest import StoreData, running_server, wait_ready

SLOTS = 2
REQUESTS = 6


class HeldReads:
    """Wraps `Dataset.take`: counts reads in flight (and the most at once) and holds each until released."""

    def __init__(self, take):  # type: ignore[no-untyped-def]
        self.take = take
        self.release = threading.Event()
        self.in_flight = 0
        self.most = 0
        self.lock = threading.Lock()

    def __call__(self, dataset, *args, **kwargs):  # type: ignore[no-untyped-def]
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            assert self.release.wait(timeout=60), "the test never released the reads"
            return self.take(dataset, *args, **kwargs)
        finally:
            with self.lock:
                self.in_flight -= 1


def _gauge(text: str, name: str) -> float:
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


def _wait_for(condition, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_reads_beyond_the_slots_wait_and_readyz_does_not(store: StoreData, monkeypatch: pytest.MonkeyPatch) -> None:
    root, data = store
    settings = ServerSettings(store=root, max_concurrent_reads=SLOTS, catalog_ttl_s=2.0)
    with running_server(settings) as server, server.client() as c:
        assert wait_ready(c).status_code == 200
        held = HeldReads(Dataset.take)
        monkeypatch.setattr(Dataset, "take", lambda self, *a, **kw: held(self, *a, **kw))
        indices = [[i, 119 - i, 3 * i] for i in range(REQUESTS)]
        with ThreadPoolExecutor(REQUESTS) as pool:
            futures = [
                pool.submit(httpx.post, f"{server.base_url}/v1/datasets/alpha/batch", json={"indices": idx}, timeout=60)
                for idx in indices[:-1]
            ]
            futures.append(pool.submit(httpx.get, f"{server.base_url}/v1/datasets/alpha/samples/7", timeout=60))
            _wait_for(lambda: held.in_flight == SLOTS)
            _wait_for(lambda: _gauge(c.get("/metrics").text, "lopd_reads_waiting") == REQUESTS - SLOTS)
            metrics = c.get("/metrics").text
            assert _gauge(metrics, "lopd_reads_in_progress") == SLOTS

            # Every read slot is taken and four requests queue: the health check answers at once anyway.
            started = time.monotonic()
            ready = c.get("/readyz", timeout=5)
            assert ready.status_code == 200 and time.monotonic() - started < 2.0
            time.sleep(0.3)  # more time for any request that could overtake the limit to show itself
            assert held.in_flight == SLOTS

            held.release.set()
            answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200] * REQUESTS, [a.text for a in answers]
        assert held.most == SLOTS
        assert answers[-1].json()["sample_id"] == data["alpha"]["ids"][7]
        got = [c.post("/v1/datasets/alpha/batch", json={"indices": idx}).content for idx in indices[:-1]]
        assert got == [a.content for a in answers[:-1]], "a held read answers what an unhurried one does"
        assert _gauge(c.get("/metrics").text, "lopd_reads_in_progress") == 0


def test_max_concurrent_reads_is_a_setting_with_its_flag_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from lopd.cli import app

    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--max-concurrent-reads" in help_text
    monkeypatch.setenv("LOPD_MAX_CONCURRENT_READS", "3")
    assert ServerSettings(store=".").max_concurrent_reads == 3
    with pytest.raises(ValueError, match="max_concurrent_reads"):
        ServerSettings(store=".", max_concurrent_reads=0)
