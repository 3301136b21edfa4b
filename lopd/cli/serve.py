"""`lopd serve`: the HTTP API over a store; its flags are `ServerSettings`' fields.

FastAPI and uvicorn are imported when the command runs, so `lopd --help` and the client commands
work on an install without the `server` extra. Before anything starts, the command refuses what
would otherwise fail late or quietly: a store path that does not exist or is not a store, and a
port another process listens on. An existing empty directory is served (with a warning): it
becomes a store when `lopd precompute --store` first writes to it, and its datasets appear
without a restart.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import typer

from lopd.errors import LopdError, NotFound

from .params import fail, object_store_hint, settings_command

if TYPE_CHECKING:
    from lopd.server.api.settings import ServerSettings
    from lopd.storage.fs import StoreDir


def _check_store(path: StoreDir) -> None:
    """Refuse a path that is not a store; warn about an empty directory or prefix (a store to be written)."""
    from lopd.storage.fs import is_object
    from lopd.storage.layout import STORE_MARKER
    from lopd.storage.reader import Store

    create = f"create one with `lopd precompute ROLLOUTS --store {path} ...`"
    try:
        empty = not any(path.iterdir()) if is_object(path) or path.is_dir() else None
    except OSError as e:  # object storage unreachable, bucket missing, no credentials
        fail(f"cannot list store {path}: {e}{object_store_hint(e)}")
    if empty is None:
        fail(f"store {path} {'is not a directory' if path.exists() else 'does not exist'}; {create}")
    if empty:
        typer.secho(
            f"warning: store {path} is empty: nothing to serve until `lopd precompute ... --store {path}` publishes "
            "a dataset (it then appears without a restart)",
            fg=typer.colors.YELLOW,
            err=True,
        )
        return
    try:
        Store(path)
    except NotFound:
        fail(f"{path} is not a lightning-opd store (it has no {STORE_MARKER}); serve a store directory, or {create}")
    except (LopdError, OSError, ValueError) as e:
        fail(f"cannot read store {path}: {e}")


def _check_port(host: str, port: int) -> None:
    """Bind (host, port) the way the server will, and release it: a taken port fails now, not after startup."""
    if port == 0:  # any free port
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        fail(f"cannot listen on {host}: {e.strerror}; check --host")
    bound = 0
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(address)
                bound += 1
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    fail(f"port {port} on {host} is in use (another `lopd serve`?); stop it or choose another --port")
                if e.errno != errno.EADDRNOTAVAIL:  # (asyncio skips an address family the host lacks, so do we)
                    fail(f"cannot listen on {host} port {port}: {e.strerror}; check --host and --port")
    if not bound:
        fail(f"cannot listen on {host}: no such address on this machine; check --host")


def _serve(settings: ServerSettings) -> None:
    """Serve every dataset of a store over HTTP, read-only (docs/http-api.md)."""
    try:
        import uvicorn

        from lopd.server.api.app import create_app
        from lopd.server.api.connections import uvicorn_options
    except ImportError as e:
        fail(f"`lopd serve` needs the server extra: pip install 'lightning-opd[server]' ({e})")
    _check_store(settings.store)
    _check_port(settings.host, settings.port)
    app = create_app(settings)  # warns when serving beyond loopback without tokens
    # uvicorn.run with the connection guard: per-client connection limit, header deadline, 414/431 (connections.py)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, **uvicorn_options(settings))


def serve_command() -> Callable[..., None]:
    """The command, built from `ServerSettings` (pydantic-settings is in every install; FastAPI is not needed here)."""
    from lopd.server.api.settings import ServerSettings

    return settings_command(ServerSettings, _serve, extra="server")
