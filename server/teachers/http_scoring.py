"""The HTTP machinery of the server-backed teachers: one connection pool, retries, bounded concurrency.

A server-backed teacher (SGLang, a vLLM OpenAI-compatible server; `http_teacher.py`) scores one
record per request, so throughput comes from keeping several requests in flight (the server
batches them) while the job stays resumable and deterministic:

* **Bounded concurrency, input order.** One `httpx.Client` (thread-safe, pooled connections)
  and a thread pool of `max_concurrency` workers; results come back in input order whatever
  order the answers arrive in. The first record that fails cancels the rest, so a part either
  scores completely or raises before anything is written (the precompute job then redoes only
  that part on resume).
* **Retries only where retrying can help.** Connection errors, timeouts, dropped connections,
  429 and 5xx are retried with exponential backoff (with jitter, honouring `Retry-After`), a
  bounded number of times. Any other 4xx means the request itself is wrong (a record longer
  than the server's context, an unknown model name): retrying would fail the same way, so it
  raises at once with the server's own message and the record it concerns.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from lopd.errors import InvalidInput, TeacherServerError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Longest wait a server's Retry-After may impose before one retry; a larger value is treated as this.
MAX_RETRY_AFTER_S = 300.0
# How much of a server's error body goes into our messages (they can be whole HTML pages).
_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a request is retried after a transient failure."""

    max_attempts: int = 6  # in all, the first try included
    backoff_s: float = 0.5  # the wait before the 2nd attempt; doubles each time
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidInput(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise InvalidInput("backoff times must not be negative")

    def backoff(self, attempt: int) -> float:
        """Wait after failed attempt `attempt` (1-based): exponential, capped, with jitter.

        The jitter (a uniform factor in [0.5, 1]) keeps the workers of one job, and the jobs of
        many, from hitting a recovering server in lockstep.
        """
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


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


def retry_after_seconds(response: httpx.Response) -> float | None:
    """`Retry-After` as seconds (delta-seconds or an HTTP date), capped; None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class HTTPClient:
    """One connection pool to one server: JSON requests with retries, and an ordered, bounded map."""

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
        """Send with retries on transient failures; returns the first answer that is not 429 or 5xx.

        Raises `TeacherServerError` once `retry.max_attempts` attempts have all failed transiently.
        """
        problem, connection_problem = "", False
        attempts = self.retry.max_attempts
        for attempt in range(1, attempts + 1):
            if self._closed.is_set():
                raise TeacherServerError(f"{what}: the {self.backend} teacher was closed", record=record)
            wait_s: float
            try:
                response = self._client.request(method, path, json=body)
            except httpx.TransportError as e:  # refused, reset, dropped without an answer, timed out
                problem = f"{type(e).__name__}: {e or 'no details'}"
                wait_s = self.retry.backoff(attempt)
                connection_problem = True
            else:
                if response.status_code != 429 and response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}: {server_message(response)}"
                after = retry_after_seconds(response)
                wait_s = after if after is not None else self.retry.backoff(attempt)
                connection_problem = False
            if attempt == attempts:
                break
            log.warning(
                "%s server %s: %s failed (%s); retry %d of %d in %.2fs",
                self.backend, self.base_url, what, problem, attempt, attempts - 1, wait_s,
            )  # fmt: skip
            time.sleep(wait_s)
        hint = f" Is the {self.backend} server running, and is --teacher-url its address?" if connection_problem else ""
        raise TeacherServerError(
            f"{what}: the {self.backend} server at {self.base_url} failed {attempts} attempts in a row; "
            f"last error: {problem}.{hint}",
            record=record,
        )

    def get_json(self, path: str, *, what: str) -> Any:
        """GET a JSON document; any error status is a `TeacherServerError` naming the server's message."""
        return self.parse_json(self.request("GET", path, what=what), what=what, record=None)

    def post_json(self, path: str, body: Any, *, what: str, record: int | None = None) -> Any:
        """POST JSON and return the JSON answer; a 4xx other than 429 raises at once (not retried)."""
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
