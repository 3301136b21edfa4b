"""The connection guard of `lopd serve`: limits that hold before there is a request to route.

uvicorn runs the app over its h11 protocol; this subclass adds what uvicorn lacks and an ASGI
middleware cannot do, since each happens before the app is called:

* **Connections per client.** At most `max_connections_per_client` open connections from one
  client address; the next one is answered 429 (with `Retry-After`) and closed, so one client
  cannot hold every file descriptor of the server.
* **A deadline for the request head.** The request line and headers must arrive within
  `header_timeout_s` of connecting, or of a request's first byte; a client that trickles them
  (slowloris) gets 408 and is dropped. uvicorn's keep-alive timeout covers only the idle time
  between requests, and nothing at all before the first one.
* **Oversized heads answer 414 or 431** in the API's error shape. h11 bounds the head at
  `max_header_bytes`; uvicorn would answer a bare 400 and close while the client is still
  sending, which the client sees as a connection reset.
* **Lingering close.** When the server closes a connection the client may still be writing to
  (a refusal before the body was read, a timeout, a bad head), it stops writing, then reads and
  discards for up to `LINGER_S` seconds or `LINGER_BYTES`, so that the client reads the answer
  instead of a reset. Nothing read then is buffered.

`uvicorn_options(settings)` gives the keyword arguments that put it in place; `lopd serve` and
`serve_in_background` both use them, so tests run the guard that production runs. The body
limit, its read timeout, the Host check and auth are ASGI middleware (`body_limit.py`,
`edge.py`, `auth.py`).
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from lopd.http_contract import JSON_MEDIA_TYPE, ErrorType, error_body

from .settings import ServerSettings

LINGER_S = 2.0  # longest wait for the client to stop sending once the server has answered and closed
LINGER_BYTES = 16 * 1024 * 1024  # most bytes read (and dropped) meanwhile


class ClientConnections:
    """Open connections per client address, within a limit (one table per server)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        n = self.open.get(address, 0)
        if n >= self.limit:
            return False
        self.open[address] = n + 1
        return True

    def release(self, address: str) -> None:
        n = self.open.get(address, 0) - 1
        if n > 0:
            self.open[address] = n
        else:
            self.open.pop(address, None)


def error_response(status: int, type_: ErrorType, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection, in the API's error shape."""
    body = json.dumps(error_body(type_, message)).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"content-type: {JSON_MEDIA_TYPE}",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _GuardedTransport:
    """The transport as uvicorn sees it: closing goes through the guard, which may linger."""

    def __init__(self, real: asyncio.Transport, guard: GuardedH11Protocol) -> None:
        self._real = real
        self._guard = guard

    def close(self) -> None:
        self._guard.close_transport()

    def is_closing(self) -> bool:
        return self._guard.lingering or self._real.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the guards above; `guarded_protocol(settings)` makes one per server."""

    clients: ClientConnections
    header_timeout_s: float
    max_header_bytes: int
    max_url_bytes: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._real: asyncio.Transport | None = None
        self._address: str | None = None  # the client address while it counts against the limit
        self._deadline: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._lingered = 0
        self._closing_now = False  # shutting down, or the connection is gone: close without lingering

    @property
    def lingering(self) -> bool:
        return self._linger is not None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._real = transport
        super().connection_made(cast(asyncio.Transport, _GuardedTransport(transport, self)))
        address = self.client[0] if self.client else None
        if address is not None and not self.clients.acquire(address):
            self.logger.info("refused a connection from %s: %d already open", address, self.clients.limit)
            self._answer_and_close(
                429,
                ErrorType.TOO_MANY_REQUESTS,
                f"this client already has {self.clients.limit} open connections to the server "
                "(max_connections_per_client): reuse them, or close some",
                {"retry-after": "1"},
            )
            return
        self._address = address
        self._arm_deadline()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES and self._real is not None:
                self._real.close()
            return
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm_deadline()  # the first byte of a request
        super().data_received(data)
        if self._deadline is not None and self.conn.their_state is not h11.IDLE:
            self._cancel_deadline()  # its line and headers are in (or it failed and was answered)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing_now = True
        self._cancel_deadline()
        if self._linger is not None:
            self._linger.cancel()
        if self._address is not None:
            self.clients.release(self._address)
            self._address = None
        super().connection_lost(exc)

    # -- uvicorn's hooks -----------------------------------------------------------------------

    def shutdown(self) -> None:
        self._closing_now = True
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request head: say why (414, 431 or 400) and close."""
        head, _ = self.conn.trailing_data
        if len(head) > self.max_header_bytes:
            line = head.find(b"\n")
            if line < 0 or line > self.max_url_bytes:
                status, text = (
                    414,
                    f"the URL is longer than the server's limit of {self.max_url_bytes} bytes (max_url_bytes)",
                )
            else:
                status = 431
                text = (
                    f"the request headers exceed the server's limit of {self.max_header_bytes} bytes (max_header_bytes)"
                )
            self._answer_and_close(status, ErrorType.TOO_LARGE, text)
        else:
            self._answer_and_close(400, ErrorType.INVALID_INPUT, "malformed HTTP request")

    def close_transport(self) -> None:
        """Close, lingering when the client may still be sending (see the module docstring)."""
        if self._real is None or self.lingering:
            return
        if self._closing_now or not self._client_may_be_sending():
            self._real.close()
        else:
            self._start_linger()

    # -- internals -----------------------------------------------------------------------------

    def _client_may_be_sending(self) -> bool:
        state = self.conn.their_state
        return state in (h11.SEND_BODY, h11.ERROR) or (state is h11.IDLE and bool(self.conn.trailing_data[0]))

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_timeout(self) -> None:
        self._deadline = None
        if self.lingering or self.conn.their_state is not h11.IDLE:
            return
        self.logger.info("dropped a connection from %s: no request head in %g s", self._address, self.header_timeout_s)
        self._answer_and_close(
            408,
            ErrorType.TIMEOUT,
            f"the request line and headers took longer than header_timeout_s ({self.header_timeout_s:g} s)",
        )

    def _answer_and_close(
        self, status: int, type_: ErrorType, message: str, headers: dict[str, str] | None = None
    ) -> None:
        """Write a whole error answer (only between requests, or before the app answered), then linger."""
        assert self._real is not None
        if self.cycle is not None and not self.cycle.response_complete:
            if self.cycle.response_started:  # the app is answering: no second answer, just close
                self._start_linger()
                return
            self.cycle.disconnected = True  # the app's own answer, if any, is dropped
            self.cycle.message_event.set()
        if not self._real.is_closing():
            self._real.write(error_response(status, type_, message, headers))
        self._start_linger()

    def _start_linger(self) -> None:
        real = self._real
        if real is None or self.lingering or real.is_closing():
            return
        self._cancel_deadline()
        self._unset_keepalive_if_required()
        if not real.can_write_eof():
            real.close()
            return
        real.write_eof()  # flushes the answer, then FIN; the client's EOF or the timer ends the linger
        real.resume_reading()  # uvicorn pauses reading while a body waits for the app
        self._linger = self.loop.call_later(LINGER_S, real.close)


def guarded_protocol(settings: ServerSettings) -> type[GuardedH11Protocol]:
    """A protocol class for one server: its limits, and one table of connections per client."""

    class Protocol(GuardedH11Protocol):
        clients = ClientConnections(settings.max_connections_per_client)
        header_timeout_s = settings.header_timeout_s
        max_header_bytes = settings.max_header_bytes
        max_url_bytes = settings.max_url_bytes

    return Protocol


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """Keyword arguments of `uvicorn.run` / `uvicorn.Config` that install the guard and its timeouts."""
    return {
        "http": guarded_protocol(settings),
        "timeout_keep_alive": settings.keep_alive_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }
