"""The first checks on every request, before auth and before any body is read.

* **Host allow-list** (`ServerSettings.host_allow_list`): a request whose `Host` names anything
  else gets 400. A web page that rebinds its own DNS name to this machine's address (DNS
  rebinding) still sends its own name as `Host`, so it cannot read a tokenless loopback server.
* **414** for a request target (path and query) longer than `max_url_bytes`, **431** for a head
  (request line and headers) larger than `max_header_bytes`. h11 bounds only a head still
  arriving; one that arrived whole in one read is measured here. A head that outgrew the limit
  while arriving never gets here: the connection guard answers it (`connections.py`).
* **HEAD** on every GET route: served as GET, the body left out (same status and headers).
* **A response that leaves part of the request body unread closes the connection**
  (`Connection: close`): a request refused before its body was read (401, 413, ...) never has
  the rest of its body read, whatever route or middleware refused it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lopd.http_contract import ErrorType

from .body_limit import has_body
from .errors import send_error


def host_name(value: str) -> str:
    """The name in a Host header value, without its port or IPv6 brackets, lower-case."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6] or [v6]:port
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        return value.partition(":")[0]
    return value


def host_allowed(name: str, allowed: frozenset[str]) -> bool:
    """`name` is listed, or matches a listed `*.suffix`."""
    return name in allowed or any(a.startswith("*.") and name.endswith(a[1:]) for a in allowed)


class EdgeMiddleware:
    def __init__(
        self, app: ASGIApp, allowed_hosts: frozenset[str] | None, max_url_bytes: int, max_header_bytes: int
    ) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts  # None: any Host
        self.max_url_bytes = max_url_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] != "HEAD":
            await self._checked(scope, receive, send)
            return
        inner = {**scope, "method": "GET"}

        async def send_head(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            await self._checked(inner, receive, send_head)
        finally:
            if "route" in inner:  # for the metrics, which see the HEAD request
                scope["route"] = inner["route"]

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_done = not has_body(scope)

        async def tracked_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_done:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            status, message = refusal
            type_ = ErrorType.INVALID_INPUT if status == 400 else ErrorType.TOO_LARGE
            await send_error(send, status, type_, message, close=not body_done)
            return
        await self.app(scope, tracked_receive, closing_send)

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        if self.allowed_hosts is not None:
            hosts = [v.decode("latin-1") for k, v in scope.get("headers") or () if k == b"host"]
            if len(hosts) != 1 or not host_allowed(host_name(hosts[0]), self.allowed_hosts):
                shown = repr(hosts[0][:100]) if hosts else "none"
                return 400, (
                    f"Host {shown} is not one this server answers to; it accepts "
                    f"{', '.join(sorted(self.allowed_hosts))} (allowed_hosts)"
                )
        url_bytes = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string") or b"")
        if url_bytes > self.max_url_bytes:
            return 414, f"the URL is longer than the server's limit of {self.max_url_bytes} bytes (max_url_bytes)"
        head_bytes = url_bytes + sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or ())
        if head_bytes > self.max_header_bytes:
            return (
                431,
                f"the request headers exceed the server's limit of {self.max_header_bytes} bytes (max_header_bytes)",
            )
        return None
