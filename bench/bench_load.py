"""Load check: many concurrent clients against one real `lopd serve`, with and without hostile ones.

`lopd serve` runs in its own process on loopback with its default settings and a tokens file (auth
on, as a shared deployment runs). Client threads, spread over a few processes, each with its own
connection, send a mix of requests for a fixed time: a random Arrow batch of `--batch-size`
indices (80%), one sample as JSON (10%), the catalogue (10%); every request carries a token.
Three rows, each `--duration` seconds:

After a short unrecorded warm-up with all clients (thread pools, page cache, allocator pools):

* `1 client`: the baseline, the same mix unloaded;
* `N clients`: the load (default 64, the load check of issue 13);
* `N clients + slow`: the same plus `--slow` slowloris connections that trickle a header line every
  0.5 s and reconnect whenever the server drops them (it must, after `header_timeout_s`), and
  `--slow` clients that offer a 40 MB chunked body behind a small Content-Length (refused at once).

Reported per row: requests, errors (any answer but 200, or no answer), requests/s, p50/p99/max
latency as the clients see it (on a small machine it includes their own queueing), the server's
RSS (start, peak and end of the row) and CPU, and for the hostile row how often slow connections
were dropped and how long each was held. Latency ratios are against the 1-client row of the same run.

    python bench/bench_load.py                     # about 2 minutes (64 clients, 30 s per row)
    python bench/bench_load.py --quick             # about 40 seconds
    python bench/bench_load.py --clients 128 --duration 60 --processes 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from _common import parse_with_defaults, print_table, timed, write_json  # noqa: E402
from bench_serving import DATASET, build_store, cpu_seconds, free_port  # noqa: E402

TOKEN = "bench-load-token-0123456789"
DEFAULTS: dict[str, Any] = dict(
    clients=64, processes=4, duration=30.0, samples=2000, batch_size=32, slow=16, prompt_len="50,300",
    response_len="100,1000",
)  # fmt: skip
QUICK: dict[str, Any] = dict(clients=32, duration=8.0, samples=400, slow=8)


# ---------------------------------------------------------------- the server


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@contextmanager
def lopd_serve(
    store: Path, tokens: Path, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """`lopd serve STORE --port P --tokens-file T` (defaults otherwise, or `env`'s LOPD_*) in its own process."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "lopd", "serve", str(store), "--port", str(port), "--tokens-file", str(tokens)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"lopd serve exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"lopd serve not ready after 60 s:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RssSampler:
    """The server's RSS every 0.25 s while a row runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_mb(self.pid))
            self._stop.wait(0.25)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(rss_mb(self.pid))


# ---------------------------------------------------------------- well-behaved clients


def _client_process(
    url: str, threads: int, duration: float, num_samples: int, batch_size: int, seed: int, barrier: Any, out: Any
) -> None:
    """`threads` clients, each with its own connection, sending the request mix until the deadline."""
    import httpx

    records: list[list[tuple[str, str, float]]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)

    def client(k: int) -> None:
        rng = np.random.default_rng(seed * 1000 + k)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            c.get("/v1/datasets")  # connect before the clock starts
            start.wait()
            deadline = time.monotonic() + duration
            while time.monotonic() < deadline:
                op = rng.random()
                t0 = time.perf_counter()
                try:
                    if op < 0.8:
                        kind = "batch"
                        idx = rng.choice(num_samples, batch_size, replace=False).tolist()
                        r = c.post(f"/v1/datasets/{DATASET}/batch", json={"indices": idx})
                    elif op < 0.9:
                        kind = "sample"
                        r = c.get(f"/v1/datasets/{DATASET}/samples/{int(rng.integers(num_samples))}")
                    else:
                        kind = "catalogue"
                        r = c.get("/v1/datasets")
                    outcome = str(r.status_code)
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                records[k].append((kind, outcome, time.perf_counter() - t0))

    workers = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    start.wait()
    for w in workers:
        w.join()
    out.put([r for rs in records for r in rs])


def run_clients(
    url: str, clients: int, processes: int, args: argparse.Namespace, duration: float | None = None
) -> list[tuple[str, str, float]]:
    duration = args.duration if duration is None else duration
    ctx = mp.get_context("spawn")
    processes = max(1, min(processes, clients))
    per = [clients // processes + (1 if k < clients % processes else 0) for k in range(processes)]
    barrier = ctx.Barrier(processes + 1)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_client_process,
            args=(url, n, duration, args.samples, args.batch_size, args.seed + k, barrier, out),
            daemon=True,
        )
        for k, n in enumerate(per)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    records = [r for _ in procs for r in out.get(timeout=duration + 300)]
    for p in procs:
        p.join(timeout=30)
    return records


# ---------------------------------------------------------------- hostile clients


class Hostile:
    """Slowloris connections (reconnecting whenever dropped) and smuggled 40 MB bodies, until stopped."""

    def __init__(self, port: int, slow: int) -> None:
        self.port = port
        self.slow = slow
        self.stop = threading.Event()
        self.held_s: list[float] = []  # how long each slow connection was held before the server dropped it
        self.dropped_with: dict[str, int] = {}
        self.smuggled: dict[str, int] = {}
        self.smuggle_s: list[float] = []
        self.threads = [threading.Thread(target=self._slowloris, daemon=True) for _ in range(slow)]
        self.threads += [threading.Thread(target=self._smuggler, daemon=True) for _ in range(max(1, slow // 8))]

    def __enter__(self) -> Hostile:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _slowloris(self) -> None:
        while not self.stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            except OSError:
                self.stop.wait(0.5)
                continue
            start = time.monotonic()
            answer = b""
            try:
                s.sendall(b"GET /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                s.setblocking(False)
                while not self.stop.is_set():
                    try:
                        s.send(b"X-Slow: 1\r\n")
                    except BlockingIOError:
                        pass
                    if self.stop.wait(0.5):
                        break
                    try:
                        chunk = s.recv(4096)
                    except BlockingIOError:
                        continue
                    answer += chunk
                    if not chunk:  # the server closed it
                        self.held_s.append(time.monotonic() - start)
                        status = answer[9:12].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"
                        self.dropped_with[status] = self.dropped_with.get(status, 0) + 1
                        break
            except OSError:
                self.held_s.append(time.monotonic() - start)
                self.dropped_with["reset"] = self.dropped_with.get("reset", 0) + 1
            finally:
                s.close()

    def _smuggler(self) -> None:
        head = (
            b"POST /v1/datasets/" + DATASET.encode() + b"/batch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 20\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"10000\r\n" + b"7" * 65536 + b"\r\n"
        while not self.stop.is_set():
            t0 = time.monotonic()
            answer = b""
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                    s.sendall(head + chunk)
                    answer = s.recv(4096)
                    sent = 1
                    while sent < 640:  # the rest of 40 MB, until the server stops reading
                        s.sendall(chunk)
                        sent += 1
            except OSError:
                pass
            status = answer[9:12].decode() if answer.startswith(b"HTTP/1.1 ") else "no answer"
            self.smuggled[status] = self.smuggled.get(status, 0) + 1
            self.smuggle_s.append(time.monotonic() - t0)
            self.stop.wait(1.0)


# ---------------------------------------------------------------- the rows


def summarise(name: str, records: list[tuple[str, str, float]], duration: float, rss: list[float]) -> dict[str, Any]:
    lat = np.array([r[2] for r in records]) if records else np.array([float("nan")])
    errors: dict[str, int] = {}
    for _, outcome, _ in records:
        if outcome != "200":
            errors[outcome] = errors.get(outcome, 0) + 1
    return {
        "row": name,
        "requests": len(records),
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "requests_per_s": len(records) / duration,
        "latency_p50_ms": float(np.percentile(lat, 50) * 1e3),
        "latency_p99_ms": float(np.percentile(lat, 99) * 1e3),
        "latency_max_ms": float(lat.max() * 1e3),
        "by_kind_p50_ms": {
            k: float(np.percentile([r[2] for r in records if r[0] == k], 50) * 1e3)
            for k in sorted({r[0] for r in records})
        },
        "server_rss_mb_start": rss[0],
        "server_rss_mb_peak": max(rss),
        "server_rss_mb_end": rss[-1],
    }


def add_load_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The clients' and the store's options, shared by the benchmarks that load a server this way."""
    p.add_argument("--quick", action="store_true", help="small settings, about 40 seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, help=f"concurrent clients under load (default {defaults['clients']})")
    p.add_argument("--processes", type=int, help=f"client processes (default {defaults['processes']})")
    p.add_argument("--duration", type=float, help=f"seconds per row (default {defaults['duration']})")
    p.add_argument("--samples", type=int, help=f"samples in the store (default {defaults['samples']})")
    p.add_argument("--batch-size", type=int, help=f"indices per batch (default {defaults['batch_size']})")
    p.add_argument("--prompt-len", help=f"prompt tokens, 'lo,hi' (default {defaults['prompt_len']})")
    p.add_argument("--response-len", help=f"response tokens, 'lo,hi' (default {defaults['response_len']})")


def store_and_tokens(tmp: Path, args: argparse.Namespace) -> tuple[Path, Path, dict[str, Any]]:
    """The store the clients read (`add_load_options`' sizes) and a tokens file with TOKEN; prints its size."""
    store = tmp / "store"
    lo_hi = [tuple(int(x) for x in str(r).split(",")) for r in (args.prompt_len, args.response_len)]
    build_s, info = timed(lambda: build_store(store, args.samples, lo_hi[0], lo_hi[1], seed=args.seed))  # type: ignore[arg-type]
    tokens = tmp / "tokens.json"
    tokens.write_text(json.dumps({TOKEN: "bench"}))
    tokens.chmod(0o600)
    print(f"store: {info['samples']:,} samples, {info['tokens_per_sample']:,.0f} tokens/sample ({build_s:.1f}s)")
    return store, tokens, info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_options(p, DEFAULTS)
    p.add_argument("--name", default="load", help="results go to bench/results/<name>.json")
    p.add_argument("--slow", type=int, help=f"slowloris connections in the hostile row (default {DEFAULTS['slow']})")
    return parse_with_defaults(p, argv, DEFAULTS, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        store, tokens, info = store_and_tokens(Path(tmp), args)
        with lopd_serve(store, tokens, Path(tmp) / "server.log") as (url, pid):
            port = int(url.rsplit(":", 1)[1])
            run_clients(url, args.clients, args.processes, args, min(5.0, args.duration / 2))  # warm-up, not kept
            plan = [("1 client", 1, False), (f"{args.clients} clients", args.clients, False)]
            plan.append((f"{args.clients} clients + {args.slow} slow", args.clients, True))
            for name, clients, hostile in plan:
                cpu0 = cpu_seconds(pid)
                with RssSampler(pid) as rss:
                    if hostile:
                        with Hostile(port, args.slow) as bad:
                            records = run_clients(url, clients, args.processes, args)
                    else:
                        records = run_clients(url, clients, args.processes, args)
                row = summarise(name, records, args.duration, rss.samples)
                row["clients"] = clients
                row["server_cpu_s"] = cpu_seconds(pid) - cpu0
                if hostile:
                    row["slow_connections_dropped"] = len(bad.held_s)
                    row["slow_dropped_with"] = bad.dropped_with
                    row["slow_held_s_median"] = float(np.median(bad.held_s)) if bad.held_s else float("nan")
                    row["smuggled_bodies"] = bad.smuggled
                    row["smuggle_refused_in_s_max"] = max(bad.smuggle_s) if bad.smuggle_s else float("nan")
                rows.append(row)
                print(
                    f"  {name}: {row['requests']:,} requests, {row['errors']} errors, "
                    f"p50 {row['latency_p50_ms']:.0f} ms, p99 {row['latency_p99_ms']:.0f} ms",
                    flush=True,
                )
            server_peak = rss_mb(pid, "VmHWM")
    base = rows[0]["latency_p50_ms"]
    print_table(
        f"load: {args.duration:g}s per row, batches of {args.batch_size}, {os.cpu_count()} cores, loopback, auth on",
        ["row", "requests", "errors", "req/s", "p50 ms", "p99 ms", "max ms", "p50 / 1 client", "RSS MB start",
         "RSS MB peak", "RSS MB end", "server cores"],
        [[r["row"], r["requests"], r["errors"], r["requests_per_s"], r["latency_p50_ms"], r["latency_p99_ms"],
          r["latency_max_ms"], r["latency_p50_ms"] / base, r["server_rss_mb_start"], r["server_rss_mb_peak"],
          r["server_rss_mb_end"], r["server_cpu_s"] / args.duration] for r in rows],
    )  # fmt: skip
    hostile_row = rows[-1]
    print(
        f"hostile row: {hostile_row['slow_connections_dropped']} slow connections dropped "
        f"({hostile_row['slow_dropped_with']}), held {hostile_row['slow_held_s_median']:.1f} s each (median); "
        f"smuggled 40 MB bodies: {hostile_row['smuggled_bodies']}, each refused within "
        f"{hostile_row['smuggle_refused_in_s_max']:.2f} s; server peak RSS over the run {server_peak:.0f} MB"
    )
    results = {
        "load_average_1min_at_start": load_at_start,
        "store": info,
        "rows": rows,
        "server_peak_rss_mb": server_peak,
    }
    path = write_json(args.name, results, args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
