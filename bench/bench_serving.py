"""Benchmark serving: tokens/s a real `lopd serve` delivers, against reading the shards directly.

A store of realistic sequences (default 2,000 samples, prompts of 200-500 tokens, responses of
1,000-4,000, Zipf-distributed ids, teacher and rollout log-probs shaped like a trained teacher's)
is served by `lopd serve` in its own process on loopback. Client processes (1, 2 and 4, each
with its own `StoreClient`) fetch random batches of 32 indices for a fixed time:

* `direct`: the baseline, `Store(root).open(name).take(indices)` in the client process, no
  server at all: the physical limit of this machine for reading those rows (Parquet
  decompression into an Arrow table);
* `arrow`: `StoreClient.fetch` (Arrow IPC stream, decoded into an Arrow table);
* `json`: `StoreClient.fetch_json` (JSON decoded into numpy arrays per sample);
* `json-orjson` (1 client only): the same JSON answer parsed with orjson instead of httpx's
  stdlib `json`, to show how much of the JSON cost is the client's parser.

Reported per configuration: tokens/s (prompt + response tokens delivered and decoded), MB/s
(bytes on the wire for the API, the decoded Arrow buffers for `direct`), p50/p99 latency per
batch, the server's CPU use, and the ratio to `direct` at the same concurrency. Clients are
processes, not threads, so that the clients do not share a GIL with each other; the server is
always a separate process. Everything (server, clients) shares this machine's cores: on a
2-core machine four clients plus the server oversubscribe it, which is part of what is measured.

    python bench/bench_serving.py            # about 2 minutes on 2 CPU cores
    python bench/bench_serving.py --quick    # about 30 seconds
    python bench/bench_serving.py --samples 4000 --duration 10 --concurrency 1,2,4,8
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
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
from _synthetic import trained_teacher_logprobs, zipf_ids  # noqa: E402

DATASET = "bench"
MODES = ("direct", "arrow", "json")
EXTRA_MODES = ("direct-contiguous", "json-orjson")  # one client each
DEFAULTS: dict[str, Any] = dict(
    samples=2000,
    prompt_len="200,500",
    response_len="1000,4000",
    batch_size=32,
    concurrency="1,2,4",
    duration=5.0,
    repeats=1,
    samples_per_part=512,
)
QUICK: dict[str, Any] = dict(samples=400, duration=1.5, concurrency="1,4")


# ---------------------------------------------------------------- the store


def build_store(
    root: Path,
    n: int,
    prompt_len: tuple[int, int],
    response_len: tuple[int, int],
    *,
    seed: int = 0,
    samples_per_part: int = 512,
    row_group_samples: int | None = None,
) -> dict[str, Any]:
    """Publish `n` synthetic samples as dataset `bench` in a new store at `root`; return its sizes.

    Ids are Zipf-distributed over a 150k vocabulary, every sample carries teacher and rollout
    log-probs (the largest payload a batch can have), written with the store's own Parquet
    settings through staging and publish, as the precompute job writes them.
    `row_group_samples` overrides the store's row group size for this build only (an experiment).
    """
    sys.path.insert(0, str(REPO))
    from lopd.storage.publish import publish
    from lopd.storage.staging import Staging
    from tests.utils.factories import make_plan, write_parts

    rng = np.random.default_rng(seed)
    p_len = rng.integers(prompt_len[0], prompt_len[1] + 1, n)
    r_len = rng.integers(response_len[0], response_len[1] + 1, n)
    # One draw for all samples, then split (drawing per sample recomputes the Zipf table each time).
    ids = zipf_ids(rng, int(p_len.sum() + r_len.sum())).astype(np.int32)
    teacher = trained_teacher_logprobs(rng, int(r_len.sum()))
    rollout = trained_teacher_logprobs(rng, int(r_len.sum()))
    id_cuts = np.cumsum(np.stack([p_len, r_len], axis=1).reshape(-1))[:-1]
    pieces = np.split(ids, id_cuts)
    lp_cuts = np.cumsum(r_len)[:-1]
    samples = {
        "ids": [f"bench-{i:07d}" for i in range(n)],
        "prompts": pieces[0::2],
        "responses": pieces[1::2],
        "teacher": np.split(teacher, lp_cuts),
        "rollout": np.split(rollout, lp_cuts),
    }
    plan = make_plan(samples, run_key=f"{seed:04d}" + "b" * 60, dataset=DATASET, per_part=samples_per_part)
    staging = Staging(root, DATASET, plan.run_key)
    plan = staging.open(plan)
    from lopd.storage.schema import PARQUET_WRITE_OPTIONS

    saved = PARQUET_WRITE_OPTIONS["row_group_size"]
    if row_group_samples:
        PARQUET_WRITE_OPTIONS["row_group_size"] = row_group_samples  # the dict staging writes with
    try:
        write_parts(staging, plan, samples)
    finally:
        PARQUET_WRITE_OPTIONS["row_group_size"] = saved
    manifest = publish(staging, plan)
    return {
        "samples": n,
        "prompt_tokens": int(p_len.sum()),
        "response_tokens": int(r_len.sum()),
        "tokens_per_sample": float((p_len + r_len).mean()),
        "shards": len(manifest.files),
    }


def parse_range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def lopd_serve(store: Path, log_path: Path, *, start_timeout_s: float = 60.0) -> Iterator[tuple[str, int]]:
    """`lopd serve STORE --port P` as a separate process, with its default settings; yields (url, pid).

    Waits for `/readyz` (shard checksums verified). Its log (uvicorn's access log included, as
    deployed) goes to `log_path`, never to a pipe nobody reads.
    """
    import httpx

    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lopd", "serve", str(store), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"lopd serve exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"lopd serve not ready after {start_timeout_s:.0f}s:\n{log_path.read_text()[-2000:]}"
                )
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def row_group_map(store: Path) -> tuple[np.ndarray, np.ndarray]:
    """(global row-group number of every sample, rows in each row group), from the shards' footers.

    A read of one sample decodes its whole row group (pyarrow reads row groups, not rows), so
    the rows of the distinct row groups a batch touches are what the reader decompresses.
    """
    import pyarrow.parquet as pq

    from lopd.storage.reader import Store

    ds = Store(store).open(DATASET, verify=False)
    sizes = [ds_rg.num_rows for path in ds.shard_paths() for md in [pq.ParquetFile(path).metadata]
             for ds_rg in (md.row_group(i) for i in range(md.num_row_groups))]  # fmt: skip
    rg_rows = np.array(sizes, dtype=np.int64)
    return np.repeat(np.arange(rg_rows.size), rg_rows), rg_rows


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# ---------------------------------------------------------------- client processes


def _client_worker(
    mode: str,
    target: str,
    batch_size: int,
    num_samples: int,
    seed: int,
    duration: float,
    barrier: Any,
    out: Any,
) -> None:
    """One client: warm up, wait for the others, fetch random batches for `duration` seconds."""
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    wire = [0]
    if mode.startswith("direct"):
        from lopd.storage.reader import Store

        ds = Store(target).open(DATASET, verify=False)  # its own Dataset: no lock shared with other clients

        def fetch(idx: np.ndarray) -> tuple[int, int]:
            t = ds.take(idx)
            return _arrow_tokens(t, pc), t.nbytes
    else:
        import httpx

        from lopd.client.http import StoreClient

        class CountingTransport(httpx.HTTPTransport):
            """The default transport, counting response body bytes (Content-Length) on the way."""

            def handle_request(self, request: httpx.Request) -> httpx.Response:
                resp = super().handle_request(request)
                wire[0] += int(resp.headers.get("content-length", 0))
                return resp

        client = StoreClient(target, transport=CountingTransport(), retries=0)

        def fetch(idx: np.ndarray) -> tuple[int, int]:
            before = wire[0]
            if mode == "arrow":
                t = client.fetch(DATASET, idx)
                return _arrow_tokens(t, pc), wire[0] - before
            if mode == "json":
                samples = client.fetch_json(DATASET, idx)
            else:  # json-orjson: the same answer, parsed with orjson rather than stdlib json
                samples = _fetch_json_orjson(client, idx)
            return sum(len(s.prompt_ids) + len(s.response_ids) for s in samples), wire[0] - before

    def batch() -> np.ndarray:
        if mode == "direct-contiguous":  # no read amplification: the rows of about one row group
            start = int(rng.integers(0, num_samples - batch_size + 1))
            return np.arange(start, start + batch_size)
        return rng.choice(num_samples, batch_size, replace=False)

    for _ in range(3):  # connections, lazy imports, page cache
        fetch(batch())
    barrier.wait()
    rows: list[tuple[float, int, int]] = []
    asked: list[list[int]] = []
    cpu0 = time.process_time()
    start = time.monotonic()
    deadline = start + duration
    while True:
        idx = batch()
        t0 = time.perf_counter()
        tokens, nbytes = fetch(idx)
        rows.append((time.perf_counter() - t0, tokens, nbytes))
        asked.append(idx.tolist())
        if time.monotonic() >= deadline:
            break
    out.put({"elapsed": time.monotonic() - start, "cpu": time.process_time() - cpu0, "rows": rows, "indices": asked})


def _arrow_tokens(table: Any, pc: Any) -> int:
    from lopd.storage.schema import token_lengths

    prompt, response = token_lengths(table)
    return int(prompt.sum() + response.sum())


def _fetch_json_orjson(client: Any, idx: np.ndarray) -> list[Any]:
    import orjson

    from lopd.client.types import SampleArrays as Sample

    resp = client.request(
        "POST",
        f"v1/datasets/{DATASET}/batch",
        json={"indices": idx.tolist(), "version": None},
        headers={"Accept": "application/json"},
    )
    return [Sample.from_json(s) for s in orjson.loads(resp.content)["samples"]]


def run_config(
    mode: str,
    target: str,
    clients: int,
    args: argparse.Namespace,
    row_groups: tuple[np.ndarray, np.ndarray],
    server_pid: int | None,
) -> dict[str, Any]:
    """`clients` processes of `mode` for `args.duration` seconds; aggregate throughput and latency."""
    ctx = mp.get_context("spawn")  # fresh interpreters: no inherited threads or sockets
    barrier = ctx.Barrier(clients + 1)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_client_worker,
            args=(mode, target, args.batch_size, row_groups[0].size, args.seed * 1000 + k, args.duration, barrier, out),
            daemon=True,
        )
        for k in range(clients)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    server_cpu0 = cpu_seconds(server_pid) if server_pid else float("nan")
    wall0 = time.monotonic()
    results = [out.get(timeout=args.duration + 120) for _ in procs]
    wall = time.monotonic() - wall0
    server_cpu = (cpu_seconds(server_pid) - server_cpu0) if server_pid else float("nan")
    for p in procs:
        p.join(timeout=30)
    lat = np.array([r[0] for res in results for r in res["rows"]])
    tokens = sum(r[1] for res in results for r in res["rows"])
    nbytes = sum(r[2] for res in results for r in res["rows"])
    elapsed = max(res["elapsed"] for res in results)
    rg_of, rg_rows = row_groups
    asked = [np.asarray(idx) for res in results for idx in res["indices"]]
    decoded = sum(int(rg_rows[np.unique(rg_of[idx])].sum()) for idx in asked)
    return {
        "mode": mode,
        "clients": clients,
        "batches": int(lat.size),
        "tokens": int(tokens),
        "bytes": int(nbytes),
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "mb_per_s": nbytes / elapsed / 1e6,
        "batches_per_s": lat.size / elapsed,
        "latency_p50_ms": float(np.percentile(lat, 50) * 1e3),
        "latency_p99_ms": float(np.percentile(lat, 99) * 1e3),
        "rows_decoded_per_row_served": decoded / sum(idx.size for idx in asked),
        "client_cpu_s": float(sum(res["cpu"] for res in results)),
        "server_cpu_s": server_cpu,
        "server_cores_busy": server_cpu / wall if server_pid else float("nan"),
        "client_cores_busy": float(sum(res["cpu"] for res in results)) / wall,
    }


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings, about 30 seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="serving", help="results go to bench/results/<name>.json")
    p.add_argument("--samples", type=int, help=f"samples in the store (default {DEFAULTS['samples']})")
    p.add_argument("--prompt-len", help=f"prompt tokens, 'lo,hi' (default {DEFAULTS['prompt_len']})")
    p.add_argument("--response-len", help=f"response tokens, 'lo,hi' (default {DEFAULTS['response_len']})")
    p.add_argument("--batch-size", type=int, help=f"indices per batch (default {DEFAULTS['batch_size']})")
    p.add_argument("--concurrency", help=f"client process counts (default {DEFAULTS['concurrency']})")
    p.add_argument("--duration", type=float, help=f"seconds per configuration (default {DEFAULTS['duration']})")
    p.add_argument("--repeats", type=int, help=f"rounds over all rows; median shown (default {DEFAULTS['repeats']})")
    p.add_argument("--samples-per-part", type=int, help=f"samples per shard (default {DEFAULTS['samples_per_part']})")
    p.add_argument(
        "--row-group-samples", type=int, help="experiment: row groups of this many samples (default: the store's)"
    )
    p.add_argument("--store", type=Path, help="reuse (or build once into) this store directory instead of a temp one")
    return parse_with_defaults(p, argv, DEFAULTS, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    concurrency = [int(c) for c in str(args.concurrency).split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        store = args.store or Path(tmp) / "store"
        build_s = 0.0
        if not (store / DATASET).is_dir():
            build_s, _ = timed(
                lambda: build_store(
                    store,
                    args.samples,
                    parse_range(args.prompt_len),
                    parse_range(args.response_len),
                    seed=args.seed,
                    samples_per_part=args.samples_per_part,
                    row_group_samples=args.row_group_samples,
                )
            )
        info = store_info(store)
        info["build_seconds"] = build_s
        row_groups = row_group_map(store)
        print(
            f"store: {info['samples']:,} samples, {info['tokens_per_sample']:,.0f} tokens/sample, "
            f"{info['bytes_on_disk'] / 1e6:.1f} MB of Parquet in row groups of {int(np.median(row_groups[1]))} samples "
            f"(built in {build_s:.1f}s)"
        )
        rounds: dict[tuple[str, int], list[dict[str, Any]]] = {}
        with lopd_serve(store, Path(tmp) / "server.log") as (url, pid):
            plan = [(mode, c) for c in concurrency for mode in MODES]
            plan[len(MODES) : len(MODES)] = [(mode, 1) for mode in EXTRA_MODES]  # after the 1-client group
            for k in range(args.repeats):  # whole rounds, so that drift on a shared machine hits every row alike
                for mode, c in plan:
                    direct = mode.startswith("direct")
                    r = run_config(mode, str(store) if direct else url, c, args, row_groups, None if direct else pid)
                    rounds.setdefault((mode, c), []).append(r)
                    print(f"  round {k + 1}: {mode:>17} x{c}: {r['tokens_per_s'] / 1e6:6.2f} M tokens/s", flush=True)
    # Each row: the round with the median throughput (the lower one of the middle two for an even count).
    configs = []
    for runs in rounds.values():
        ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
        row = dict(ranked[(len(ranked) - 1) // 2])
        row["tokens_per_s_all_rounds"] = [r["tokens_per_s"] for r in runs]
        configs.append(row)

    direct_at = {r["clients"]: r["tokens_per_s"] for r in configs if r["mode"] == "direct"}
    best_direct = max(direct_at.values())
    for r in configs:
        r["ratio_to_direct_same_clients"] = r["tokens_per_s"] / direct_at[r["clients"]]
        r["ratio_to_best_direct"] = r["tokens_per_s"] / best_direct
    order = {m: k for k, m in enumerate(("direct", "direct-contiguous", "arrow", "json", "json-orjson"))}
    rows = [
        [
            r["mode"],
            r["clients"],
            r["tokens_per_s"] / 1e6,
            r["mb_per_s"],
            r["latency_p50_ms"],
            r["latency_p99_ms"],
            r["batches"],
            r["rows_decoded_per_row_served"],
            r["server_cores_busy"],
            r["client_cores_busy"],
            r["ratio_to_direct_same_clients"],
        ]
        for r in sorted(configs, key=lambda r: (r["clients"], order[r["mode"]]))
    ]
    print_table(
        f"serving: batches of {args.batch_size} samples (~{args.batch_size * info['tokens_per_sample']:,.0f} tokens), "
        f"{args.duration:g}s per row, median of {args.repeats} round(s), {os.cpu_count()} CPU cores, loopback",
        ["mode", "clients", "M tokens/s", "MB/s", "p50 ms", "p99 ms", "batches", "rows read/row",
         "server cores", "client cores", "/ direct"],
        rows,
    )  # fmt: skip
    print(
        "MB/s: bytes on the wire for the API, decoded Arrow buffers for direct; rows read/row: rows in the row "
        "groups a batch touches per row served (pyarrow decodes whole row groups)"
    )
    path = write_json(args.name, {"load_average_1min_at_start": load_at_start, "store": info, "configs": configs}, args)
    print(f"\nwrote {path}")


def store_info(store: Path) -> dict[str, Any]:

    from lopd.storage.reader import Store

    ds = Store(store).open(DATASET, verify=False)
    p, r = ds.manifest.num_prompt_tokens, ds.manifest.num_response_tokens
    return {
        "samples": len(ds),
        "prompt_tokens": p,
        "response_tokens": r,
        "tokens_per_sample": (p + r) / len(ds),
        "shards": len(ds.shard_paths()),
        "bytes_on_disk": sum(path.stat().st_size for path in ds.shard_paths()),
    }


if __name__ == "__main__":
    main()
