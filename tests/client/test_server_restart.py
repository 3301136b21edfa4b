"""A real `lopd serve` process killed and restarted in the middle of an epoch costs no sample."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from lopd.client.http import StoreClient
from lopd.client.loader import OPDLoader


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(store, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lopd", "serve", str(store), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("lopd serve did not become ready")


@pytest.mark.slow
def test_server_killed_and_restarted_mid_epoch_costs_no_sample(client_store):
    port = _free_port()
    server = _start(client_store.root, port)
    seen: list[int] = []
    try:
        # enough retry budget to outlast a restart (backoff capped at 1 s)
        with StoreClient(f"http://127.0.0.1:{port}", retries=40, backoff_s=0.05, max_backoff_s=1.0) as client:
            loader = OPDLoader(client, "alpha", 7, seed=3, prefetch=2)
            it = iter(loader)
            for _ in range(4):
                seen.extend(next(it)["index"].tolist())
            os.kill(server.pid, signal.SIGKILL)  # mid-epoch, with prefetches possibly in flight
            server.wait()
            time.sleep(0.5)
            server = _start(client_store.root, port)
            for batch in it:
                seen.extend(batch["index"].tolist())
    finally:
        server.kill()
        server.wait()
    assert sorted(seen) == list(range(100))  # `alpha` has 100 samples: each exactly once
