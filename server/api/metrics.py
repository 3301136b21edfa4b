"""Prometheus metrics of one app, in its own registry (two apps in one process never collide).

Labels are bounded on purpose: routes are their templates (`/v1/datasets/{name}/batch`, not the
raw path), labs come from the tokens file, datasets from the store's catalogue.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import ANONYMOUS

if TYPE_CHECKING:
    from .catalog import Catalog

UNMATCHED = "<unmatched>"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lopd_http_requests",
            "HTTP requests answered, by route template, method, status and lab.",
            ["route", "method", "status", "lab"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lopd_http_request_duration_seconds",
            "Time from request to the end of the response body, by route template and method.",
            ["route", "method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.samples = Counter(
            "lopd_samples_served",
            "Samples served (batch and single-sample routes), by dataset, version and lab.",
            ["dataset", "version", "lab"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "lopd_bytes_served",
            "Response body bytes of sample payloads, by dataset, version and lab.",
            ["dataset", "version", "lab"],
            registry=self.registry,
        )

        self._watching: Catalog | None = None

    @property
    def watching(self) -> bool:
        return self._watching is not None

    def watch(self, catalog: Catalog) -> None:
        """Report `catalog`'s integrity (damaged versions, checksum failures, bytes scrubbed) at every scrape."""
        if self._watching is None:
            self._watching = catalog
            self.registry.register(_IntegrityCollector(catalog))

    def served(self, dataset: str, version: int, lab: str, samples: int, nbytes: int) -> None:
        self.samples.labels(dataset, str(version), lab).inc(samples)
        self.bytes.labels(dataset, str(version), lab).inc(nbytes)


class MetricsMiddleware:
    """Pure ASGI (no per-request task or body buffering): counts and times every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.metrics.watching:  # the app's catalogue (app.state.catalog), found on the first request
            catalog = getattr(getattr(scope.get("app"), "state", None), "catalog", None)
            if catalog is not None:
                self.metrics.watch(catalog)
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:  # an exception still counts, as the 500 the outer error handler sends
            route = getattr(scope.get("route"), "path", UNMATCHED)
            lab = (scope.get("state") or {}).get("lab", ANONYMOUS)
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.metrics.requests.labels(route, method, str(status), lab).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)


class _IntegrityCollector(Collector):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = self.catalog.integrity()
        damaged = GaugeMetricFamily(
            "lopd_damaged_versions",
            "Dataset versions not served because a checksum or decode check failed (1 per version; /readyz names "
            "the file).",
            labels=["dataset", "version"],
        )
        for name, version in state.damaged:
            damaged.add_metric([name, str(version)], 1)
        yield damaged
        failures = CounterMetricFamily(
            "lopd_integrity_failures",
            "Checksum or decode failures, by when they were found: open (first verification) or read (while serving: "
            "a read or the scrub).",
            labels=["found"],
        )
        for found, n in sorted(state.failures.items()):
            failures.add_metric([found], n)
        yield failures
        yield CounterMetricFamily(
            "lopd_scrub_bytes",
            "Bytes of published shards re-hashed by the background scrub.",
            value=state.scrubbed_bytes,
        )
