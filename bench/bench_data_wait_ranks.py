"""Benchmark the data wait of a multi-process training job: N ranks sharing one `lopd serve`.

Each rank is its own process (as under torchrun) with its own `OPDLoader(rank=r, world_size=N)`,
consuming batches in a simulated training loop exactly as bench_data_wait.py's single loop does
(the step `sleep`s: the host idles while the GPU runs), all against one `lopd serve` process on
loopback, through bench_data_wait.py's latency proxy. The ranks start together (a barrier) and
run the same number of steps, so their requests contend for the one server. Baseline, in the
same run: the same loop on 1 rank, and 1 rank without prefetch (a whole fetch per step). Goal
(issue 11): steady-state data wait under 1% of the loop on every rank, with prefetch on and a
step longer than a fetch.

    python bench/bench_data_wait_ranks.py            # about 1 minute on 2 CPU cores
    python bench/bench_data_wait_ranks.py --quick    # about 20 seconds
    python bench/bench_data_wait_ranks.py --ranks 1,2,4 --steps-ms 100 --latency-ms 0,50
"""

from __future__ import annotations

import argparse
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
from bench_data_wait import LatencyProxy, simulated_step  # noqa: E402
from bench_serving import DATASET, build_store, lopd_serve, parse_range  # noqa: E402

DEFAULTS: dict[str, Any] = dict(
    samples=2000, prompt_len="200,500", response_len="1000,4000", batch_size=8, ranks="1,2", steps_ms="50,200",
    latency_ms="0,20", prefetch=4, step_seconds=4.0, min_steps=12,
)  # fmt: skip
QUICK: dict[str, Any] = dict(samples=500, steps_ms="100", latency_ms="0,20", step_seconds=1.5, min_steps=8)


def _rank_loop(url: str, rank: int, world: int, args: dict[str, Any], step_ms: float, start: Any, out: Any) -> None:
    """One rank: its own client and loader, `steps` simulated steps; per-step waits to `out`."""
    from lopd.client.http import StoreClient
    from lopd.client.loader import OPDLoader

    steps = max(args["min_steps"], int(args["step_seconds"] / (step_ms / 1e3)))
    client = StoreClient(url, retries=0)
    info = client.manifest(DATASET)
    loader = OPDLoader(client, DATASET, args["batch_size"], seed=0, rank=rank, world_size=world,
                       prefetch=args["prefetch"], num_epochs=None, info=info, arrays="numpy")  # fmt: skip
    waits = np.zeros(steps)
    start.wait()  # every rank starts its loop at once
    batches = iter(loader)
    t0 = time.perf_counter()
    try:
        for k in range(steps):
            tw = time.perf_counter()
            next(batches)
            waits[k] = time.perf_counter() - tw
            simulated_step(step_ms / 1e3, "sleep")
        total = time.perf_counter() - t0
    finally:
        batches.close()  # type: ignore[attr-defined]
        client.close()
    out.put({"rank": rank, "total_s": total, "waits": waits.tolist()})


def run_ranks(url: str, world: int, args: dict[str, Any], step_ms: float) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_rank_loop, args=(url, r, world, args, step_ms, start, out)) for r in range(world)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    results = sorted((out.get(timeout=600) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(timeout=60)
    rows = []
    for r in results:
        waits = np.asarray(r["waits"])
        steady = r["total_s"] - waits[0]
        rows.append({
            "ranks": world, "rank": r["rank"], "step_ms": step_ms, "steps": len(waits), "total_s": r["total_s"],
            "first_wait_ms": waits[0] * 1e3, "wait_share": waits.sum() / r["total_s"],
            "steady_wait_share": waits[1:].sum() / steady, "steady_wait_mean_ms": waits[1:].mean() * 1e3,
            "steady_wait_max_ms": waits[1:].max() * 1e3,
        })  # fmt: skip
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings, about 20 seconds")
    p.add_argument("--name", default="data_wait_ranks", help="results go to bench/results/<name>.json")
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), help=f"default {value}")
    p.add_argument("--store", type=Path, help="reuse (or build once into) this store directory")
    return parse_with_defaults(p, argv, DEFAULTS, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ints = lambda text: [int(x) for x in str(text).split(",") if x.strip()]  # noqa: E731
    settings = {k: getattr(args, k) for k in DEFAULTS}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-data-wait-ranks-") as tmp:
        store = args.store or Path(tmp) / "store"
        build_s = 0.0
        if not (store / DATASET).is_dir():
            build_s, _ = timed(lambda: build_store(store, args.samples, parse_range(args.prompt_len),
                                                   parse_range(args.response_len), seed=0))  # fmt: skip
        with lopd_serve(store, Path(tmp) / "server.log") as (url, _pid):
            port = int(url.rsplit(":", 1)[1])
            for latency in ints(args.latency_ms):
                with LatencyProxy(port, latency) as proxy:
                    for step_ms in ints(args.steps_ms):
                        # Baseline: without prefetch, 1 rank waits a whole fetch (+ collate) every step.
                        base = run_ranks(proxy.url, 1, {**settings, "prefetch": 0}, step_ms)[0]
                        fetch_ms = base["steady_wait_mean_ms"]
                        for world in ints(args.ranks):
                            for row in run_ranks(proxy.url, world, settings, step_ms):
                                row["latency_ms"] = latency
                                row["fetch_ms"] = fetch_ms
                                runs.append(row)
                                print(f"  latency {latency:>3} ms, step {step_ms:>4} ms, {world} rank(s), rank "
                                      f"{row['rank']}: steady data wait {100 * row['steady_wait_share']:.2f}%",
                                      flush=True)  # fmt: skip
    for r in runs:
        r["goal_applies"] = bool(r["step_ms"] > r["fetch_ms"])
        r["meets_goal"] = bool(r["steady_wait_share"] < 0.01) if r["goal_applies"] else None
    print_table(
        f"data wait with N ranks sharing one lopd serve: batches of {args.batch_size}, prefetch {args.prefetch}, "
        f"{os.cpu_count()} CPU cores, loopback + latency proxy",
        ["latency ms", "step ms", "fetch ms", "ranks", "rank", "steps", "first wait ms", "wait %",
         "steady wait %", "max wait ms", "< 1%"],
        [[r["latency_ms"], r["step_ms"], r["fetch_ms"], r["ranks"], r["rank"], r["steps"], r["first_wait_ms"],
          100 * r["wait_share"], 100 * r["steady_wait_share"], r["steady_wait_max_ms"],
          {None: "-", True: "yes", False: "NO"}[r["meets_goal"]]] for r in runs],
    )  # fmt: skip
    print("fetch ms: mean wait per step of 1 rank without prefetch (the baseline, this run); '< 1%': the goal, "
          "where the step is longer than a fetch")  # fmt: skip
    path = write_json(args.name, {"store_build_seconds": build_s, "runs": runs}, args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
