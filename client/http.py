"""`StoreClient`: the training job's view of a `lopd serve` endpoint (docs/http-api.md, v1).

Why it looks the way it does:

* One keep-alive `httpx.Client` per process: a trainer fetches a batch every few hundred
  milliseconds, and a fresh TCP (or TLS) connection per batch would cost more than the request.
  The client is rebuilt after a fork and dropped on pickling, so the same `StoreClient` can be
  handed to DataLoader worker processes.
* Bounded retries with exponential backoff and jitter on connection errors, 429 and 5xx only.
  Those are transient (a restarting server, a load balancer, a rate limit); the jitter keeps
  many ranks that failed together from retrying in lockstep. `Retry-After` is honoured because
  the server knows better than our backoff when it will be ready. Any other 4xx is a bug in the
  request (or a missing dataset): retrying cannot fix it, so it is raised at once with the
  server's message.
* Batches travel as Arrow IPC streams: float32 log-probs arrive bit-exact and decode without a
  Python loop (about 5x faster than JSON end to end).
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pyarrow as pa

try:  # a third of a JSON batch's cost is parsing; orjson halves it where installed (bench/bench_serving.py)
    from orjson import loads as _loads
except ImportError:  # the client's base install does not need it
    from json import loads as _loads

from .errors import (
    Cancelled,
    ProtocolError,
    RemoteInvalidInput,
    RemoteNotFound,
    RetryBudgetExhausted,
    ServerError,
    Unauthorized,
)
from .types import DatasetInfo, Sample

log = logging.getLogger(__name__)

ARROW_STREAM = "application/vnd.apache.arrow.stream"
REQUIRED_COLUMNS = ("sample_id", "prompt_ids", "response_ids", "teacher_logprobs", "rollout_logprobs")
# Schema metadata keys under which `fetch` records where a table came from.
META_DATASET = b"lopd.dataset"
META_VERSION = b"lopd.version"
META_CONTENT_HASH = b"lopd.content_hash"

_RETRIABLE = frozenset({408, 429})
_ERROR_CLASSES: dict[int, type[ServerError]] = {
    400: RemoteInvalidInput,
    401: Unauthorized,
    403: Unauthorized,
    404: RemoteNotFound,
    405: RemoteInvalidInput,
    409: RemoteInvalidInput,
    413: RemoteInvalidInput,
    422: RemoteInvalidInput,
}


def _is_retriable(status: int) -> bool:
    return status in _RETRIABLE or status >= 500


def _error_of(resp: httpx.Response) -> tuple[str | None, str]:
    """(error.type, error.message) from the contract's error JSON, or the raw body when it is not one."""
    try:
        err = resp.json()["error"]
        return str(err.get("type")), str(err.get("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        text = resp.text.strip()
        return None, (text[:500] if text else resp.reason_phrase or "no message")


def _retry_after_s(resp: httpx.Response) -> float | None:
    """Seconds asked for by a `Retry-After` header (delta-seconds or an HTTP date), else None."""
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class StoreClient:
    """A client of one lightning-opd server: catalogue, manifests, stats and sample batches.

    `retries` is the number of retries after the first attempt (so at most `retries + 1`
    requests per call). `transport` replaces the network (tests use `httpx.MockTransport`).
    Thread-safe: prefetch threads share one connection pool.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout = 60.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_retry_after_s: float = 300.0,
        max_indices_per_request: int = 4096,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries is {retries}; it must be 0 (no retry) or more")
        if max_indices_per_request < 1:
            raise ValueError(f"max_indices_per_request is {max_indices_per_request}; it must be at least 1")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/") + "/"
        self.token = token
        self.timeout = (
            timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout, connect=min(10.0, timeout))
        )
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.max_indices_per_request = max_indices_per_request
        self._transport = transport
        self._sleep = sleep
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._pid = -1

    # -- connection management -------------------------------------------------------------

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
        """Close the connection pool (the client can still be used: it reconnects on demand)."""
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client = None

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def __repr__(self) -> str:
        return f"StoreClient({self.url!r}, retries={self.retries})"

    # -- the retry loop ----------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        # "Equal jitter": at least half the exponential delay, so retries do spread out over
        # time, plus a random half, so ranks that failed together do not retry together.
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return base / 2 + self._rng.uniform(0, base / 2)

    def request(
        self, method: str, path: str, *, cancel: threading.Event | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send a request, retrying transient failures; return a 2xx/3xx response or raise.

        Raises `RetryBudgetExhausted` when connection errors, 429 or 5xx outlast `retries`, and
        the `ServerError` subclass matching any other error status at once. Setting `cancel`
        stops the retrying (`Cancelled`), so a closed loader's threads do not outlive it.
        """
        url = self.url + path.lstrip("/")
        attempts = self.retries + 1
        for attempt in range(attempts):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{method} {url} cancelled")
            try:
                resp = self._http().request(method, path.lstrip("/"), **kwargs)
            except httpx.TransportError as e:  # connect/read/write errors and timeouts
                status, etype, message = None, None, f"{type(e).__name__}: {e}"
                delay = self._backoff(attempt)
            else:
                if resp.status_code < 400:
                    return resp
                status = resp.status_code
                etype, message = _error_of(resp)
                if not _is_retriable(status):
                    cls = _ERROR_CLASSES.get(status, ServerError)
                    raise cls(message, status=status, error_type=etype, url=url)
                asked = _retry_after_s(resp)
                delay = min(asked, self.max_retry_after_s) if asked is not None else self._backoff(attempt)
            if cancel is not None and cancel.is_set():  # e.g. the connection was closed under us
                raise Cancelled(f"{method} {url} cancelled")
            if attempt + 1 == attempts:
                raise RetryBudgetExhausted(message, attempts=attempts, status=status, error_type=etype, url=url)
            log.warning(
                "%s %s failed (%s); retry %d of %d in %.2fs", method, url, status or message, attempt + 1,
                self.retries, delay,
            )  # fmt: skip
            if cancel is not None:
                if cancel.wait(delay):
                    raise Cancelled(f"{method} {url} cancelled")
            else:
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.request(method, path, **kwargs)
        try:
            return _loads(resp.content)
        except ValueError as e:
            raise ProtocolError(f"expected JSON, got {resp.headers.get('content-type')!r}", url=str(resp.url)) from e

    @staticmethod
    def _dataset_path(name: str, suffix: str = "") -> str:
        # The name is a path segment: quote everything, '/' included, so it can never climb out.
        return f"v1/datasets/{quote(name, safe='')}{suffix}"

    @staticmethod
    def _version_params(version: int | None) -> dict[str, int]:
        return {} if version is None else {"version": int(version)}

    # -- routes ------------------------------------------------------------------------------

    def livez(self) -> bool:
        """True when the server process answers (no retry: this is a probe)."""
        try:
            return self._http().get("livez").status_code == 200
        except httpx.TransportError:
            return False

    def readyz(self) -> dict[str, Any]:
        """The readiness answer, 200 or 503 alike (`{"status": "ready" | "unavailable", ...}`)."""
        resp = self._http().get("readyz")
        try:
            body = resp.json()
        except ValueError:
            body = {"status": "unavailable", "problems": [resp.text[:500]]}
        return body if isinstance(body, dict) else {"status": "unavailable", "problems": [str(body)]}

    def datasets(self) -> list[DatasetInfo]:
        """Every dataset the server serves, at its latest version."""
        body = self._json("GET", "v1/datasets")
        try:
            return [DatasetInfo.from_json(d) for d in body["datasets"]]
        except (KeyError, TypeError) as e:
            raise ProtocolError(f"malformed /v1/datasets answer: {e}") from e

    def manifest(self, name: str, version: int | None = None) -> DatasetInfo:
        """A dataset version's manifest (latest by default); the full JSON is in `.raw`."""
        return DatasetInfo.from_json(self._json("GET", self._dataset_path(name), params=self._version_params(version)))

    def coverage(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Coverage stats (`CoverageStats`) as JSON, including runs still in progress."""
        return self._json("GET", self._dataset_path(name, "/coverage"), params=self._version_params(version))

    def consistency(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Consistency stats (`ConsistencyStats`) as JSON: fingerprints, verdict, log-prob distribution."""
        return self._json("GET", self._dataset_path(name, "/consistency"), params=self._version_params(version))

    def sample(self, name: str, index: int, version: int | None = None) -> Sample:
        """One sample by dataset index (JSON route; for inspection rather than training)."""
        body = self._json(
            "GET", self._dataset_path(name, f"/samples/{int(index)}"), params=self._version_params(version)
        )
        return Sample.from_json(body)

    def _chunks(self, indices: Sequence[int] | np.ndarray) -> list[list[int]]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1).tolist()
        step = self.max_indices_per_request
        return [idx[i : i + step] for i in range(0, len(idx), step)] or [[]]

    def fetch(
        self,
        name: str,
        indices: Sequence[int] | np.ndarray,
        version: int | None = None,
        *,
        expected_content_hash: str | None = None,
        cancel: threading.Event | None = None,
    ) -> pa.Table:
        """The samples at `indices`, in that order, as an Arrow table of the store schema.

        The table's schema metadata records the dataset, version and content hash the server
        served (`META_*` keys). With `expected_content_hash`, a batch from other content is
        refused rather than silently mixed into an epoch; `cancel` abandons retries. Requests above
        `max_indices_per_request` are split (the server's limit is 4096 by default).
        """
        tables: list[pa.Table] = []
        served: dict[bytes, bytes] = {}
        for chunk in self._chunks(indices):
            resp = self.request(
                "POST",
                self._dataset_path(name, "/batch"),
                json={"indices": chunk, "version": None if version is None else int(version)},
                headers={"Accept": ARROW_STREAM},
                cancel=cancel,
            )
            table = self._read_arrow(resp)
            meta = {
                META_DATASET: resp.headers.get("x-lopd-dataset", name).encode(),
                META_VERSION: resp.headers.get("x-lopd-version", "" if version is None else str(version)).encode(),
                META_CONTENT_HASH: resp.headers.get("x-lopd-content-hash", "").encode(),
            }
            if served and meta != served:
                raise ProtocolError(f"parts of one fetch came from different versions: {served} and {meta}")
            served = meta
            if table.num_rows != len(chunk):
                raise ProtocolError(f"asked for {len(chunk)} samples, got {table.num_rows}", url=str(resp.url))
            tables.append(table)
        got = served.get(META_CONTENT_HASH, b"").decode()
        if expected_content_hash is not None and got and got != expected_content_hash:
            raise ProtocolError(
                f"dataset {name!r} v{version} is now served with content hash {got}, not {expected_content_hash}: "
                "the data changed under a pinned version; the server's store was tampered with"
            )
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        return table.replace_schema_metadata(served)

    @staticmethod
    def _read_arrow(resp: httpx.Response) -> pa.Table:
        ctype = resp.headers.get("content-type", "")
        if ARROW_STREAM not in ctype:
            raise ProtocolError(f"expected {ARROW_STREAM}, got {ctype!r}", url=str(resp.url))
        try:
            with pa.ipc.open_stream(resp.content) as reader:
                table = reader.read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise ProtocolError(f"unreadable Arrow IPC stream: {e}", url=str(resp.url)) from e
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ProtocolError(f"the batch lacks columns {missing}", url=str(resp.url))
        return table.select(list(REQUIRED_COLUMNS))

    def fetch_json(self, name: str, indices: Sequence[int] | np.ndarray, version: int | None = None) -> list[Sample]:
        """Like `fetch`, through the JSON form of the batch route (slower; for tools and debugging)."""
        out: list[Sample] = []
        for chunk in self._chunks(indices):
            body = self._json(
                "POST",
                self._dataset_path(name, "/batch"),
                json={"indices": chunk, "version": None if version is None else int(version)},
                headers={"Accept": "application/json"},
            )
            try:
                out.extend(Sample.from_json(s) for s in body["samples"])
            except (KeyError, TypeError) as e:
                raise ProtocolError(f"malformed JSON batch answer: {e}") from e
        return out
