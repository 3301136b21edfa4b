"""`lopd serve`: the HTTP API over a store; its flags are `ServerSettings`' fields.

FastAPI and uvicorn are imported when the command runs, so `lopd --help` and the client commands
work on an install without the `server` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import typer

from .params import fail, settings_command

if TYPE_CHECKING:
    from lopd.server.api.settings import ServerSettings


def _serve(settings: ServerSettings) -> None:
    """Serve every dataset of a store over HTTP, read-only (docs/http-api.md)."""
    try:
        import uvicorn

        from lopd.server.api.app import create_app
    except ImportError as e:
        fail(f"`lopd serve` needs the server extra: pip install 'lightning-opd[server]' ({e})")
    if settings.exposed and settings.tokens_file is None:
        typer.secho(
            f"warning: serving on {settings.host} without --tokens-file: anyone who can reach it can read every "
            "dataset",
            fg=typer.colors.YELLOW,
            err=True,
        )
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)


def serve_command() -> Callable[..., None]:
    """The command, built from `ServerSettings` (pydantic-settings is in every install; FastAPI is not needed here)."""
    from lopd.server.api.settings import ServerSettings

    return settings_command(ServerSettings, _serve)
