"""`create_app(settings)`: the FastAPI application of `lopd serve`.

Wiring only: settings, the catalogue (the engine), auth, metrics, the error mapping and the
routers. Public without a token: /livez, /readyz and the static page at `/` (it holds no data
and must load in a browser before it can send a token); everything else needs one when a
tokens file is configured, /openapi.json included. FastAPI's /docs and /redoc are off: they load
assets from a CDN, and this server works offline.

A request meets, in order: the connection guard (`connections.py`: connections per client, the
head's deadline and size), metrics, the edge checks (`edge.py`: Host, URL length, HEAD), auth
(`auth.py`), the body limit (`body_limit.py`: framing, size, read timeout), then the routes. So
nothing reads a body before the request is authenticated, and nothing parses one before it is
known to be within the limit.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from lopd.http_contract import LIVEZ_PATH, READYZ_PATH

from . import page, routes_datasets, routes_health, routes_metrics
from .auth import AuthMiddleware, TokenTable, require_token
from .body_limit import BodyLimitMiddleware
from .catalog import Catalog
from .edge import EdgeMiddleware
from .errors import error_responses, install_error_handlers
from .limits import Limits, LimitsCollector
from .metrics import Metrics, MetricsMiddleware
from .settings import ServerSettings

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({LIVEZ_PATH, READYZ_PATH, page.PAGE_PATH})


def _version() -> str:
    try:
        return dist_version("lightning-opd")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def create_app(settings: ServerSettings) -> FastAPI:
    """Build the app; the catalogue starts verifying checksums when the app starts (lifespan)."""
    tokens = (
        TokenTable.from_file(settings.tokens_file, allow_insecure=settings.insecure_tokens_file)
        if settings.tokens_file is not None
        else None
    )
    catalog = Catalog(
        settings.store,
        settings.catalog_ttl_s,
        scrub_bytes_per_s=settings.scrub_bytes_per_s,
        cache_bytes=settings.cache_bytes,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        catalog.start()
        try:
            yield
        finally:
            catalog.close()

    app = FastAPI(
        title="lightning-opd",
        summary="Read-only API of a teacher log-prob store (docs/http-api.md).",
        version=_version(),
        lifespan=lifespan,
        openapi_url=None,  # served below, behind auth like every data route
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.catalog = catalog
    app.state.tokens = tokens
    app.state.metrics = metrics = Metrics()
    app.state.limits = limits = Limits(settings.max_concurrent_reads)
    metrics.registry.register(LimitsCollector(limits))
    install_error_handlers(app)
    # Added innermost first: the last one added sees a request first.
    app.add_middleware(
        BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s
    )
    if tokens is not None:
        app.add_middleware(AuthMiddleware, tokens=tokens, public_paths=PUBLIC_PATHS)
    app.add_middleware(
        EdgeMiddleware,
        allowed_hosts=settings.host_allow_list,
        max_url_bytes=settings.max_url_bytes,
        max_header_bytes=settings.max_header_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    auth = [Depends(require_token)] if tokens is not None else []
    app.include_router(routes_health.router)
    app.include_router(page.router)
    app.include_router(routes_datasets.router, dependencies=auth)
    app.include_router(routes_metrics.router, dependencies=auth)

    @app.get(
        "/openapi.json",
        include_in_schema=False,
        dependencies=auth,
        responses=error_responses(401),
    )
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    if settings.exposed and tokens is None:  # the one place this is said (`lopd serve` adds nothing)
        log.warning(
            "serving on %s without a tokens file (--tokens-file, LOPD_TOKENS_FILE): anyone who can reach it can "
            "read every dataset",
            settings.host,
        )
    return app
