"""Benchmark the trainer's data wait: how much of a training loop is spent waiting for batches.

A simulated training loop consumes batches from `OPDLoader` exactly as `lopd train` does (the
data wait of a step is the time spent in `next(batches)`, client/trainer.py), against a real
`lopd serve` process on loopback, through a small TCP proxy (its own process, asyncio) that
delays every chunk the server sends by a fixed latency, so each response arrives that much later
while bandwidth is unchanged. The store is bench_serving.py's (realistic sequences, 2,000
samples of 1,200-4,500 tokens by default).

Grid: step duration (default 50 and 200 ms) x added latency (0, 20, 100 ms) x prefetch (0, 4).
The step is either `sleep` (the host thread idles, as it does while a GPU runs the step: the
GIL is free) or `spin` (a pure-Python busy loop that holds the GIL: a CPU-bound host, the worst
case for prefetch threads); the grid runs with `sleep`, and `spin` is added for the longest
step with prefetch on.

Reported: data wait / total loop time, over the whole run and in steady state (from the first
batch on: the first batch always waits for a full fetch, whatever the prefetch), the mean fetch
time (= the wait per step without prefetch, the baseline measured in the same run) and whether
the step is longer than a fetch. Goal: steady-state data wait under 1% with prefetch on once the
step is longer than a fetch.

    python bench/bench_data_wait.py            # about 2 minutes on 2 CPU cores
    python bench/bench_data_wait.py --quick    # about 30 seconds
    python bench/bench_data_wait.py --steps-ms 100,400 --latency-ms 0,50 --prefetch 0,2,8
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _common import parse_with_defaults, print_table, timed, write_json  # noqa: E402
from bench_serving import DATASET, build_store, lopd_serve, parse_range  # noqa: E402

DEFAULTS: dict[str, Any] = dict(
    samples=2000,
    prompt_len="200,500",
    response_len="1000,4000",
    batch_size=8,
    steps_ms="50,200",
    latency_ms="0,20,100",
    prefetch="0,4",
    step_seconds=4.0,
    min_steps=12,
    spin=True,
)
QUICK: dict[str, Any] = dict(samples=500, latency_ms="0,100", step_seconds=1.0, min_steps=6)


# ---------------------------------------------------------------- the latency proxy


async def _proxy_main(upstream_port: int, delay_s: float, ready: Any) -> None:
    """Accept on a free loopback port; forward both ways; delay server-to-client data by `delay_s`."""
    loop = asyncio.get_running_loop()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        # Chunks are stamped on arrival and written `delay` later, in order: a fixed added latency
        # per response, not a bandwidth limit (several chunks can be in flight at once).
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def pump_in() -> None:
            while True:
                try:
                    data = await reader.read(1 << 17)
                except (ConnectionError, OSError):
                    data = b""
                queue.put_nowait((loop.time() + delay, data))
                if not data:
                    return

        async def pump_out() -> None:
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                try:
                    writer.write(data)
                    await writer.drain()
                except (ConnectionError, OSError):
                    break
            writer.close()

        await asyncio.gather(pump_in(), pump_out())

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(forward(c_reader, s_writer, 0.0), forward(s_reader, c_writer, delay_s))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    ready.put(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _proxy_process(upstream_port: int, delay_s: float, ready: Any) -> None:
    asyncio.run(_proxy_main(upstream_port, delay_s, ready))


class LatencyProxy:
    """A loopback TCP proxy in its own process (no GIL shared with the trainer), delaying responses."""

    def __init__(self, upstream_port: int, delay_ms: float) -> None:
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        self.proc = ctx.Process(target=_proxy_process, args=(upstream_port, delay_ms / 1e3, ready), daemon=True)
        self.proc.start()
        self.port = int(ready.get(timeout=60))
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.join(timeout=10)

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- the simulated training loop


def simulated_step(seconds: float, kind: str) -> None:
    if kind == "sleep":  # the host waits on the device: the GIL is free
        time.sleep(seconds)
    else:  # "spin": Python bytecode for the whole step, the GIL held but for forced switches
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass


def run_loop(url: str, args: argparse.Namespace, step_ms: float, prefetch: int, kind: str) -> dict[str, Any]:
    """A training loop of simulated steps fed by OPDLoader; per-step data waits as the trainer measures them."""
    from lopd.client.http import StoreClient
    from lopd.client.loader import OPDLoader

    steps = max(args.min_steps, int(args.step_seconds / (step_ms / 1e3)))
    client = StoreClient(url, retries=0)
    info = client.manifest(DATASET)  # the loader pins the version first, as the trainer does
    loader = OPDLoader(client, DATASET, args.batch_size, seed=args.seed, prefetch=prefetch, num_epochs=None, info=info)
    waits = np.zeros(steps)
    tokens = 0
    batches = iter(loader)
    start = time.perf_counter()
    try:
        for k in range(steps):
            tw = time.perf_counter()
            batch = next(batches)
            waits[k] = time.perf_counter() - tw
            tokens += int(batch["attention_mask"].sum())
            simulated_step(step_ms / 1e3, kind)
        total = time.perf_counter() - start
    finally:
        batches.close()
        client.close()
    steady_total = total - waits[0]
    return {
        "step_ms": step_ms,
        "prefetch": prefetch,
        "step_kind": kind,
        "steps": steps,
        "total_s": total,
        "data_wait_s": float(waits.sum()),
        "first_wait_ms": float(waits[0] * 1e3),
        "wait_share": float(waits.sum() / total),
        "steady_wait_share": float(waits[1:].sum() / steady_total),
        "steady_wait_mean_ms": float(waits[1:].mean() * 1e3),
        "steady_wait_max_ms": float(waits[1:].max() * 1e3),
        "tokens_per_s": tokens / total,
        "waits_ms": (waits * 1e3).round(3).tolist(),
    }


# ---------------------------------------------------------------- CLI


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings, about 30 seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="data_wait", help="results go to bench/results/<name>.json")
    p.add_argument("--samples", type=int, help=f"samples in the store (default {DEFAULTS['samples']})")
    p.add_argument("--prompt-len", help=f"prompt tokens, 'lo,hi' (default {DEFAULTS['prompt_len']})")
    p.add_argument("--response-len", help=f"response tokens, 'lo,hi' (default {DEFAULTS['response_len']})")
    p.add_argument("--batch-size", type=int, help=f"samples per batch (default {DEFAULTS['batch_size']})")
    p.add_argument("--steps-ms", help=f"simulated step durations in ms (default {DEFAULTS['steps_ms']})")
    p.add_argument("--latency-ms", help=f"latency added to each response in ms (default {DEFAULTS['latency_ms']})")
    p.add_argument("--prefetch", help=f"prefetch depths (default {DEFAULTS['prefetch']})")
    p.add_argument("--step-seconds", type=float, help=f"training time per run (default {DEFAULTS['step_seconds']})")
    p.add_argument("--min-steps", type=int, help=f"at least this many steps per run (default {DEFAULTS['min_steps']})")
    p.add_argument("--no-spin", dest="spin", action="store_false", default=None, help="skip the GIL-holding step")
    p.add_argument("--store", type=Path, help="reuse (or build once into) this store directory instead of a temp one")
    return parse_with_defaults(p, argv, DEFAULTS, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    steps_ms, latencies, prefetches = _ints(args.steps_ms), _ints(args.latency_ms), _ints(args.prefetch)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-data-wait-") as tmp:
        store = args.store or Path(tmp) / "store"
        build_s = 0.0
        if not (store / DATASET).is_dir():
            build_s, _ = timed(
                lambda: build_store(
                    store, args.samples, parse_range(args.prompt_len), parse_range(args.response_len), seed=args.seed
                )
            )
        print(f"store built in {build_s:.1f}s")
        with lopd_serve(store, Path(tmp) / "server.log") as (url, _pid):
            port = int(url.rsplit(":", 1)[1])
            for latency in latencies:
                with LatencyProxy(port, latency) as proxy:
                    plan = [(s, p, "sleep") for s in steps_ms for p in prefetches]
                    if args.spin:
                        plan.append((max(steps_ms), max(prefetches), "spin"))
                    for step, prefetch, kind in plan:
                        r = run_loop(proxy.url, args, step, prefetch, kind)
                        r["latency_ms"] = latency
                        runs.append(r)
                        print(
                            f"  latency {latency:>3} ms, step {step:>4} ms ({kind}), prefetch {prefetch}: "
                            f"data wait {100 * r['wait_share']:5.1f}% (steady {100 * r['steady_wait_share']:5.2f}%)",
                            flush=True,
                        )

    # The baseline, from the same run: without prefetch every step waits one full fetch (+ collate).
    fetch_ms = {
        r["latency_ms"]: r["steady_wait_mean_ms"] for r in runs if r["prefetch"] == 0 and r["step_kind"] == "sleep"
    }
    for r in runs:
        r["fetch_ms"] = fetch_ms.get(r["latency_ms"], float("nan"))
        r["steady_wait_vs_no_prefetch"] = r["steady_wait_mean_ms"] / r["fetch_ms"]
        r["step_longer_than_fetch"] = bool(r["step_ms"] > r["fetch_ms"])
        r["goal_applies"] = r["prefetch"] > 0 and r["step_longer_than_fetch"]
        r["meets_goal"] = (r["steady_wait_share"] < 0.01) if r["goal_applies"] else None
    rows = [
        [
            r["latency_ms"],
            r["step_ms"],
            r["step_kind"],
            r["prefetch"],
            r["steps"],
            r["fetch_ms"],
            100 * r["wait_share"],
            100 * r["steady_wait_share"],
            r["steady_wait_max_ms"],
            r["steady_wait_vs_no_prefetch"],
            r["tokens_per_s"] / 1e3,
            {None: "-", True: "yes", False: "NO"}[r["meets_goal"]],
        ]
        for r in runs
    ]
    print_table(
        f"data wait: batches of {args.batch_size} samples, OPDLoader over lopd serve + latency proxy, "
        f"{os.cpu_count()} CPU cores, loopback",
        ["latency ms", "step ms", "step", "prefetch", "steps", "fetch ms", "wait %", "steady wait %",
         "max wait ms", "/ no prefetch", "k tokens/s", "< 1%"],
        rows,
    )  # fmt: skip
    print(
        "fetch ms: mean wait per step without prefetch at that latency (fetch + collate); steady: from the first "
        "batch on;\n"
        "/ no prefetch: mean steady wait per step over fetch ms; '< 1%': the goal, where it applies (prefetch on "
        "and step longer than a fetch)"
    )
    results = {"load_average_1min_at_start": load_at_start, "store_build_seconds": build_s, "runs": runs}
    path = write_json(args.name, results, args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
