"""Request bodies: bounded, timed, and read only after the request is authenticated.

The batch route bounds how many indices it accepts, but only once the body has been read and
parsed; this ASGI middleware bounds the reading itself. It runs inside auth (`app.py` orders the
middleware), so an unauthenticated client costs no body read at all. For a request with a body:

* `Content-Length` together with `Transfer-Encoding` is refused (400): the two framings
  disagree, which is how request smuggling starts, and the length says nothing about the body;
* a `Content-Length` above `max_body_bytes` is refused from the header alone (413);
* otherwise the body is read as it arrives, counting bytes: 413 as soon as the count passes the
  limit (a chunked body has no length to check up front), without reading the rest; 408 when
  it takes longer than `body_timeout_s`.

The app then gets the body it read, so at most `max_body_bytes` are ever held. Every refusal
closes the connection: the rest of a refused body is never read.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lopd.http_contract import ErrorType

from .errors import send_error


def has_body(scope: Scope) -> bool:
    """True when the request's headers announce a body (a non-zero Content-Length, or any Transfer-Encoding)."""
    for name, value in scope.get("headers") or ():
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and b"transfer-encoding" in headers:
            await send_error(
                send,
                400,
                ErrorType.INVALID_INPUT,
                "a request may not carry both Content-Length and Transfer-Encoding; send one",
                close=True,
            )
            return
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._too_large(send, length.decode(errors="replace"))
            return
        body = await self._read(receive, send)
        if body is not None:
            await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None once a refusal was sent (or the client left)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await send_error(
                    send,
                    408,
                    ErrorType.TIMEOUT,
                    f"the request body took longer than body_timeout_s ({self.body_timeout_s:g} s)",
                    close=True,
                )
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(send, f"more than {self.max_body_bytes}")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send, size: str) -> None:
        await send_error(
            send,
            413,
            ErrorType.TOO_LARGE,
            f"request body of {size} bytes exceeds the limit of {self.max_body_bytes} bytes (LOPD_MAX_BODY_BYTES); "
            "ask for fewer indices per batch",
            close=True,
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body read ahead once, then whatever the connection says (a disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
