"""Benchmark the teacher top-k: bytes per token of its store layout, and peak memory of the top-k scorer.

storage: the top-k columns of `lopd precompute --top-k K` (ids int32 and log-probs float32,
lossless, `storage.schema.write_options`) against three layouts of the same top-k, at K = 8, 32
and 128, in bytes per response token (the top-k data only; the store's other columns cost what
bench_precompute.py reports):

* DistillKit, as `distillkit/sample_logits_vllm.py` writes it: per token `bytepacked_indices`
  (ceil(K * ceil(log2 V) / 8) bytes of bit-packed ids) and `compressed_logprobs`
  (`DistributionQuantizationConfig.logprob_bits()`: the README's recommended config, exact_k 16
  in bfloat16 and polynomial terms [0, 1, 2, 3, 4, sqrt] in float32, no residual bins), both as
  list<list<uint8>> through `pq.ParquetWriter` at its defaults (`distillkit/sample_common.py`).
  Lossy: the tail beyond exact_k is a polynomial.
* fp16 like Megatron's offline logits: int32 ids and float16 log-probs, [T, K] each, raw (what
  "before zstd" means), and the same bytes through zstd level 3. Lossy (float16).
* naive Parquet: two list<list<>> columns (int32 ids, float32 log-probs) at pyarrow's defaults.

The teacher distributions are synthetic (their shape matters, not the model): logits over a
151,936-token vocabulary with a Zipf prior over ids (low ids frequent, as in BPE vocabularies),
Gaussian noise per position and one boosted token, as float32 logits or rounded to bfloat16 (a
teacher run in bf16, whose logits take few distinct values, so its top-k log-probs tie often and
compress better). Log-probs are `logit - logsumexp` in float32, as the scorer computes them.

memory: peak RSS of scoring one batch with the chunked scorer with and without top-k, and of the
naive full log-softmax, each in a fresh process (`_precompute_memory.py`): the top-k scorer keeps
one chunk of logits at a time, like the plain one.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_with_defaults, print_table, quiet_offline, timed, write_json  # noqa: E402

SECTIONS = ("storage", "memory")
DEFAULTS: dict[str, Any] = dict(
    vocab=151_936,
    tokens=2048,
    tokens_per_sample=256,
    ks="8,32,128",
    mem_vocab=32_000,
    mem_seqs=4,
    mem_seq_len=512,
    mem_top_k=128,
)
QUICK: dict[str, Any] = dict(tokens=384, mem_seqs=2, mem_seq_len=256)

# DistillKit's recommended capture config (its README): exact_k 16 in bfloat16, six float32 polynomial terms.
DK_EXACT_K, DK_EXACT_BYTES, DK_TERMS = 16, 2, 6


def synthetic_topk(
    rng: np.random.Generator, vocab: int, tokens: int, k: int, bf16: bool
) -> tuple[np.ndarray, np.ndarray]:
    """[tokens, k] ids and float32 log-probs, by descending log-prob (ties: lower id), of synthetic teachers."""
    prior = -np.log(np.arange(vocab) + 2.7).astype(np.float32)
    ids = np.empty((tokens, k), np.int32)
    lps = np.empty((tokens, k), np.float32)
    for t in range(tokens):
        x = prior + rng.normal(0.0, 2.5, vocab).astype(np.float32)
        x[rng.integers(vocab)] += np.float32(rng.uniform(0.0, 20.0))
        if bf16:
            x = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
        m = x.max()
        lse = np.float32(np.log(np.exp((x - m).astype(np.float64)).sum()) + m)
        top = np.argpartition(-x, k)[:k]
        lp = (x[top] - lse).astype(np.float32)
        order = np.lexsort((top, -lp))
        ids[t], lps[t] = top[order], lp[order]
    return ids, lps


def _lists(flat: np.ndarray, rows: list[int], value_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(rows, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, value_type))


def _nested(arr: np.ndarray, lengths: list[int], value_type: pa.DataType) -> pa.ListArray:
    """list<list<value>>: per sample, per token, K values."""
    inner = _lists(arr.reshape(-1), [arr.shape[1]] * arr.shape[0], value_type)
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def _parquet_bytes(table: pa.Table, **options: Any) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf, **options)
    return buf.tell()


def ours(ids: np.ndarray, lps: np.ndarray, lengths: list[int]) -> int:
    from lopd.storage.schema import TOPK_FIELDS, TOPK_IDS, TOPK_LOGPROBS, write_options

    k = ids.shape[1]
    table = pa.table(
        {
            TOPK_IDS: _lists(ids.reshape(-1), [n * k for n in lengths], pa.int32()),
            TOPK_LOGPROBS: _lists(lps.reshape(-1), [n * k for n in lengths], pa.float32()),
        }
    ).cast(pa.schema(TOPK_FIELDS))
    options = {k: v for k, v in write_options(table.schema).items() if k not in ("use_dictionary", "write_statistics")}
    options["column_encoding"] = {
        c: e for c, e in options["column_encoding"].items() if c.split(".")[0] in table.column_names
    }
    return _parquet_bytes(table, use_dictionary=False, write_statistics=False, **options)


def _bitpack(ids: np.ndarray, bits: int) -> np.ndarray:
    """[T, K] ids -> [T, ceil(K * bits / 8)] bytes, each id in `bits` bits, little-endian bit order."""
    t, k = ids.shape
    shifts = np.arange(bits, dtype=np.uint32)
    bit_array = ((ids[..., None].astype(np.uint32) >> shifts) & 1).astype(np.uint8).reshape(t, k * bits)
    return np.packbits(bit_array, axis=1, bitorder="little")


def distillkit(ids: np.ndarray, lps: np.ndarray, lengths: list[int], vocab: int) -> int:
    t, k = ids.shape
    bits = int(np.ceil(np.log2(vocab)))
    packed_ids = _bitpack(ids, bits)
    exact = min(DK_EXACT_K, k)
    exact_bytes = (
        (np.ascontiguousarray(lps[:, :exact]).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(t, -1)
    )  # bf16
    tail = lps[:, exact:].astype(np.float64)
    if tail.shape[1]:  # fit [1, x, x^2, x^3, x^4, sqrt(x)] over the ranks of the tail, per token
        x = np.arange(tail.shape[1], dtype=np.float64)
        basis = np.stack([np.ones_like(x), x, x**2, x**3, x**4, np.sqrt(x)], axis=1)
        coef = np.ascontiguousarray(np.linalg.lstsq(basis, tail.T, rcond=None)[0].T, dtype=np.float32)
    else:
        coef = np.zeros((t, DK_TERMS), np.float32)
    logprob_bytes = np.concatenate([exact_bytes, coef.view(np.uint8).reshape(t, -1)], axis=1)
    table = pa.table(
        {
            "compressed_logprobs": _nested(logprob_bytes, lengths, pa.uint8()),
            "bytepacked_indices": _nested(packed_ids, lengths, pa.uint8()),
        }
    )
    return _parquet_bytes(table)  # pq.ParquetWriter's defaults, as DistillKit's StreamingParquetWriter


def fp16_raw_and_zstd(ids: np.ndarray, lps: np.ndarray) -> tuple[int, int]:
    raw = ids.astype(np.int32).tobytes() + lps.astype(np.float16).tobytes()
    return len(raw), pa.Codec("zstd", compression_level=3).compress(raw).size


def naive(ids: np.ndarray, lps: np.ndarray, lengths: list[int]) -> int:
    table = pa.table(
        {"topk_ids": _nested(ids, lengths, pa.int32()), "topk_logprobs": _nested(lps, lengths, pa.float32())}
    )
    return _parquet_bytes(table)


def bench_storage(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    ks = sorted(int(k) for k in args.ks.split(","))
    lengths = [args.tokens_per_sample] * (args.tokens // args.tokens_per_sample)
    n = sum(lengths)
    out: dict[str, Any] = {}
    rows = []
    for teacher in ("float32", "bfloat16"):
        ids_all, lps_all = synthetic_topk(rng, args.vocab, n, max(ks), bf16=teacher == "bfloat16")
        for k in ks:
            ids, lps = np.ascontiguousarray(ids_all[:, :k]), np.ascontiguousarray(lps_all[:, :k])
            raw16, z16 = fp16_raw_and_zstd(ids, lps)
            r = {
                "ours_lossless": ours(ids, lps, lengths) / n,
                "distillkit_lossy": distillkit(ids, lps, lengths, args.vocab) / n,
                "fp16_raw": raw16 / n,
                "fp16_zstd3": z16 / n,
                "naive_parquet": naive(ids, lps, lengths) / n,
                "raw_int32_float32": 8 * k,
            }
            out[f"{teacher}/K={k}"] = r
            rows.append([f"{teacher} logits, K={k}", *r.values()])
    print_table(
        f"Top-k bytes per response token ({n:,} tokens, vocab {args.vocab:,}); lossless = bit-exact float32",
        [
            "teacher / K",
            "ours (lossless)",
            "DistillKit (lossy)",
            "fp16 raw",
            "fp16 zstd-3",
            "naive Parquet",
            "raw i32+f32",
        ],
        rows,
    )
    return out


def bench_memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from lopd.testing import build_tiny_model

    model_dir = build_tiny_model(
        work / "teacher-mem", "llama", seed=0, hidden=64, layers=2, vocab_size=args.mem_vocab,
        max_positions=max(2048, args.mem_seq_len),
    )  # fmt: skip
    worker = Path(__file__).resolve().parent / "_precompute_memory.py"
    tokens = args.mem_seqs * args.mem_seq_len
    chunk_small = 16 * 2**20
    variants = [
        ("naive log_softmax(logits.float())", "naive", []),
        ("chunked, 256 MB chunks", "chunked", []),
        (f"chunked top-{args.mem_top_k}, 256 MB chunks", "chunked-topk", [f"--top-k={args.mem_top_k}"]),
        (f"chunked top-{args.mem_top_k}, 16 MB chunks", "chunked-topk",
         [f"--top-k={args.mem_top_k}", f"--head-chunk-bytes={chunk_small}"]),
    ]  # fmt: skip
    res: dict[str, Any] = {}
    rows = []
    for i, (label, variant, extra) in enumerate(variants):
        out = work / f"mem-{i}.npy"
        cmd = [sys.executable, str(worker), variant, str(model_dir), str(out), f"--seqs={args.mem_seqs}",
               f"--seq-len={args.mem_seq_len}", f"--seed={args.seed}", *extra]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {label} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["delta_mb"] = r["peak_mb"] - r["base_mb"]
        r["logprobs"] = str(out)
        res[label] = r
        rows.append([label, r["delta_mb"], r["seconds"]])
    ref = np.load(res[variants[0][0]]["logprobs"])
    diffs = {label: float(np.max(np.abs(np.load(r["logprobs"]) - ref))) for label, r in res.items()}
    logits_mb = tokens * args.mem_vocab * 4 / 2**20
    print_table(
        f"Peak memory: {args.mem_seqs} x {args.mem_seq_len} tokens, vocab {args.mem_vocab:,} (full fp32 logits "
        f"{logits_mb:,.0f} MB); peak RSS above the loaded model, a fresh process each",
        ["variant", "peak MB", "seconds"],
        rows,
    )
    print(f"  max |log-prob - naive| per variant: {diffs}")
    for r in res.values():
        r.pop("logprobs")
    return {
        "tokens": tokens,
        "vocab": args.mem_vocab,
        "full_logits_mb": logits_mb,
        "variants": res,
        "max_abs_diff": diffs,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings, under a minute")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="topk", help="results go to bench/results/<name>.json")
    p.add_argument("--vocab", type=int, help=f"teacher vocabulary (default {DEFAULTS['vocab']:,})")
    p.add_argument("--tokens", type=int, help=f"response tokens (default {DEFAULTS['tokens']})")
    p.add_argument("--tokens-per-sample", type=int, help=f"tokens per sample (default {DEFAULTS['tokens_per_sample']})")
    p.add_argument("--ks", help=f"K values (default {DEFAULTS['ks']})")
    p.add_argument("--mem-vocab", type=int, help=f"memory: vocabulary (default {DEFAULTS['mem_vocab']})")
    p.add_argument("--mem-seqs", type=int, help=f"memory: sequences (default {DEFAULTS['mem_seqs']})")
    p.add_argument("--mem-seq-len", type=int, help=f"memory: tokens per sequence (default {DEFAULTS['mem_seq_len']})")
    p.add_argument("--mem-top-k", type=int, help=f"memory: K (default {DEFAULTS['mem_top_k']})")
    args = parse_with_defaults(p, argv, DEFAULTS, QUICK)
    quiet_offline()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-topk-") as tmp:
        if "storage" in only:
            dt, results["storage"] = timed(lambda: bench_storage(args))
            results["storage"]["section_seconds"] = dt
        if "memory" in only:
            dt, results["memory"] = timed(lambda: bench_memory(args, Path(tmp)))
            results["memory"]["section_seconds"] = dt
    print(f"\nwrote {write_json(args.name, results, args)}")


if __name__ == "__main__":
    main()
