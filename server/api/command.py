"""`lopd serve`: the CLI entry of the HTTP API (registered in lopd/cli.py).

FastAPI and uvicorn are imported inside the command, so `lopd --help` and the client commands
work on an install without the `server` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def serve(
    store_dir: Annotated[Path, typer.Argument(help="Store directory to serve, read-only.")],
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1, or $LOPD_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8000, or $LOPD_PORT).")] = None,
    tokens_file: Annotated[
        Path | None,
        typer.Option(
            help='JSON {"<token>": "<lab>"}: every route but /livez, /readyz and the page shell `/` then needs '
            "`Authorization: Bearer <token>` (or $LOPD_TOKENS_FILE)."
        ),
    ] = None,
) -> None:
    """Serve every dataset of a store over HTTP, read-only (docs/http-api.md; limits via LOPD_* variables)."""
    try:
        import uvicorn
        from pydantic import ValidationError

        from .app import create_app
        from .settings import ServerSettings
    except ImportError as e:
        typer.secho(f"error: `lopd serve` needs the server extra: pip install 'lightning-opd[server]' ({e})", err=True)
        raise typer.Exit(code=2) from None
    from lopd.errors import LopdError

    given: dict[str, Any] = {"host": host, "port": port, "tokens_file": tokens_file}
    try:
        settings = ServerSettings(store=store_dir, **{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:  # e.g. LOPD_PORT=abc in the environment
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        typer.secho(f"error: invalid server settings (flags or LOPD_* variables): {problems}", err=True)
        raise typer.Exit(code=2) from None
    if settings.exposed and settings.tokens_file is None:
        typer.secho(
            f"warning: serving on {settings.host} without --tokens-file: anyone who can reach it can read every "
            "dataset",
            fg=typer.colors.YELLOW,
            err=True,
        )
    try:
        app = create_app(settings)
    except LopdError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
