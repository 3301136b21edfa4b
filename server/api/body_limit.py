"""Refuse oversized request bodies before anything reads them.

The batch route bounds how many indices it accepts, but only after the body has been read and
parsed; a multi-gigabyte body would cost memory and CPU first. This ASGI middleware answers 413
from the Content-Length header alone, and 411 for a body sent without one (chunked uploads),
in the API's one error shape.
"""

from __future__ import annotations

import json
from typing import Any

from lopd.http_contract import JSON_MEDIA_TYPE, ErrorType, error_body

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"].encode() in _BODY_METHODS:
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            if length is None and headers.get(b"transfer-encoding"):
                return await _refuse(send, 411, ErrorType.INVALID_INPUT, "send the request body with a Content-Length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                return await _refuse(
                    send,
                    413,
                    ErrorType.TOO_LARGE,
                    f"request body of {length.decode(errors='replace')} bytes exceeds the limit of "
                    f"{self.max_body_bytes} bytes (LOPD_MAX_BODY_BYTES); ask for fewer indices per batch",
                )
        await self.app(scope, receive, send)


async def _refuse(send: Any, status: int, type_: ErrorType, message: str) -> None:
    body = json.dumps(error_body(type_, message)).encode()
    headers = [(b"content-type", JSON_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
