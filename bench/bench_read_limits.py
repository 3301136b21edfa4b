"""Read slots (`--max-concurrent-reads`): the server's memory, throughput and /readyz latency under load.

One `lopd serve` per setting, fresh (so its peak RSS is its own), each loaded by the same clients as
`bench_load.py` (64 threads in 4 processes: 80% Arrow batches, 10% single samples, 10% catalogue)
while a prober asks `/readyz` every 0.2 s, as a container healthcheck would. Settings: 40 (what the
shared 40-thread pool allowed before read slots existed), the default 8, and 2. Ratios are against
the 40 row of the same run.

    python bench/bench_read_limits.py            # about 2 minutes
    python bench/bench_read_limits.py --quick    # about 40 seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _common import parse_with_defaults, print_table, write_json  # noqa: E402
from bench_load import (  # noqa: E402
    RssSampler,
    add_load_options,
    lopd_serve,
    rss_mb,
    run_clients,
    store_and_tokens,
    summarise,
)
from bench_serving import cpu_seconds  # noqa: E402

DEFAULTS: dict[str, Any] = dict(
    clients=64, processes=4, duration=20.0, samples=2000, batch_size=32, prompt_len="50,300", response_len="100,1000",
    limits="40,8,2",
)  # fmt: skip
QUICK: dict[str, Any] = dict(duration=6.0, samples=400)


class ReadyzProber:
    """GET /readyz every 0.2 s (5 s timeout, as docker-compose.yml's healthcheck) while a row runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=5.0) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = c.get(f"{self.url}/readyz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - t0)
                self.failures += not ok
                self._stop.wait(0.2)

    def __enter__(self) -> ReadyzProber:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_options(p, DEFAULTS)
    p.add_argument("--name", default="read_limits", help="results go to bench/results/<name>.json")
    p.add_argument("--limits", help=f"--max-concurrent-reads values, comma-separated (default {DEFAULTS['limits']})")
    return parse_with_defaults(p, argv, DEFAULTS, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limits = [int(x) for x in str(args.limits).split(",")]
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-read-limits-") as tmp:
        store, tokens, info = store_and_tokens(Path(tmp), args)
        for limit in limits:
            env = {"LOPD_MAX_CONCURRENT_READS": str(limit)}
            with lopd_serve(store, tokens, Path(tmp) / f"server-{limit}.log", env) as (url, pid):
                run_clients(url, args.clients, args.processes, args, min(3.0, args.duration / 2))  # warm-up
                cpu0 = cpu_seconds(pid)
                with RssSampler(pid) as rss, ReadyzProber(url) as probe:
                    records = run_clients(url, args.clients, args.processes, args)
                row = summarise(f"max_concurrent_reads={limit}", records, args.duration, rss.samples)
                row["max_concurrent_reads"] = limit
                row["server_cpu_s"] = cpu_seconds(pid) - cpu0
                row["server_peak_rss_mb"] = rss_mb(pid, "VmHWM")  # over the server's life: warm-up included
                batch = [r[2] for r in records if r[0] == "batch" and r[1] == "200"]
                row["batch_p99_ms"] = float(np.percentile(batch, 99) * 1e3)
                lat = np.array(probe.latencies)
                row["readyz_probes"] = len(lat)
                row["readyz_failures"] = probe.failures
                row["readyz_p50_ms"] = float(np.percentile(lat, 50) * 1e3)
                row["readyz_p99_ms"] = float(np.percentile(lat, 99) * 1e3)
                row["readyz_max_ms"] = float(lat.max() * 1e3)
            rows.append(row)
            print(
                f"  {row['row']}: {row['requests']:,} requests, {row['errors']} errors, peak RSS "
                f"{row['server_peak_rss_mb']:.0f} MB, /readyz p99 {row['readyz_p99_ms']:.0f} ms",
                flush=True,
            )
    base = rows[0]
    for r in rows:
        r["requests_vs_first"] = r["requests_per_s"] / base["requests_per_s"]
        r["peak_rss_vs_first"] = r["server_peak_rss_mb"] / base["server_peak_rss_mb"]
    print_table(
        f"read slots: {args.clients} clients, {args.duration:g}s per row, batches of {args.batch_size}, "
        f"{os.cpu_count()} cores, loopback, auth on; ratios against the first row",
        ["max_concurrent_reads", "requests", "errors", "req/s", "vs first", "batch p50 ms", "batch p99 ms",
         "peak RSS MB", "vs first", "/readyz p50 ms", "/readyz p99 ms", "/readyz max ms", "/readyz failed",
         "server cores"],
        [[r["max_concurrent_reads"], r["requests"], r["errors"], r["requests_per_s"], r["requests_vs_first"],
          r["by_kind_p50_ms"].get("batch", float("nan")), r["batch_p99_ms"], r["server_peak_rss_mb"],
          r["peak_rss_vs_first"], r["readyz_p50_ms"], r["readyz_p99_ms"], r["readyz_max_ms"],
          r["readyz_failures"], r["server_cpu_s"] / args.duration] for r in rows],
    )  # fmt: skip
    path = write_json(args.name, {"load_average_1min_at_start": load_at_start, "store": info, "rows": rows}, args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
