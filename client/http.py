"""`StoreClient`: the training job's view of a `lopd serve` endpoint (docs/http-api.md, v1).

The routes of the HTTP contract (`lopd.http_contract`) as methods. The connection, the retries
(connection errors, 408, 429 and 5xx, with backoff and jitter, honouring `Retry-After`) and the
mapping of error answers to exceptions are the `Session`'s (`session.py`); decoding Arrow batches
is `payloads.py`'s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast
from urllib.parse import quote

import httpx
import numpy as np
import pyarrow as pa

try:  # a third of a JSON batch's cost is parsing; orjson halves it where installed (bench/bench_serving.py)
    from orjson import loads as _loads
except ImportError:  # the client's base install does not need it
    from json import loads as _loads  # type: ignore[assignment]

from lopd.http_contract import (
    ARROW_STREAM_MEDIA_TYPE,
    DATASETS_PATH,
    JSON_MEDIA_TYPE,
    LIVEZ_PATH,
    MAX_BATCH_INDICES,
    READYZ_PATH,
    BatchRequest,
    Column,
    UnavailableResponse,
    served_columns,
)
from lopd.retry import RetryPolicy

from .errors import ProtocolError
from .payloads import META_CONTENT_HASH, read_batch, served_metadata
from .session import Session
from .types import DatasetInfo, SampleArrays


class StoreClient:
    """A client of one lightning-opd server: catalogue, manifests, stats and sample batches.

    `retries`, `backoff_s`, `max_backoff_s` and `max_retry_after_s` are the `lopd.retry.RetryPolicy`
    of every request: `retries` is the number of retries after the first attempt (so at most
    `retries + 1` requests per call). `transport` replaces the network (tests use
    `httpx.MockTransport`). Thread-safe: prefetch threads share one connection pool.
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
        max_indices_per_request: int = MAX_BATCH_INDICES,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_indices_per_request < 1:
            raise ValueError(f"max_indices_per_request is {max_indices_per_request}; it must be at least 1")
        self.session = Session(
            url,
            token,
            timeout=(
                timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout, connect=min(10.0, timeout))
            ),
            retry=RetryPolicy(
                retries=retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s, max_retry_after_s=max_retry_after_s
            ),
            transport=transport,
            sleep=sleep,
        )
        self.max_indices_per_request = max_indices_per_request

    @property
    def url(self) -> str:
        """The server's base URL, with a trailing slash."""
        return self.session.url

    @property
    def token(self) -> str | None:
        return self.session.token

    @property
    def retries(self) -> int:
        """Retries after the first attempt of each request."""
        return self.session.retry.retries

    def close(self) -> None:
        """Close the connection pool (the client can still be used: it reconnects on demand)."""
        self.session.close()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StoreClient({self.url!r}, retries={self.retries})"

    def request(
        self, method: str, path: str, *, cancel: threading.Event | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send a request under the retry policy; return a 2xx/3xx response or raise (see `Session.request`)."""
        return self.session.request(method, path, cancel=cancel, **kwargs)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._decode_json(self.request(method, path, **kwargs))

    @staticmethod
    def _decode_json(resp: httpx.Response) -> Any:
        try:
            return _loads(resp.content)
        except ValueError as e:
            raise ProtocolError(f"expected JSON, got {resp.headers.get('content-type')!r}", url=str(resp.url)) from e

    @staticmethod
    def _dataset_path(name: str, suffix: str = "") -> str:
        # The name is a path segment: quote everything, '/' included, so it can never climb out.
        return f"{DATASETS_PATH}/{quote(name, safe='')}{suffix}"

    @staticmethod
    def _version_params(version: int | None) -> dict[str, int]:
        return {} if version is None else {"version": int(version)}

    # -- routes ------------------------------------------------------------------------------

    def livez(self) -> bool:
        """True when the server process answers (no retry: this is a probe)."""
        try:
            return self.session.probe(LIVEZ_PATH).status_code == 200
        except httpx.TransportError:
            return False

    def readyz(self) -> dict[str, Any]:
        """The readiness answer, 200 or 503 alike (`{"status": "ready" | "unavailable", ...}`)."""
        resp = self.session.probe(READYZ_PATH)
        try:
            body = resp.json()
        except ValueError:
            body = UnavailableResponse(problems=[resp.text[:500]]).model_dump()
        return body if isinstance(body, dict) else UnavailableResponse(problems=[str(body)]).model_dump()

    def datasets(self) -> list[DatasetInfo]:
        """Every dataset the server serves, at its latest version."""
        body = self._json("GET", DATASETS_PATH)
        try:
            return [DatasetInfo.from_json(d) for d in body["datasets"]]
        except (KeyError, TypeError) as e:
            raise ProtocolError(f"malformed {DATASETS_PATH} answer: {e}") from e

    def manifest(self, name: str, version: int | None = None) -> DatasetInfo:
        """A dataset version's manifest (latest by default); the full JSON is in `.raw`."""
        return DatasetInfo.from_json(self._json("GET", self._dataset_path(name), params=self._version_params(version)))

    def coverage(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Coverage stats (`CoverageStats`) as JSON, including runs still in progress."""
        return self._json("GET", self._dataset_path(name, "/coverage"), params=self._version_params(version))

    def consistency(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Consistency stats (`ConsistencyStats`) as JSON: fingerprints, verdict, log-prob distribution."""
        return self._json("GET", self._dataset_path(name, "/consistency"), params=self._version_params(version))

    def sample(self, name: str, index: int, version: int | None = None) -> SampleArrays:
        """One sample by dataset index (JSON route; for inspection rather than training)."""
        body = self._json(
            "GET", self._dataset_path(name, f"/samples/{int(index)}"), params=self._version_params(version)
        )
        return SampleArrays.from_json(body)

    def _chunks(self, indices: Sequence[int] | np.ndarray) -> list[list[int]]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1).tolist()
        step = self.max_indices_per_request
        return [idx[i : i + step] for i in range(0, len(idx), step)] or [[]]

    def _batch(
        self,
        name: str,
        chunk: list[int],
        version: int | None,
        accept: str,
        cancel: threading.Event | None = None,
        columns: Sequence[str] | None = None,
    ) -> httpx.Response:
        selected = None if columns is None else cast(list[Column], list(columns))  # the server checks the names
        body = BatchRequest.model_construct(
            indices=chunk, version=None if version is None else int(version), columns=selected
        )
        payload = body.model_dump()
        if columns is None:  # a request without `columns` is what every server version understands
            del payload["columns"]
        return self.request(
            "POST",
            self._dataset_path(name, "/batch"),
            json=payload,
            headers={"Accept": accept},
            cancel=cancel,
        )

    def fetch(
        self,
        name: str,
        indices: Sequence[int] | np.ndarray,
        version: int | None = None,
        *,
        expected_content_hash: str | None = None,
        cancel: threading.Event | None = None,
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        """The samples at `indices`, in that order, as an Arrow table of the served columns.

        `columns`: which columns (the contract's names; `sample_id` always comes), e.g.
        `(*SERVED_COLUMNS, *TOPK_COLUMNS)` for the teacher's top-k; default `SERVED_COLUMNS`.

        The table's schema metadata records the dataset, version and content hash the server
        served (`payloads.META_*` keys). With `expected_content_hash`, a batch from other content
        is refused rather than silently mixed into an epoch; `cancel` abandons retries. Requests
        above `max_indices_per_request` are split (the contract's default server limit,
        `MAX_BATCH_INDICES`, is its default).
        """
        tables: list[pa.Table] = []
        served: dict[bytes, bytes] = {}
        for chunk in self._chunks(indices):
            resp = self._batch(name, chunk, version, ARROW_STREAM_MEDIA_TYPE, cancel, columns)
            table = read_batch(resp, served_columns(columns))
            meta = served_metadata(resp, name, version)
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

    def fetch_json(
        self, name: str, indices: Sequence[int] | np.ndarray, version: int | None = None
    ) -> list[SampleArrays]:
        """Like `fetch`, through the JSON form of the batch route (slower; for tools and debugging)."""
        out: list[SampleArrays] = []
        for chunk in self._chunks(indices):
            body = self._decode_json(self._batch(name, chunk, version, JSON_MEDIA_TYPE))
            try:
                out.extend(SampleArrays.from_json(s) for s in body["samples"])
            except (KeyError, TypeError) as e:
                raise ProtocolError(f"malformed JSON batch answer: {e}") from e
        return out
