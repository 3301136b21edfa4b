"""How many sample reads run at once, and a separate lane for health checks.

FastAPI runs synchronous routes in one shared pool of 40 threads. Under 64 clients that pool decoded
and encoded up to 40 batches at once: on 2 cores no more throughput than a few, but the server's
memory peaked at 1.3 GB (a decoded batch and its encoding per thread, beyond the row-group cache),
and `/readyz` queued behind them, so a container healthcheck with a 5 s timeout could fail on a
healthy server that was merely busy, and an orchestrator would restart it under load.

So the batch and sample routes wait (on the event loop, holding no thread) for one of
`max_concurrent_reads` slots, which bounds their transient memory to about that many batches
(each batch is bounded by `max_response_tokens`), and `/readyz` runs in its own small lane that
reads never occupy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, TypeVar

import anyio
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

T = TypeVar("T")

HEALTH_THREADS = 2  # /readyz at once: it only reads the catalogue's state (and rescans when that is stale)


class Limits:
    """The read slots and the health lane of one app (`app.state.limits`)."""

    def __init__(self, max_concurrent_reads: int) -> None:
        self.reads = anyio.CapacityLimiter(max_concurrent_reads)
        self.health = anyio.CapacityLimiter(HEALTH_THREADS)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread once a read slot is free."""
        return await anyio.to_thread.run_sync(partial(fn, *args), limiter=self.reads)

    async def check(self, fn: Callable[[], T]) -> T:
        """`fn()` in a worker thread of the health lane (never behind reads)."""
        return await anyio.to_thread.run_sync(fn, limiter=self.health)


class LimitsCollector(Collector):
    """`lopd_reads_in_progress` and `lopd_reads_waiting`, read from the limiter at every scrape."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.limits.reads.statistics()
        yield GaugeMetricFamily(
            "lopd_reads_in_progress",
            "Batch and sample requests being read and encoded now (at most max_concurrent_reads).",
            value=stats.borrowed_tokens,
        )
        yield GaugeMetricFamily(
            "lopd_reads_waiting",
            "Batch and sample requests waiting for a read slot (max_concurrent_reads are busy).",
            value=stats.tasks_waiting,
        )
