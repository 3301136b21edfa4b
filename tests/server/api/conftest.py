"""Real uvicorn servers on loopback over real Parquet stores (built by `tests.utils.factories`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from lopd.server.api.background import serve_in_background
from lopd.server.api.settings import ServerSettings
from tests.utils.factories import build_dataset

TOKENS = {"tok-alpha-lab-0123456789": "lab-a", "tok-beta-lab-9876543210": "lab-b"}
GOOD_TOKEN = "tok-alpha-lab-0123456789"


@dataclass
class Running:
    app: FastAPI
    base_url: str
    port: int
    store: Path

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


@contextmanager
def running_server(settings: ServerSettings) -> Iterator[Running]:
    """`lopd serve`'s app under uvicorn in a thread, on a free loopback port, until the block ends."""
    with serve_in_background(settings) as bg:
        yield Running(app=bg.app, base_url=bg.base_url, port=bg.port, store=settings.store)


def wait_ready(client: httpx.Client, timeout: float = 20) -> httpx.Response:
    """Poll /readyz until verification has finished (ready, or unready for a reason other than pending)."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/readyz")
        pending = r.status_code == 503 and any("still being verified" in p for p in r.json()["problems"])
        if not pending or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


class StoreData(tuple):  # (root, {dataset: generated samples}) with a short repr for hypothesis reports
    def __repr__(self) -> str:
        return f"StoreData({self[0]})"


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> StoreData:
    """A store with two datasets of several shards each (never modified by tests)."""
    root = tmp_path_factory.mktemp("api-store")
    _, alpha = build_dataset(root, "alpha", n=120, per_part=32, seed=1)
    _, beta = build_dataset(root, "beta", n=40, per_part=16, seed=2)
    return StoreData((root, {"alpha": alpha, "beta": beta}))


@pytest.fixture(scope="session")
def server(store: StoreData) -> Iterator[Running]:
    """The read-only server without auth, with small limits so they can be hit."""
    settings = ServerSettings(store=store[0], max_batch_indices=256, max_response_tokens=20_000, catalog_ttl_s=2.0)
    with running_server(settings) as running:
        with running.client() as c:
            assert wait_ready(c).status_code == 200
        yield running


@pytest.fixture(scope="session")
def auth_server(store: StoreData, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The same store behind bearer tokens (two labs)."""
    tokens_file = tmp_path_factory.mktemp("tokens") / "tokens.json"
    tokens_file.write_text(json.dumps(TOKENS))
    tokens_file.chmod(0o600)  # a tokens file others can read is refused
    with running_server(ServerSettings(store=store[0], tokens_file=tokens_file)) as running:
        with running.client(GOOD_TOKEN) as c:
            assert wait_ready(c).status_code == 200
        yield running


@pytest.fixture
def client(server: Running) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
