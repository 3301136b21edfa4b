"""Liveness and readiness: public (no token), cheap, and honest about a damaged store."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from lopd.http_contract import LIVEZ_PATH, READYZ_PATH, LivezResponse, ReadyResponse, UnavailableResponse

from .deps import CatalogDep, LimitsDep

router = APIRouter(tags=["health"])


@router.get(LIVEZ_PATH, response_model=LivezResponse)
async def livez() -> LivezResponse:
    """200 while the process is up (no I/O: it must answer even when the store is unreachable)."""
    return LivezResponse()


@router.get(
    READYZ_PATH,
    response_model=ReadyResponse,
    responses={503: {"model": UnavailableResponse, "description": "Store missing or a version failed verification."}},
)
async def readyz(catalog: CatalogDep, limits: LimitsDep) -> ReadyResponse | JSONResponse:
    """200 once the store is there and every published version's checksums matched; 503 listing why not."""
    state = await limits.check(catalog.readiness)  # its own lane: never queued behind batch reads
    if not state.ready:
        return JSONResponse(UnavailableResponse(problems=state.problems).model_dump(), status_code=503)
    return ReadyResponse(datasets=state.datasets)
