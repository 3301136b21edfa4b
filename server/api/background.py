"""Run the API under uvicorn in a background thread, on a free loopback port.

For the demo, for tests and for notebooks: one process that both serves a store and trains
against it over real HTTP, with no port to pick and nothing left running afterwards.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .connections import uvicorn_options
from .settings import ServerSettings


@dataclass
class BackgroundServer:
    app: FastAPI
    base_url: str
    port: int


@contextmanager
def serve_in_background(settings: ServerSettings, *, start_timeout_s: float = 20.0) -> Iterator[BackgroundServer]:
    """`lopd serve`'s app, with its connection guard, on 127.0.0.1:<free port> until the block ends."""
    app = create_app(settings)
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets that say so (else Nagle adds ~40 ms)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # A bounded graceful shutdown: the thread must be gone before the block ends, never left as a
    # daemon inside native code when the process exits.
    config = uvicorn.Config(
        app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5, **uvicorn_options(settings)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the API server did not start")
        time.sleep(0.01)
    try:
        yield BackgroundServer(app=app, base_url=f"http://127.0.0.1:{port}", port=port)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("the API server thread did not stop within 30 s")
