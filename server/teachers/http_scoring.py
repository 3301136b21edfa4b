"""The HTTP machinery of the server-backed teachers: one connection pool, retries, bounded concurrency.

A server-backed teacher (SGLang, a vLLM OpenAI-compatible server; `http_teacher.py`) scores one
record per request, so throughput comes from keeping several requests in flight (the server
batches them) while the job stays resumable and deterministic:

* **Bounded concurrency, input order.** One `httpx.Client` (thread-safe, pooled connections)
  and a thread pool of `max_concurrency` workers; results come back in input order whatever
  order the answers arrive in. The first record that fails cancels the rest, so a part either
  scores completely or raises before anything is written (the precompute job then redoes only
  that part on resume).
* **Retries only where retrying can help**, by the project's one policy (`lopd.retry`):
  connection errors, timeouts, dropped connections, 408, 429 and 5xx are retried with
  exponential backoff (with jitter, honouring `Retry-After`), a bounded number of times; closing
  the client ends a wait at once. Any other 4xx means the request itself is wrong (a record
  longer than the server's context, an unknown model name): retrying would fail the same way, so
  it raises at once with the server's own message and the record it concerns.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import httpx

from lopd.errors import Cancelled, InvalidInput, TeacherServerError
from lopd.retry import Failure, RetriesExhausted, RetryPolicy

T = TypeVar("T")

# How much of a server's error body goes into our messages (they can be whole HTML pages).
_MESSAGE_CHARS = 500


def server_message(response: httpx.Response) -> str:
    """The error message a server put in its answer (SGLang, vLLM and FastAPI shapes), shortened."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        text = response.text.strip()
        return text[:_MESSAGE_CHARS] or response.reason_phrase
    message: Any = body
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):  # vLLM (recent), SGLang, OpenAI
            message = err["message"]
        elif isinstance(err, str):
            message = err
        elif body.get("message"):  # vLLM (older): {"object": "error", "message": ...}
            message = body["message"]
        elif body.get("detail"):  # FastAPI
            message = body["detail"]
    text = message if isinstance(message, str) else json.dumps(message)
    return text[:_MESSAGE_CHARS]


def _describe(failure: Failure) -> str:
    """A failed attempt for logs and errors: the transport error, or the status and the server's message."""
    if failure.response is None:
        return str(failure)
    return f"{failure}: {server_message(failure.response)}"


class HTTPClient:
    """One connection pool to one server: JSON requests with retries, and an ordered, bounded map.

    `retry` is the `lopd.retry.RetryPolicy` of every request (`retries` after the first attempt).
    """

    def __init__(
        self,
        base_url: str,
        *,
        backend: str,
        max_concurrency: int = 8,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
        api_key: str | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise InvalidInput(f"the teacher URL must start with http:// or https://, got {base_url!r}")
        if max_concurrency < 1:
            raise InvalidInput(f"max_concurrency must be at least 1, got {max_concurrency}")
        if timeout_s <= 0:
            raise InvalidInput(f"timeout_s must be positive, got {timeout_s}")
        self.base_url = base_url.rstrip("/")
        self.backend = backend
        self.max_concurrency = max_concurrency
        self.retry = retry or RetryPolicy()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            # connect fails fast (retried); reading waits for a long record on a busy server
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )
        self._closed = threading.Event()

    def request(
        self, method: str, path: str, *, body: Any = None, what: str, record: int | None = None
    ) -> httpx.Response:
        """Send under the retry policy; returns the first answer that is not retriable (408, 429, 5xx).

        Raises `TeacherServerError` once all `retry.retries + 1` attempts have failed transiently,
        or when the client is closed meanwhile.
        """
        try:
            return self.retry.send(
                lambda: self._client.request(method, path, json=body),
                what=f"{self.backend} server {self.base_url}: {what}",
                describe=_describe,
                cancel=self._closed,
            )
        except Cancelled:
            raise TeacherServerError(f"{what}: the {self.backend} teacher was closed", record=record) from None
        except RetriesExhausted as e:
            hint = (
                f" Is the {self.backend} server running, and is --teacher-url its address?"
                if e.last.response is None
                else ""
            )
            raise TeacherServerError(
                f"{what}: the {self.backend} server at {self.base_url} failed {e.attempts} attempts in a row; "
                f"last error: {_describe(e.last)}.{hint}",
                record=record,
            ) from e.last.error

    def get_json(self, path: str, *, what: str) -> Any:
        """GET a JSON document; any error status is a `TeacherServerError` naming the server's message."""
        return self.parse_json(self.request("GET", path, what=what), what=what, record=None)

    def post_json(self, path: str, body: Any, *, what: str, record: int | None = None) -> Any:
        """POST JSON and return the JSON answer; a 4xx other than 408 and 429 raises at once (not retried)."""
        return self.parse_json(
            self.request("POST", path, body=body, what=what, record=record), what=what, record=record
        )

    def parse_json(self, response: httpx.Response, *, what: str, record: int | None = None) -> Any:
        """The JSON of an answer; an error status or a body that is not JSON raises `TeacherServerError`."""
        if response.status_code >= 400:
            raise TeacherServerError(
                f"{what}: the {self.backend} server at {self.base_url} refused the request with HTTP "
                f"{response.status_code} (not retried: the same request would fail again): {server_message(response)}",
                record=record,
            )
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise TeacherServerError(
                f"{what}: the {self.backend} server at {self.base_url} answered HTTP {response.status_code} "
                f"with a body that is not JSON ({e}): {response.text[:200]!r}",
                record=record,
            ) from e

    def map_ordered(self, n: int, fn: Callable[[int], T]) -> list[T]:
        """`[fn(0), ..., fn(n - 1)]` with at most `max_concurrency` calls running at once.

        The first call that raises cancels the calls not yet started, and its exception is raised
        once the running ones have finished (so no request outlives the call).
        """
        if n == 0:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, n), thread_name_prefix="lopd-teacher") as pool:
            futures = [pool.submit(fn, i) for i in range(n)]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                for f in pending:
                    f.cancel()
                raise failed.exception()  # type: ignore[misc]
            return [f.result() for f in futures]

    def close(self) -> None:
        self._closed.set()
        self._client.close()
