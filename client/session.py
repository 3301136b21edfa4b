"""`Session`: the training job's connection to one server, with the retry policy and the error mapping.

* One keep-alive `httpx.Client` per process: a trainer fetches a batch every few hundred
  milliseconds, and a fresh TCP (or TLS) connection per batch would cost more than the request.
  The pool is rebuilt after a fork and dropped on pickling, so the same session can be handed to
  DataLoader worker processes.
* Transient failures are retried by the project's one policy (`lopd.retry`); any other error
  answer is raised at once as the `ServerError` matching its status, with the server's message.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from lopd.http_contract import read_error
from lopd.retry import Failure, RetriesExhausted, RetryPolicy

from .errors import RetryBudgetExhausted, error_for_status


def _error_of(resp: httpx.Response) -> tuple[str | None, str]:
    """(error.type, error.message) from the contract's error body, or the raw body when it is not one."""
    try:
        found = read_error(resp.json())
    except ValueError:  # not JSON
        found = None
    if found is not None:
        return found
    text = resp.text.strip()
    return None, (text[:500] if text else resp.reason_phrase or "no message")


def _describe(failure: Failure) -> str:
    if failure.response is None:
        return str(failure)
    etype, message = _error_of(failure.response)
    return f"{failure}{f' {etype}' if etype else ''}: {message}"


class Session:
    """A pooled, fork-safe connection to the server at `url`, sending requests under `retry`.

    `transport` replaces the network (tests use `httpx.MockTransport`); `sleep` replaces the wait
    between attempts when no cancel event is given. Thread-safe: prefetch threads share one pool.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout: httpx.Timeout,
        retry: RetryPolicy,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/") + "/"
        self.token = token
        self.timeout = timeout
        self.retry = retry
        self._transport = transport
        self._sleep = sleep
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._pid = -1

    def _http(self) -> httpx.Client:
        # A connection pool copied by fork() shares sockets with the parent; build a new one.
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                headers = {"User-Agent": "lightning-opd-client/1"}
                if self.token:
                    headers["Authorization"] = f"Bearer {self.token}"
                self._client = httpx.Client(
                    base_url=self.url, headers=headers, timeout=self.timeout, transport=self._transport
                )
                self._pid = os.getpid()
            return self._client

    def close(self) -> None:
        """Close the connection pool (the session can still be used: it reconnects on demand)."""
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_lock"] = None
        state["_sleep"] = None if self._sleep is time.sleep else self._sleep
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if self._sleep is None:
            self._sleep = time.sleep

    def probe(self, path: str) -> httpx.Response:
        """One GET, whatever it answers: no retry and no error mapping (health probes)."""
        return self._http().get(path.lstrip("/"))

    def request(
        self, method: str, path: str, *, cancel: threading.Event | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send a request, retrying transient failures; return a 2xx/3xx response or raise.

        Raises `RetryBudgetExhausted` when connection errors, 408, 429 or 5xx outlast the retries,
        and the `ServerError` subclass matching any other error status at once. Setting `cancel`
        stops the retrying (`lopd.errors.Cancelled`), so a closed loader's threads do not outlive it.
        """
        rel = path.lstrip("/")
        url = self.url + rel
        try:
            resp = self.retry.send(
                lambda: self._http().request(method, rel, **kwargs),
                what=f"{method} {url}",
                describe=_describe,
                cancel=cancel,
                sleep=self._sleep,
            )
        except RetriesExhausted as e:
            last = e.last
            etype, message = (None, str(last)) if last.response is None else _error_of(last.response)
            raise RetryBudgetExhausted(
                message, attempts=e.attempts, status=last.status, error_type=etype, url=url
            ) from last.error
        if resp.status_code >= 400:
            etype, message = _error_of(resp)
            raise error_for_status(resp.status_code, message, error_type=etype, url=url)
        return resp
