"""Benchmark the read-side integrity checks: what a served batch costs with them, against without.

One synthetic store (`bench_serving.build_store`: realistic lengths and log-probs) is written twice,
with and without Parquet page checksums. Random batches of 32 indices are read with
`Dataset.take` (what `lopd serve` does per batch request, before encoding) under three settings,
interleaved round by round so drift hits all alike:

* `none`: no page checksums written or verified, no stat before a read (the reads before issue 13);
* `stat`: a `stat` of the shard before each read (a changed stamp would re-hash it);
* `stat+pages`: that, and page CRC32s verified while decoding: what the server does now.

Also measured: sha256 throughput of one core (what the scrub spends per byte, at
`--scrub-bytes-per-s`), so its share of a core at a given rate is `rate / throughput`.

    python bench/bench_integrity.py            # about a minute on 2 CPU cores
    python bench/bench_integrity.py --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _common import median, print_table, write_json  # noqa: E402
from bench_serving import DATASET, build_store  # noqa: E402

MODES = ("none", "stat", "stat+pages")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40, help="batches per mode per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="400 samples, 3 rounds")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.samples, args.rounds = 400, 3
    from lopd.storage import schema
    from lopd.storage.integrity import hash_file
    from lopd.storage.reader import Store

    with tempfile.TemporaryDirectory() as tmp:
        with_crc, without_crc = Path(tmp) / "crc", Path(tmp) / "plain"
        build_store(with_crc, args.samples, (200, 500), (1000, 4000), seed=1)
        schema.PARQUET_WRITE_OPTIONS["write_page_checksum"] = False
        try:
            build_store(without_crc, args.samples, (200, 500), (1000, 4000), seed=1)
        finally:
            schema.PARQUET_WRITE_OPTIONS["write_page_checksum"] = True
        datasets = {
            "none": Store(without_crc).open(DATASET),
            "stat": Store(without_crc).open(DATASET),
            "stat+pages": Store(with_crc).open(DATASET),
        }
        datasets["none"].check_reads = False
        datasets["none"].verify_pages = datasets["stat"].verify_pages = False
        n = len(datasets["none"])
        rng = np.random.default_rng(0)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        tokens: dict[str, int] = dict.fromkeys(MODES, 0)
        for _ in range(args.rounds):
            batches = [rng.choice(n, args.batch_size, replace=False) for _ in range(args.batches)]
            for mode in MODES:
                ds = datasets[mode]
                for idx in batches:
                    start = time.perf_counter()
                    table = ds.take(idx)
                    times[mode].append(time.perf_counter() - start)
                    tokens[mode] += sum(len(table[c].combine_chunks().values) for c in schema.TOKEN_COLUMNS)
        shard = datasets["stat+pages"].shard_paths()[0]
        started = time.perf_counter()
        for _ in range(3):
            hash_file(shard)
        sha_mb_s = 3 * shard.stat().st_size / (time.perf_counter() - started) / 1e6
        shard_mb = shard.stat().st_size / 1e6

    base = median(times["none"])
    rows, results = [], {}
    for mode in MODES:
        ms = median(times[mode]) * 1e3
        tok_s = tokens[mode] / sum(times[mode])
        ratio = median(times[mode]) / base
        rows.append([mode, ms, tok_s, ratio])
        results[mode] = {"median_batch_ms": ms, "tokens_per_s": tok_s, "time_ratio_to_none": ratio}
    print_table(
        f"Dataset.take, {args.batch_size} random indices of {n} samples "
        f"({args.rounds} rounds x {args.batches} batches per mode)",
        ["checks", "median ms/batch", "tokens/s", "time / none"],
        rows,
    )
    print(f"\nsha256 (scrub): {sha_mb_s:,.0f} MB/s on one core over a {shard_mb:.1f} MB shard")
    results["sha256_mb_per_s"] = sha_mb_s
    path = write_json("integrity", {"modes": results}, args)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
