"""Mapping every error to one JSON shape, in one place.

Routes raise the project's error hierarchy (`lopd.errors`); FastAPI and Starlette raise their
own validation, 404 and 405 errors. All of them leave here in the contract's error body
(`lopd.http_contract.error_body`) with the status the contract names. Messages are
sanitised: the store's absolute path is replaced by `<store>`, and unexpected exceptions
answer a fixed text (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from lopd.errors import Corrupt, InvalidInput, LopdError, NotFound, Unauthorized, Unavailable
from lopd.http_contract import JSON_MEDIA_TYPE, ErrorResponse, ErrorType, error_body

from .redaction import redact_store

log = logging.getLogger(__name__)


class TooLarge(InvalidInput):
    """A request beyond one of the server's limits (413); the message names the limit."""


# First match wins: subclasses before their bases.
_LOPD_STATUS: list[tuple[type[LopdError], int, ErrorType]] = [
    (TooLarge, 413, ErrorType.TOO_LARGE),
    (Unauthorized, 401, ErrorType.UNAUTHORIZED),
    (InvalidInput, 422, ErrorType.INVALID_INPUT),
    (NotFound, 404, ErrorType.NOT_FOUND),
    (Corrupt, 503, ErrorType.CORRUPT),
    (Unavailable, 503, ErrorType.UNAVAILABLE),
]
_HTTP_TYPES: dict[int, ErrorType] = {
    401: ErrorType.UNAUTHORIZED,
    404: ErrorType.NOT_FOUND,
    405: ErrorType.METHOD_NOT_ALLOWED,
    413: ErrorType.TOO_LARGE,
}

# Error responses to declare on routes, so the OpenAPI schema lists every status they answer.


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "The body is not JSON.",
        401: "Missing or wrong bearer token.",
        404: "Unknown dataset, version or route.",
        413: "Beyond max_batch_indices, max_response_tokens or max_body_bytes.",
        422: "Invalid input: dataset name, index out of range, malformed body.",
        503: "The version failed checksum verification (never served) or the store is unavailable.",
    }
    return {s: {"model": ErrorResponse, "description": descriptions[s]} for s in statuses}


def error_json(status: int, type_: ErrorType, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(type_, message), status_code=status, headers=headers)


async def send_error(
    send: Send,
    status: int,
    type_: ErrorType,
    message: str,
    *,
    close: bool = False,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer from ASGI middleware (before any route runs), in the same error shape.

    `close`: end the connection after the answer (`Connection: close`), so that a request body the
    middleware refused is never read to its end.
    """
    body = json.dumps(error_body(type_, message)).encode()
    raw = [(b"content-type", JSON_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _sanitise(request: Request, message: str) -> str:
    settings = getattr(request.app.state, "settings", None)
    return message if settings is None else redact_store(message, settings.store)


async def _lopd_error(request: Request, exc: Exception) -> JSONResponse:
    for cls, status, type_ in _LOPD_STATUS:
        if isinstance(exc, cls):
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return error_json(status, type_, _sanitise(request, str(exc)), headers)
    # Other domain errors (Conflict, Inconsistent) never come from a read-only route on purpose.
    return await _unexpected(request, exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    type_ = _HTTP_TYPES.get(status, ErrorType.INVALID_INPUT if status < 500 else ErrorType.INTERNAL)
    message = {404: f"no route {request.url.path[:200]!r}", 405: f"{request.method} is not allowed here"}.get(
        status, str(exc.detail)
    )
    headers = dict(exc.headers or {})
    if status == 405:
        message += f"; allowed: {headers.get('Allow', 'GET')}"
    return error_json(status, type_, _sanitise(request, message), headers or None)


def _describe_input(value: Any) -> str:
    if isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 64):
        return f" (got {value!r})"
    return ""


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    parts = [
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}{_describe_input(e.get('input'))}"
        for e in errors[:5]
    ]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return error_json(422, ErrorType.INVALID_INPUT, _sanitise(request, "; ".join(parts) + more))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_json(500, ErrorType.INTERNAL, "internal server error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LopdError, _lopd_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
