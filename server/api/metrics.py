"""Prometheus metrics of one app, in its own registry (two apps in one process never collide).

Labels are bounded on purpose: routes are their templates (`/v1/datasets/{name}/batch`, not the
raw path), labs come from the tokens file, datasets from the store's catalogue.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import ANONYMOUS

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
